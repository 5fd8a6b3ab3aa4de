"""Every transfer syntax in pydicom's test data arrives stored as sent and decodes as the source.

"As sent" is checked against a bit-preserving reference: the same file is pushed by the same
storescu to DCMTK storescp in `+B` mode (writes the data set exactly as received), and the data
set bytes of both copies must be identical.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from node.index import Instance
from tests.helpers import NodeProcess, free_port, port_open, wait_for
from tests.receiver.conftest import settled, storescu

# (file in pydicom's test data, storescu option proposing its transfer syntax)
CASES = [
    ("CT_small.dcm", "-xe"),  # Explicit VR Little Endian
    ("rtdose_1frame.dcm", "-xi"),  # Implicit VR Little Endian
    ("image_dfl.dcm", "-xd"),  # Deflated Explicit VR Little Endian
    ("SC_rgb_small_odd_big_endian.dcm", "-xb"),  # Explicit VR Big Endian
    ("SC_rgb_small_odd_jpeg.dcm", "-xy"),  # JPEG Baseline
    ("JPGExtended.dcm", "-xx"),  # JPEG Extended (12 bit)
    ("SC_rgb_jpeg_gdcm.dcm", "-xs"),  # JPEG Lossless SV1
    ("MR_small_jpeg_ls_lossless.dcm", "-xt"),  # JPEG-LS Lossless
    ("JPEGLSNearLossless_08.dcm", "-xu"),  # JPEG-LS Near-lossless
    ("MR_small_jp2klossless.dcm", "-xv"),  # JPEG 2000 Lossless
    ("JPEG2000.dcm", "-xw"),  # JPEG 2000
    ("SC_rgb_rle.dcm", "-xr"),  # RLE Lossless
]


def _dataset_bytes(path: Path) -> bytes:
    """The data set part of a DICOM file (after preamble and file meta)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.read()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One node for the module. Several samples share a SOP Instance UID (they were made from
    the same image), so a later one must replace the earlier copy."""
    with NodeProcess(tmp_path_factory.mktemp("node"), {"node": {"duplicate_policy": "replace"}}) as proc:
        yield proc


@pytest.fixture(scope="module")
def reference_scp(tmp_path_factory):
    """DCMTK storescp writing what it receives bit for bit (+B), accepting every syntax (+xa)."""
    out = tmp_path_factory.mktemp("storescp")
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "REFSCP", "+B", "+xa", "+uf", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_for(lambda: port_open(port), 30)
    yield port, out
    proc.terminate()
    proc.wait()


def _with_hierarchy(source: Path, folder: Path) -> Path:
    """A copy with Study/Series Instance UIDs added when the test file lacks them (the JPEG-LS
    near-lossless samples do); the node refuses instances without them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(source)
    if "StudyInstanceUID" in ds and "SeriesInstanceUID" in ds:
        return source
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    out = folder / source.name
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("name,propose", CASES, ids=[c[0] for c in CASES])
def test_transfer_syntax_stored_as_sent(node, reference_scp, tmp_path, name, propose):
    source = _with_hierarchy(Path(get_testdata_file(name)), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = dcmread(source)
    ts = src.file_meta.TransferSyntaxUID

    result = storescu(node, source, extra=("-R", propose))
    assert result.returncode == 0, result.stderr
    assert "Received Store Response (Success)" in result.stderr

    ref_port, ref_dir = reference_scp
    before = set(ref_dir.iterdir())
    ref = subprocess.run(
        ["storescu", "-R", propose, "-aec", "REFSCP", "127.0.0.1", str(ref_port), str(source)],
        capture_output=True,
        text=True,
    )
    assert ref.returncode == 0, ref.stderr
    assert wait_for(lambda: len(set(ref_dir.iterdir()) - before) == 1, 30)
    (ref_file,) = set(ref_dir.iterdir()) - before

    settled(node)
    engine = create_engine(node.database_url)
    with Session(engine) as s:
        row = s.scalar(select(Instance).where(Instance.sop_instance_uid == src.SOPInstanceUID))
    engine.dispose()
    assert row is not None, "instance not indexed"
    assert row.transfer_syntax_uid == ts
    stored = node.storage / row.path

    # Byte-identical to what storescu sent (as captured by storescp +B).
    assert _dataset_bytes(stored) == _dataset_bytes(ref_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dcmread(stored)
        assert got.file_meta.TransferSyntaxUID == ts
        # Decoders for every syntax are installed: the stored copy decodes to the source's pixels.
        assert np.array_equal(got.pixel_array, src.pixel_array)
