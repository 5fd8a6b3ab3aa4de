"""Names in every character set reach the index decoded, ISO 2022 escapes included.

7-bit ISO 2022 text (JIS X 0208 or KS X 1001 by escape sequences) is ASCII bytes but not ASCII
text; it used to be indexed as its raw escapes ("Yamada^Tarou=\\x1b$B;3ED..."). A broken escape
sequence must never fail the receive.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from node.index import Study
from node.ingest import wire
from tests.receiver.conftest import settled, storescu

CHARSET_FILES = sorted(p for p in get_charset_files("chr*.dcm") if "PatientName" in pydicom.dcmread(p))


def _encoded(path: str | Path) -> tuple[memoryview, str]:
    raw = Path(path).read_bytes()
    fh = io.BytesIO(raw)
    pydicom.filereader.read_preamble(fh, False)
    meta = pydicom.filereader._read_file_meta_info(fh)
    return memoryview(raw)[fh.tell() :], str(meta.TransferSyntaxUID)


@pytest.mark.parametrize("path", CHARSET_FILES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_header_decodes_names_as_pydicom_does(path):
    header = wire.read_header(*_encoded(path))
    expected = str(pydicom.dcmread(path).PatientName)
    assert wire.text_value(header, "PatientName", 400) == expected
    assert "\x1b" not in wire.text_value(header, "PatientName", 400)


def test_broken_escape_sequence_is_indexed_not_fatal(tmp_path):
    """An escape to a character set nobody knows, and a truncated one: read, never raised."""
    ds = pydicom.dcmread(get_charset_files("chrH31.dcm")[0])
    ds["PatientName"].value = b"Yamada^Tarou=\x1b$Z;3ED=\x1b$"  # raw bytes as a sender wrote them
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    header = wire.read_header(*_encoded(path))
    name = wire.text_value(header, "PatientName", 400)
    assert name.startswith("Yamada^Tarou=") and "\x1b" not in name


def test_iso2022_name_is_decoded_in_the_index(node):
    """chrH31: Japanese with '\\ISO 2022 IR 87' (empty first value), pushed by DCMTK storescu."""
    source = Path(get_charset_files("chrH31.dcm")[0])
    result = storescu(node, source)
    assert result.returncode == 0 and "Received Store Response (Success)" in result.stderr, result.stderr
    settled(node)
    engine = create_engine(node.database_url)
    with Session(engine) as s:
        study = s.scalar(select(Study))
        assert study.patient.name == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    engine.dispose()
