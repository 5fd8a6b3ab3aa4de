"""Real DICOM files nobody here wrote (pydicom's and pydicom-data's test files), shaped as a
hospital would send them: a single CT slice stacked into a series, headers emptied."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def real_file(name: str) -> Path:
    """The path of one of pydicom's (or pydicom-data's) test files."""
    return Path(get_testdata_file(name))


def stacked_series(
    name: str, folder: Path, slices: int, step_mm: float, drop: tuple[str, ...] = (), study_uid: str | None = None
) -> list[Path]:
    """``slices`` copies of a real single-frame image as one series, ``step_mm`` apart along the
    slice normal, with new UIDs (one study) and the attributes in ``drop`` removed."""
    source = pydicom.dcmread(real_file(name))
    study, series = study_uid or generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(slices):
        ds = copy.deepcopy(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, z = (float(v) for v in ds.get("ImagePositionPatient", [0.0, 0.0, 0.0]))
        ds.ImagePositionPatient = [x, y, z + k * step_mm]
        ds.InstanceNumber = k + 1
        for keyword in drop:
            if keyword in ds:
                delattr(ds, keyword)
        path = folder / f"{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def renamed(name: str, folder: Path, drop: tuple[str, ...] = ()) -> Path:
    """A real file with new UIDs (a study of its own) and the attributes in ``drop`` removed."""
    ds = pydicom.dcmread(real_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in drop:
        if keyword in ds:
            delattr(ds, keyword)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path
