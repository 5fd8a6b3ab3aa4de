"""Synthetic CT series with known ground truth, written as real DICOM, and Findings over them."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from workers.analysis.findings import (
    Classification,
    DerivedImage,
    Detection,
    Findings,
    Measurement,
    Segment,
    SourceFrame,
    Volume,
)

LIVER = ("10200004", "SCT", "Liver")
ABDOMEN = ("818981001", "SCT", "Abdomen")
SPLEEN = ("78961009", "SCT", "Spleen")
NODULE = ("27925004", "SCT", "Nodule")
LUNG = ("39607008", "SCT", "Lung")


def write_ct_series(
    folder: Path, shape=(12, 48, 48), spacing=(2.5, 0.8, 0.8), minimal: bool = False, seed: int = 0
) -> tuple[list[Path], np.ndarray, dict]:
    """A CT series of ``shape`` (k, j, i) with an ellipsoid 'organ' and a small sphere.

    Returns the file paths (slice order), the HU volume and the identifiers used. ``minimal``
    leaves out the Type 2 attributes a sloppy modality might omit (names, IDs, dates).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    organ = ((k - shape[0] / 2) / (shape[0] / 3)) ** 2 + ((j - shape[1] / 2) / (shape[1] / 4)) ** 2 + (
        (i - shape[2] / 2) / (shape[2] / 3)
    ) ** 2 <= 1
    hu = np.where(organ, 60.0, -100.0) + rng.normal(0, 5, shape)
    ids = {
        "study": generate_uid(),
        "series": generate_uid(),
        "for": generate_uid(),
        "accession": "ACC123",
        "patient_id": "PID-42",
        "organ": organ,
    }
    paths = []
    for n in range(shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = ids["study"], ids["series"], ids["for"]
        ds.Modality = "CT"
        if not minimal:
            ds.PatientName, ds.PatientID = "Test^Phantom", ids["patient_id"]
            ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = datetime.date.today().strftime("%Y%m%d")
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
            ds.ReferringPhysicianName = "Ref^Doc"
            ds.StudyID = "S1"
            ds.AccessionNumber = ids["accession"]
            ds.Manufacturer = "SynthCT"
            ds.StudyDescription = "CT ABDOMEN"
            ds.RequestAttributesSequence = [Dataset()]
            ds.RequestAttributesSequence[0].RequestedProcedureID = "RP1"
            ds.RequestAttributesSequence[0].RequestedProcedureDescription = "CT abdomen"
            ds.RequestAttributesSequence[0].ScheduledProcedureStepID = "SPS1"
        else:
            for kw in (
                "PatientName",
                "PatientID",
                "PatientBirthDate",
                "PatientSex",
                "StudyDate",
                "StudyTime",
                "ReferringPhysicianName",
                "StudyID",
                "AccessionNumber",
                "Manufacturer",
            ):
                setattr(ds, kw, "")
        ds.SeriesNumber, ds.InstanceNumber = 1, n + 1
        ds.PatientPosition = "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-20.0, -20.0, n * spacing[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.PositionReferenceIndicator = ""
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = shape[1], shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = (np.rint(hu[n]) + 1024).astype(np.int16).tobytes()
        path = folder / f"ct{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, hu.astype(np.float32), ids


def volume_of(paths: list[Path], hu: np.ndarray, ids: dict, spacing=(2.5, 0.8, 0.8)) -> Volume:
    """The Volume contract over the written series (what workers.imaging would produce)."""
    import pydicom

    frames = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        frames.append(SourceFrame(ds.SOPClassUID, ds.SOPInstanceUID, p))
    affine = np.eye(4)
    affine[0, 0], affine[1, 1], affine[2, 2] = spacing[2], spacing[1], spacing[0]
    affine[:3, 3] = [-20.0, -20.0, 0.0]
    return Volume(
        pixels=hu,
        affine=affine,
        sources=frames,
        study_instance_uid=ids["study"],
        series_instance_uid=ids["series"],
        frame_of_reference_uid=ids["for"],
        modality="CT",
    )


def segmentation_findings(volume: Volume, *, empty: bool = False, version: str = "1.0.0") -> Findings:
    """Findings of a 'model' that thresholds the organ (ground truth is HU > 20)."""
    liver = volume.pixels > 20 if not empty else np.zeros(volume.pixels.shape, bool)
    spleen = np.zeros(volume.pixels.shape, bool)  # looked for, not found
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    return Findings(
        analysis="ct-organs",
        algorithm_name="ThresholdNet",
        algorithm_version=version,
        model_sha256="0" * 64,
        volume=volume,
        kind="segmentation",
        segments=[
            Segment("liver", liver, LIVER, anatomic_region=ABDOMEN, tracking_id="liver"),
            Segment("spleen", spleen, SPLEEN, anatomic_region=ABDOMEN, tracking_id="spleen"),
        ],
        measurements=[
            Measurement(
                ("118565006", "SCT", "Volume"),
                liver.sum() * voxel_ml,
                ("cm3", "UCUM", "cubic centimeter"),
                segment_label="liver",
                finding_site=LIVER,
                tracking_id="liver",
            )
        ]
        if not empty
        else [],
    )


def detection_findings(volume: Volume) -> Findings:
    """A detection with a box, a classification and a reconstruction (one of each kind)."""
    kdim = volume.pixels.shape[0]
    return Findings(
        analysis="ct-nodules",
        algorithm_name="BoxNet",
        algorithm_version="2.1",
        model_sha256="1" * 64,
        volume=volume,
        kind="detection",
        detections=[
            Detection(
                "nodule",
                NODULE,
                (kdim // 2, 20.0, 22.0),
                ((kdim // 2 - 1, 16.0, 18.0), (kdim // 2 + 1, 24.0, 26.0)),
                score=0.91,
                diameter_mm=6.4,
                finding_site=LUNG,
                tracking_id="nodule-1",
            ),
            Detection(
                "nodule",
                NODULE,
                (1, 10.0, 10.0),
                ((1, 10.0, 10.0), (1, 10.0, 10.0)),
                score=0.55,
                tracking_id="nodule-2",
            ),
        ],
        classifications=[
            Classification("malignancy", ("363346000", "SCT", "Malignant neoplastic disease"), 0.12, finding_site=LUNG)
        ],
        derived=[
            DerivedImage(
                volume.pixels * 0.5 + 10, "AI denoised", "Denoised by BoxNet 2.1", ("113086", "DCM", "Image Processing")
            )
        ],
    )
