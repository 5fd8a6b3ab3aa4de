"""The index's header fields decoded by the wire codec agree with pydicom's reading of the file."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.filereader import _read_file_meta_info, read_preamble

from node.ingest import wire


def _encoded(path: str) -> tuple[memoryview, str] | None:
    raw = open(path, "rb").read()
    fh = io.BytesIO(raw)
    try:
        read_preamble(fh, False)
        meta = _read_file_meta_info(fh)
        transfer_syntax = str(meta.TransferSyntaxUID)
    except Exception:
        return None  # no file meta: not something a C-STORE carries
    return memoryview(raw)[fh.tell() :], transfer_syntax


def _cases() -> list[str]:
    return sorted(p for p in get_testdata_files("*.dcm") if _encoded(p) is not None)


@pytest.mark.parametrize("path", _cases(), ids=lambda p: p.rsplit("/", 1)[-1])
def test_index_fields_match_pydicom(path):
    encoded, transfer_syntax = _encoded(path)  # type: ignore[misc]
    try:
        header = wire.read_header(encoded, transfer_syntax)
    except wire.Unparseable:
        pytest.skip("not a complete data set")
    try:
        reference = dcmread(path, stop_before_pixels=True, specific_tags=wire.HEADER_TAGS)
    except Exception:
        pytest.skip("pydicom cannot read it")
    for keyword in wire.HEADER_KEYWORDS:  # each read the way the index reads it
        if keyword in wire.UID_KEYWORDS:
            continue
        if keyword in ("InstanceNumber", "NumberOfFrames", "SeriesNumber"):
            assert wire.int_value(header, keyword) == wire.int_value(reference, keyword), keyword
        elif keyword == "SliceThickness":
            assert wire.float_value(header, keyword) == wire.float_value(reference, keyword), keyword
        else:
            assert wire.text_value(header, keyword, 400) == wire.text_value(reference, keyword, 400), keyword


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_non_ascii_names_go_through_pydicom(tmp_path, charset):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.SpecificCharacterSet = charset
    ds.PatientName, ds.StudyDescription, ds.InstanceNumber = "Müller^Jörg", "Thorax ä", "7"
    path = tmp_path / "latin.dcm"
    ds.save_as(path, enforce_file_format=True)
    encoded, transfer_syntax = _encoded(str(path))  # type: ignore[misc]
    header = wire.read_header(encoded, transfer_syntax)
    assert wire.text_value(header, "PatientName", 400) == "Müller^Jörg"
    assert wire.text_value(header, "StudyDescription", 400) == "Thorax ä"
    assert wire.int_value(header, "InstanceNumber") == 7


@pytest.mark.parametrize("calling_ae", ["CT01", "ODD", "  PADDED  "])
def test_file_meta_matches_pydicom(calling_ae):
    """The directly encoded file meta is byte-identical to pydicom's."""
    args = ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1", calling_ae)
    assert wire.file_meta(*args) == wire.file_meta_pydicom(*args)
