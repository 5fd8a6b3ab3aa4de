"""Phantom CT as one Enhanced CT Image instance (multi-frame, functional groups), as a modern
scanner stores a volume.

``write_enhanced_ct(phantom, path)`` writes every slice as a frame of an Enhanced CT Image Storage
instance: geometry in the Plane Position (per frame) and Plane Orientation / Pixel Measures
(shared) functional groups, rescale in Pixel Value Transformation, one stack with its in-stack
positions as the dimension index, and the CT acquisition and reconstruction macros that an
ORIGINAL frame requires. The file passes dciodvfy without errors; ``workers.analysis.imaging.load_series``
reads it back as the same volume as the single-frame series of ``phantoms.write_ct_series``.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from workers.synthetic.phantoms import CTPhantom, _ds_num

ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
IMAGE_POSITION_PATIENT = 0x00200032
PLANE_POSITION_SEQUENCE = 0x00209113
STACK_ID = 0x00209056
IN_STACK_POSITION_NUMBER = 0x00209057
FRAME_CONTENT_SEQUENCE = 0x00209111


def _code(value: str, scheme: str, meaning: str):
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _item(**attributes):
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def write_enhanced_ct(
    phantom: CTPhantom,
    path: str | Path,
    *,
    patient_id: str = "PHANTOM001",
    patient_name: str = "Phantom^Test",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    rescale: tuple[float, float] = (1.0, -1024.0),
    accession_number: str = "ACC0001",
    series_number: int = 1,
) -> Path:
    """Write the phantom as one Enhanced CT Image instance (frames in slice order); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = phantom.affine
    spacing_k, spacing_j, spacing_i = phantom.grid.spacing
    row_dir, col_dir = affine[:3, 0] / spacing_i, affine[:3, 1] / spacing_j
    slope, intercept = rescale
    stored = np.clip(np.round((phantom.hu - intercept) / slope), 0, 65535).astype(np.uint16)
    frames, rows, cols = stored.shape
    now = _dt.datetime(2024, 1, 15, 10, 30, 0)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    dim_uid = generate_uid()

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT_IMAGE_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient, study, series, frame of reference, equipment.
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19600101", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid or generate_uid(), "1", accession_number
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = date, time, ""
    ds.StudyDescription = "CT ABDOMEN PHANTOM"
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid or generate_uid(), series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = "Phantom abdomen portal venous (enhanced)"
    ds.BodyPartExamined, ds.PatientPosition = "ABDOMEN", "HFS"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference_uid or generate_uid(), ""
    ds.Manufacturer, ds.ManufacturerModelName = "ainode", "phantom generator"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0001", "1"
    # Enhanced CT Image module.
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation, ds.VolumetricProperties, ds.VolumeBasedCalculationTechnique = "MONOCHROME", "VOLUME", "NONE"
    ds.InstanceNumber, ds.AcquisitionNumber = 1, 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime, ds.AcquisitionDuration = date + time, 5.0
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation, ds.RecognizableVisualFeatures = "NO", "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = Sequence([])
    # Image pixel module.
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    # Multi-frame dimension: one stack, frames indexed by their position in it.
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=STACK_ID,
                FunctionalGroupPointer=FRAME_CONTENT_SEQUENCE,
                DimensionDescriptionLabel="Stack ID",
            ),
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=IN_STACK_POSITION_NUMBER,
                FunctionalGroupPointer=FRAME_CONTENT_SEQUENCE,
                DimensionDescriptionLabel="In-Stack Position",
            ),
        ]
    )
    # Shared functional groups: what every frame has in common.
    shared = _item(
        PixelMeasuresSequence=Sequence(
            [_item(PixelSpacing=[_ds_num(spacing_j), _ds_num(spacing_i)], SliceThickness=_ds_num(spacing_k))]
        ),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[_ds_num(v) for v in (*row_dir, *col_dir)])]),
        FrameAnatomySequence=Sequence(
            [_item(FrameLaterality="U", AnatomicRegionSequence=Sequence([_code("818981001", "SCT", "Abdomen")]))]
        ),
        PixelValueTransformationSequence=Sequence(
            [_item(RescaleIntercept=_ds_num(intercept), RescaleSlope=_ds_num(slope), RescaleType="HU")]
        ),
        FrameVOILUTSequence=Sequence([_item(WindowCenter="40", WindowWidth="400")]),
        IrradiationEventIdentificationSequence=Sequence([_item(IrradiationEventUID=generate_uid())]),
        CTImageFrameTypeSequence=Sequence(
            [
                _item(
                    FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
                    PixelPresentation="MONOCHROME",
                    VolumetricProperties="VOLUME",
                    VolumeBasedCalculationTechnique="NONE",
                )
            ]
        ),
        CTAcquisitionTypeSequence=Sequence(
            [_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")]
        ),
        CTAcquisitionDetailsSequence=Sequence(
            [
                _item(
                    DataCollectionDiameter=500.0,
                    RevolutionTime=0.5,
                    TotalCollimationWidth=40.0,
                    SingleCollimationWidth=0.625,
                    TableHeight=150.0,
                    GantryDetectorTilt=0.0,
                    RotationDirection="CW",
                )
            ]
        ),
        CTTableDynamicsSequence=Sequence([_item(TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0)]),
        CTGeometrySequence=Sequence(
            [_item(DistanceSourceToDetector=1085.6, DistanceSourceToDataCollectionCenter=595.0)]
        ),
        CTReconstructionSequence=Sequence(
            [
                _item(
                    ReconstructionAlgorithm="FILTER_BACK_PROJ",
                    ConvolutionKernel="STANDARD",
                    ConvolutionKernelGroup="SOFT_TISSUE",
                    ReconstructionDiameter=_ds_num(spacing_i * cols),
                    ReconstructionPixelSpacing=[float(spacing_j), float(spacing_i)],
                    ReconstructionAngle=360.0,
                    ImageFilter="NONE",
                )
            ]
        ),
        CTExposureSequence=Sequence(
            [
                _item(
                    ExposureTimeInms=500.0,
                    XRayTubeCurrentInmA=200.0,
                    ExposureInmAs=100.0,
                    ExposureModulationType="NONE",
                )
            ]
        ),
        CTXRayDetailsSequence=Sequence(
            [_item(KVP=120.0, FocalSpots=[1.2], FilterType="BODY", FilterMaterial=["ALUMINUM"])]
        ),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(frames):
        position = affine[:3, :3] @ np.array([0, 0, k]) + affine[:3, 3]
        moment = (now + _dt.timedelta(milliseconds=10 * k)).strftime("%Y%m%d%H%M%S.%f")
        per_frame.append(
            _item(
                FrameContentSequence=Sequence(
                    [
                        _item(
                            FrameAcquisitionNumber=1,
                            FrameReferenceDateTime=moment,
                            FrameAcquisitionDateTime=moment,
                            FrameAcquisitionDuration=10.0,
                            StackID="1",
                            InStackPositionNumber=k + 1,
                            DimensionIndexValues=[1, k + 1],
                        )
                    ]
                ),
                PlanePositionSequence=Sequence([_item(ImagePositionPatient=[_ds_num(v) for v in position])]),
                CTPositionSequence=Sequence(
                    [
                        _item(
                            TablePosition=float(position[2]),
                            ReconstructionTargetCenterPatient=[
                                float(v) for v in (affine @ [(cols - 1) / 2, (rows - 1) / 2, k, 1])[:3]
                            ],
                            DataCollectionCenterPatient=[0.0, 0.0, float(position[2])],
                        )
                    ]
                ),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
