"""Fixtures of the results area: a synthetic CT series on disk, findings over it, Orthanc."""

from __future__ import annotations

import pytest

from tests.results.peers import Orthanc
from tests.results.synthetic import volume_of, write_ct_series


@pytest.fixture
def ct(tmp_path):
    """(volume, ground-truth HU array, ids) of a 12-slice synthetic CT written as DICOM."""
    paths, hu, ids = write_ct_series(tmp_path / "ct")
    return volume_of(paths, hu, ids), ids


@pytest.fixture
def orthanc(tmp_path):
    """A running Orthanc on free ports with storage under tmp_path; stopped at the end."""
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()
