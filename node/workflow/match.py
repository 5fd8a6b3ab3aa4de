"""C-FIND matching of UPS data sets (PS3.4 C.2.2.2): single value, list of UIDs, wild card,
range (DA, DT, TM), sequence and universal matching; the answer's keys filled from the workitem.

The node's workitem lists are small (a department's AI work of the last days): the matching is
done in Python on the stored data sets, after the database narrowed by state and Patient ID.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag

TRANSACTION_UID = Tag(0x0008, 0x1195)
# Keys that are not matched: the identifier's character set and the query's own context.
_NOT_MATCHED = (Tag("SpecificCharacterSet"), Tag("QueryRetrieveLevel"))
_DT = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")


def valid_datetime(value: str) -> bool:
    """A DT value (PS3.5 6.2) that names a real moment."""
    value = value.strip()
    if not _DT.match(value):
        return False
    digits = re.sub(r"[+-]\d{4}$", "", value).split(".")[0]
    fmt = "%Y%m%d%H%M%S"[: {4: 2, 6: 4, 8: 6, 10: 8, 12: 10, 14: 12}.get(len(digits), 0)]
    try:
        datetime.strptime(digits, fmt)
    except ValueError:
        return False
    return True


def has_wildcards(value: str) -> bool:
    """Whether a string key uses wild card matching (* or ?)."""
    return "*" in value or "?" in value


def _wildcard(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _range(key: str, value: str, vr: str) -> bool:
    low, _, high = key.partition("-")
    if vr == "DT":
        # Compare on the common precision: "20261205" matches every moment of that day.
        low, high, value = low.split("+")[0], high.split("+")[0], value.split("+")[0]
        if low and value[: len(low)] < low:
            return False
        return not high or value[: len(high)] <= high
    return (not low or value >= low) and (not high or value <= high)


def _element_matches(key_elem: object, ds: Dataset) -> bool:
    tag, vr, key = key_elem.tag, key_elem.VR, key_elem.value  # type: ignore[attr-defined]
    if vr == "SQ":
        if not key:
            return True  # universal: an empty sequence key
        items = ds.get(tag).value if tag in ds else []
        return any(matches(item, key[0]) for item in items)
    if vr == "UI" and isinstance(key, MultiValue):  # list of UIDs: any of them
        return tag in ds and str(ds[tag].value) in {str(uid) for uid in key}
    text = "" if key is None else str(key)
    if text == "":
        return True
    if tag not in ds or ds[tag].value in (None, ""):
        return False
    stored = ds[tag].value
    stored_text = str(stored).strip()
    if vr in ("DA", "DT", "TM") and "-" in text:
        return _range(text, stored_text, vr)
    if vr in ("DA", "DT", "TM"):
        return stored_text.startswith(text) if vr == "DT" else stored_text == text
    if has_wildcards(text):
        return _wildcard(text, stored_text)
    if vr == "PN":
        return stored_text.upper() == text.upper()
    return stored_text == text


def matches(ds: Dataset, identifier: Dataset) -> bool:
    """Whether the data set matches every key of the identifier."""
    for elem in identifier:
        if elem.tag in _NOT_MATCHED or elem.tag == TRANSACTION_UID or elem.tag.is_private:
            continue
        if not _element_matches(elem, ds):
            return False
    return True


def answer(ds: Dataset, identifier: Dataset) -> Dataset:
    """The identifier's keys with the workitem's values (empty where it has none; never the
    Transaction UID); a sequence key returns the workitem's whole sequence."""
    found = Dataset()
    if "SpecificCharacterSet" in ds:
        found.SpecificCharacterSet = ds.SpecificCharacterSet
    for elem in identifier:
        if elem.tag == Tag("SpecificCharacterSet"):
            continue
        if elem.tag != TRANSACTION_UID and elem.tag in ds:
            found.add(ds[elem.tag])
        else:
            found.add_new(elem.tag, elem.VR, Sequence([]) if elem.VR == "SQ" else None)
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in found and keyword in ds:
            found.add(ds[keyword])
    return found
