"""The values an instance gives the index, fitted to the index's columns when it is received.

A C-STORE is answered Success only if its rows can be written: PostgreSQL refuses a NUL in a
text column, an integer over 2**31 - 1 in an INTEGER column, a string over a VARCHAR's length.
``index_values`` maps each header field to the column it fills and fits it to that column's
type (read from the tables in ``node.index``, so a changed column changes the check): text
loses control characters (NUL included), invalid code points and trailing padding and is cut
to the column's length; an integer out of the column's range and a non-finite number become
NULL (an unknown count of frames becomes 1). The stored file keeps every byte as received;
only the index holds the fitted value. What cannot be fitted at all raises ``NotIndexable``
and the instance is refused (C000) instead of being acknowledged and never indexed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, Integer, String

from node.index import Instance, Patient, Series, Study
from node.ingest.wire import float_value, int_value

# Column -> the header keyword whose value fills it, per table (what the index keeps).
PATIENT_FIELDS = {
    "patient_id": "PatientID",
    "issuer": "IssuerOfPatientID",
    "name": "PatientName",
    "birth_date": "PatientBirthDate",
    "sex": "PatientSex",
}
STUDY_FIELDS = {
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "description": "StudyDescription",
    "referring_physician": "ReferringPhysicianName",
    "study_id": "StudyID",
    "patient_age": "PatientAge",
}
SERIES_FIELDS = {
    "modality": "Modality",
    "series_number": "SeriesNumber",
    "description": "SeriesDescription",
    "body_part": "BodyPartExamined",
    "station_name": "StationName",
    "manufacturer": "Manufacturer",
    "slice_thickness": "SliceThickness",
    "frame_of_reference_uid": "FrameOfReferenceUID",
}
INSTANCE_FIELDS = {"instance_number": "InstanceNumber", "number_of_frames": "NumberOfFrames"}

# INTEGER in PostgreSQL (and what SQLAlchemy's Integer promises on every database).
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
# C0 and C1 controls and DEL (NUL among them: PostgreSQL text cannot hold it), and lone
# surrogates, which no database encoding can store.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class NotIndexable(Exception):
    """The data set's values cannot be fitted to the index (answer C000)."""


@dataclass(frozen=True)
class IndexValues:
    """The column values of an instance's rows, each fitted to its column."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]


def fit_text(value: Any, limit: int | None) -> str:
    """Text as a String column stores it: values joined by backslashes, no control characters
    or lone surrogates, stripped, at most ``limit`` characters."""
    if value is None:
        return ""
    if type(value) is str and value.isprintable() and value.isascii():  # nearly always: nothing to drop
        return value.strip()[:limit] if limit else value.strip()
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = _UNSTORABLE.sub("", str(value)).strip()
    return text[:limit] if limit else text


def fit_int(value: int | None) -> int | None:
    """An integer an INTEGER column can hold, else None."""
    return value if value is not None and INT_MIN <= value <= INT_MAX else None


def fit_float(value: float | None) -> float | None:
    """A finite float, else None."""
    return value if value is not None and math.isfinite(value) else None


_PATIENTS, _STUDIES, _SERIES, _INSTANCES = (m.__table__ for m in (Patient, Study, Series, Instance))
_TEXT, _INT, _FLOAT = 0, 1, 2


def _plan(table: Any, fields: dict[str, str]) -> list[tuple[str, str, int, int | None]]:
    """(column, keyword, kind, length) for each field: read from the table once."""
    plan = []
    for column, keyword in fields.items():
        kind = table.c[column].type
        if isinstance(kind, Integer):
            plan.append((column, keyword, _INT, None))
        elif isinstance(kind, Float):
            plan.append((column, keyword, _FLOAT, None))
        elif isinstance(kind, String):
            plan.append((column, keyword, _TEXT, kind.length))
        else:  # a column type this module does not fit: the table changed, add a rule here
            raise TypeError(f"no rule for column {table.name}.{column}")
    return plan


_PLANS = {
    "patient": _plan(_PATIENTS, PATIENT_FIELDS),
    "study": _plan(_STUDIES, STUDY_FIELDS),
    "series": _plan(_SERIES, SERIES_FIELDS),
    "instance": _plan(_INSTANCES, INSTANCE_FIELDS),
}


def _fit(header: Any, plan: list[tuple[str, str, int, int | None]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for column, keyword, kind, length in plan:
        try:
            if kind == _TEXT:
                values[column] = fit_text(header.get(keyword), length)
            elif kind == _INT:
                values[column] = fit_int(int_value(header, keyword))
            else:
                values[column] = fit_float(float_value(header, keyword))
        except Exception as err:  # a value pydicom cannot decode (character set, VR): refuse
            raise NotIndexable(f"{keyword} cannot be decoded ({type(err).__name__})") from None
    return values


def index_values(header: Any) -> IndexValues:
    """The values of the index's rows for this header, fitted to their columns (NotIndexable
    when a value cannot be decoded at all)."""
    instance = _fit(header, _PLANS["instance"])
    instance["number_of_frames"] = instance["number_of_frames"] or 1
    return IndexValues(
        _fit(header, _PLANS["patient"]), _fit(header, _PLANS["study"]), _fit(header, _PLANS["series"]), instance
    )


def fit_ae(title: str) -> str:
    """An AE title as the index stores it (16 characters of printable text)."""
    return fit_text(title, _INSTANCES.c.calling_ae.type.length)
