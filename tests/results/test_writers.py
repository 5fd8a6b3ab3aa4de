"""Result objects: validated by dciodvfy, DicomSRValidator and dsrdump; content checked by decoding."""

from __future__ import annotations

import dataclasses
import datetime

import highdicom as hd
import numpy as np
import pydicom
import pytest

from node.core.settings import CapabilityProfile
from tests.results.synthetic import detection_findings, segmentation_findings, volume_of, write_ct_series
from tests.results.validators import dciodvfy_errors, dsrdump, sr_validator_errors
from workers.results import ResultContext, kind_of, write_results

# Every profile at once: SEG+SR+KOS for a modern PACS, GSPS and SC for one that cannot show SEG.
ALL_PROFILES = [CapabilityProfile(), CapabilityProfile(seg=False, secondary_capture=True)]


def write(findings, tmp_path, **ctx):
    return write_results(findings, ResultContext(job_key="job-1", output_dir=tmp_path / "out", **ctx))


def by_kind(paths):
    out = {}
    for p in paths:
        out.setdefault(kind_of(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID), []).append(p)
    return out


def seg_mask_by_source(seg_path, volume) -> np.ndarray:
    """Decode a SEG with highdicom back onto the source slices: (k, j, i, segments) bool."""
    seg = hd.seg.segread(seg_path)
    uids = [f.sop_instance_uid for f in volume.sources]
    n = len(seg.SegmentSequence)
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=list(range(1, n + 1)), assert_missing_frames_are_empty=True
    ).astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_every_object_type_passes_dciodvfy(ct, tmp_path):
    volume, _ = ct
    paths = write(segmentation_findings(volume), tmp_path / "a", destinations=ALL_PROFILES)
    paths += write(detection_findings(volume), tmp_path / "b", destinations=ALL_PROFILES)
    kinds = by_kind(paths)
    assert set(kinds) == {"seg", "sr", "kos", "gsps", "sc", "derived"}
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name


def test_srs_pass_dicom_sr_validator_and_dsrdump(ct, tmp_path):
    volume, _ = ct
    for n, findings in enumerate(
        [segmentation_findings(volume), detection_findings(volume), segmentation_findings(volume, empty=True)]
    ):
        for sr in by_kind(write(findings, tmp_path / str(n)))["sr"]:
            errors = sr_validator_errors(sr)
            assert errors == [], sr
            text = dsrdump(sr)
            assert "Imaging Measurement Report" in text and "COMPLETE" in text and "UNVERIFIED" in text


def test_seg_round_trip_dice_and_structure(ct, tmp_path):
    volume, ids = ct
    findings = segmentation_findings(volume)
    kinds = by_kind(write(findings, tmp_path))
    seg = pydicom.dcmread(kinds["seg"][0])
    assert seg.SegmentationType == "BINARY"
    # Only the found structure is a segment, numbered from 1; the absent spleen is in the SR.
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1]
    item = seg.SegmentSequence[0]
    assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert item.SegmentAlgorithmType == "AUTOMATIC"
    assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "ThresholdNet"
    assert len(seg.ReferencedSeriesSequence) == 1
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ids["series"]
    # Empty slices are not encoded as frames.
    truth = volume.pixels > 20
    assert seg.NumberOfFrames == int(truth.reshape(truth.shape[0], -1).any(axis=1).sum())
    decoded = seg_mask_by_source(kinds["seg"][0], volume)[..., 0]
    assert dice(decoded, truth) == 1.0


def test_seg_from_label_array_equals_stacked_segments_and_overlaps_still_work(ct, tmp_path, monkeypatch):
    """Disjoint segments go to highdicom as one label array: the frames and per-frame groups are
    those of the stacked boolean segments; overlapping segments still take the stacked path."""
    from workers.analysis.findings import Segment
    from workers.results import seg as seg_writer

    volume, _ = ct
    findings = segmentation_findings(volume)
    liver = findings.segments[0]
    lower = liver.mask.copy()
    lower[: lower.shape[0] // 2] = False
    upper = liver.mask & ~lower
    findings.segments = [
        Segment("upper", upper, liver.property_type, tracking_id="upper"),
        Segment("lower", lower, liver.property_type, tracking_id="lower"),
    ]
    fast = pydicom.dcmread(by_kind(write(findings, tmp_path / "a"))["seg"][0])
    # Cut from one label array (values 7 and 3, in that order), no masks kept: remapped in one
    # pass, the same SEG.
    source = np.where(upper, 7, np.where(lower, 3, 0)).astype(np.uint8)
    findings.segments = [
        Segment("upper", None, liver.property_type, tracking_id="upper", labels=source, label_value=7),
        Segment("lower", None, liver.property_type, tracking_id="lower", labels=source, label_value=3),
    ]
    assert np.array_equal(findings.segments[0].full_mask(), upper)
    assert np.array_equal(findings.segments[1].slice_mask(5), lower[5])
    assert np.array_equal(seg_writer._remapped_labels(findings.segments), np.where(upper, 1, np.where(lower, 2, 0)))
    remapped = pydicom.dcmread(by_kind(write(findings, tmp_path / "r"))["seg"][0])
    assert remapped.PixelData == fast.PixelData
    assert remapped.PerFrameFunctionalGroupsSequence == fast.PerFrameFunctionalGroupsSequence
    # Values already 1..n in segment order (every class found): the array itself, not a copy.
    numbered = np.where(upper, 1, np.where(lower, 2, 0)).astype(np.uint8)
    for segment, value in zip(findings.segments, (1, 2)):
        segment.labels, segment.label_value = numbered, value
    assert seg_writer._remapped_labels(findings.segments) is numbered
    numbered_seg = pydicom.dcmread(by_kind(write(findings, tmp_path / "n"))["seg"][0])
    assert numbered_seg.PixelData == fast.PixelData
    # A value beyond the segments (a class left out) must still be remapped (to background).
    numbered[0, 0, 0] = 3
    assert seg_writer._remapped_labels(findings.segments) is not numbered
    for segment in findings.segments:
        segment.labels, segment.label_value = source, {"upper": 7, "lower": 3}[segment.label]
    monkeypatch.setattr(seg_writer, "_label_array", lambda segments: None)
    stacked = pydicom.dcmread(by_kind(write(findings, tmp_path / "b"))["seg"][0])
    monkeypatch.undo()
    assert fast.PixelData == stacked.PixelData and fast.NumberOfFrames == stacked.NumberOfFrames
    assert fast.PerFrameFunctionalGroupsSequence == stacked.PerFrameFunctionalGroupsSequence
    assert fast.SegmentsOverlap == "NO"
    findings.segments.append(Segment("whole", liver.mask, liver.property_type, tracking_id="whole"))
    path = by_kind(write(findings, tmp_path / "c"))["seg"][0]
    assert pydicom.dcmread(path).SegmentsOverlap == "YES"
    decoded = seg_mask_by_source(path, volume)
    for n, segment in enumerate(findings.segments):
        assert dice(decoded[..., n], segment.full_mask()) == 1.0
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("seg_type", ["LABELMAP", "FRACTIONAL"])
def test_other_segmentation_types(ct, tmp_path, seg_type):
    volume, _ = ct
    kinds = by_kind(write(segmentation_findings(volume), tmp_path, segmentation_type=seg_type))
    seg = pydicom.dcmread(kinds["seg"][0])
    assert seg.SegmentationType == seg_type
    errors = dciodvfy_errors(kinds["seg"][0])
    if seg_type == "LABELMAP":
        # Label Map Segmentation Storage (Sup 243, 2024) is newer than this dicom3tools (2022):
        # it knows neither the IOD nor the background segment 0. See docs/conformance.md.
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
        assert seg.SegmentSequence[0].SegmentNumber == 0 and seg.SegmentSequence[1].SegmentNumber == 1
        errors = [e for e in errors if "Information Object Not found" not in e and "SegmentNumber of 0" not in e]
    assert errors == []


def test_sr_content(ct, tmp_path):
    volume, ids = ct
    kinds = by_kind(write(segmentation_findings(volume), tmp_path))
    sr = pydicom.dcmread(kinds["sr"][0])
    seg = pydicom.dcmread(kinds["seg"][0])
    text = dsrdump(kinds["sr"][0])
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.AccessionNumber == ids["accession"] == sr.ReferencedRequestSequence[0].AccessionNumber
    assert sr.ReferencedRequestSequence[0].RequestedProcedureDescription == "CT abdomen"
    assert "Device Observer UID" in text and "Image Library" in text
    assert text.count("Algorithm Name") >= 2  # in every measurement group
    assert '(cm3,UCUM,"cubic centimeter")' in text
    assert "Absent" in text  # the spleen was looked for and not found
    report = hd.sr.srread(kinds["sr"][0])
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    ref = groups[0].referenced_segment
    assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [1]


def test_detections_classifications_and_derived(ct, tmp_path):
    volume, _ = ct
    kinds = by_kind(write(detection_findings(volume), tmp_path))
    text = dsrdump(kinds["sr"][0])
    assert "POLYLINE" in text and "POINT" in text  # box and point detections (TID 1410)
    assert '"Probability"' in text and '(mm,UCUM,"millimeter")' in text
    assert "Malignant neoplastic disease" in text and "Absent" in text  # 0.12 < 0.5 threshold
    derived = [pydicom.dcmread(p) for p in kinds["derived"]]
    assert len(derived) == len(volume.sources)
    for ds, frame in zip(sorted(derived, key=lambda d: d.InstanceNumber), volume.sources):
        assert ds.SOPClassUID == frame.sop_class_uid
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == frame.sop_instance_uid
        assert ds.SOPInstanceUID != frame.sop_instance_uid and ds.DerivationDescription
    first = sorted(derived, key=lambda d: d.InstanceNumber)[0]
    np.testing.assert_allclose(
        first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept),
        np.rint(volume.pixels[0] * 0.5 + 10),
        atol=1,
    )


def test_empty_result_is_stated_not_silent(ct, tmp_path):
    volume, _ = ct
    kinds = by_kind(write(segmentation_findings(volume, empty=True), tmp_path))
    assert set(kinds) == {"sr"}  # no SEG without a structure, no KOS without key images
    assert "Clinical finding absent" in dsrdump(kinds["sr"][0])


def test_ihe_air_conventions(ct, tmp_path):
    volume, ids = ct
    paths = write(segmentation_findings(volume), tmp_path, destinations=ALL_PROFILES)
    series = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID == ids["study"] and ds.PatientID == ids["patient_id"]
        assert ds.SeriesInstanceUID != ids["series"]
        ours = [e for e in ds.ContributingEquipmentSequence if e.get("ManufacturerModelName") == "ThresholdNet"]
        assert ours and ours[0].SoftwareVersions == "1.0.0" and ours[0].Manufacturer == "ainode"
        series.add((kind_of(ds.SOPClassUID), ds.SeriesInstanceUID))
    assert len({s for _, s in series}) == len({k for k, _ in series})  # one new series per kind


def air_items(path):
    """The Contributing Equipment items with IHE AIR's purpose (1630, 99IHE, "Processing Algorithm")."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds, [
        e
        for e in ds.get("ContributingEquipmentSequence", [])
        if (e.PurposeOfReferenceCodeSequence[0].CodeValue, e.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator)
        == ("1630", "99IHE")
    ]


def test_every_result_kind_names_the_algorithm_as_ihe_air_asks(ct, tmp_path):
    volume, _ = ct
    started = datetime.datetime(2026, 3, 4, 5, 6, 7, 250000)
    paths = []
    for findings in (segmentation_findings(volume), detection_findings(volume)):
        paths += write(findings, tmp_path, destinations=ALL_PROFILES, analysis_started=started)
    assert set(by_kind(paths)) == {"seg", "sr", "kos", "gsps", "sc", "derived"}
    device_uids = set()
    for path in paths:
        ds, [item] = air_items(path)
        assert item.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Processing Algorithm"
        assert item.Manufacturer == "ainode" and item.ManufacturerModelName in ("ThresholdNet", "BoxNet")
        assert item.SoftwareVersions
        assert item.ContributionDateTime.startswith("20260304050607")
        device_uids.add((item.ManufacturerModelName, item.DeviceUID))
        assert (ds.ContentDate, ds.ContentTime[:6]) == ("20260304", "050607"), path.name
        assert dciodvfy_errors(path) == [], path.name
    # One algorithm version: one device. Another version of the model: another device.
    assert len(device_uids) == 2 and len({uid for _, uid in device_uids}) == 2
    [uid] = [uid for name, uid in device_uids if name == "ThresholdNet"]
    assert uid.startswith("2.25.") and len(uid) <= 64
    newer = dataclasses.replace(segmentation_findings(volume), algorithm_version="1.1.0")
    [seg_path] = by_kind(write(newer, tmp_path / "newer"))["seg"]
    _, [item] = air_items(seg_path)
    assert item.SoftwareVersions == "1.1.0" and item.DeviceUID != uid


def test_source_without_type2_attributes_still_valid(tmp_path):
    paths, hu, ids = write_ct_series(tmp_path / "ct", minimal=True)
    volume = volume_of(paths, hu, ids)
    out = write(segmentation_findings(volume), tmp_path, destinations=ALL_PROFILES)
    for path in out:
        assert dciodvfy_errors(path) == [], path.name


def test_uids_are_deterministic(ct, tmp_path):
    volume, _ = ct
    uids = lambda paths: sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths)  # noqa: E731
    first = uids(write(segmentation_findings(volume), tmp_path / "1"))
    again = uids(write(segmentation_findings(volume), tmp_path / "2"))
    newer = uids(write(segmentation_findings(volume, version="1.0.1"), tmp_path / "3"))
    other_job = write_results(segmentation_findings(volume), ResultContext(job_key="job-2", output_dir=tmp_path / "4"))
    assert first == again
    assert not set(first) & set(newer)
    assert not set(first) & set(uids(other_job))
    # Tracking UIDs name the finding, not the job: stable across re-runs and jobs.
    seg_a = pydicom.dcmread(by_kind(write(segmentation_findings(volume), tmp_path / "5"))["seg"][0])
    seg_b = pydicom.dcmread(by_kind(other_job)["seg"][0])
    assert seg_a.SegmentSequence[0].TrackingUID == seg_b.SegmentSequence[0].TrackingUID


def test_capability_profiles_choose_fallbacks(ct, tmp_path):
    volume, _ = ct
    only_gsps = [CapabilityProfile(seg=False, sr=False, kos=False)]
    kinds = by_kind(write(segmentation_findings(volume), tmp_path / "g", destinations=only_gsps))
    assert set(kinds) == {"gsps"}
    gsps = pydicom.dcmread(kinds["gsps"][0])
    assert gsps.GraphicAnnotationSequence[0].GraphicObjectSequence[0].GraphicType == "POLYLINE"
    sc_only = [CapabilityProfile(seg=False, sr=False, kos=False, gsps=False, secondary_capture=True)]
    kinds = by_kind(write(segmentation_findings(volume), tmp_path / "s", destinations=sc_only))
    assert set(kinds) == {"sc"}
    sc = pydicom.dcmread(kinds["sc"][0])
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"


def test_reconstruction_and_measurement_only_results(ct, tmp_path):
    from workers.analysis.findings import DerivedImage, Findings, Measurement

    volume, _ = ct
    recon = Findings(
        analysis="ct-denoise",
        algorithm_name="DenoiseNet",
        algorithm_version="1",
        model_sha256="2" * 64,
        volume=volume,
        kind="reconstruction",
        derived=[DerivedImage(volume.pixels, "AI denoised", "denoised")],
    )
    kinds = by_kind(write(recon, tmp_path / "r"))
    assert set(kinds) == {"derived"}  # no report claiming "no finding" for a denoising job
    for path in kinds["derived"][:2]:
        assert dciodvfy_errors(path) == []
    ef = Findings(
        analysis="ef",
        algorithm_name="EFNet",
        algorithm_version="1",
        model_sha256="3" * 64,
        volume=volume,
        kind="ejection_fraction",
        measurements=[
            Measurement(
                ("10230-1", "LN", "Left ventricular Ejection fraction"),
                57.0,
                ("%", "UCUM", "percent"),
                tracking_id="lv-ef",
            )
        ],
    )
    sr = by_kind(write(ef, tmp_path / "e"))["sr"][0]
    text = dsrdump(sr)
    assert "Ejection fraction" in text and "Clinical finding absent" not in text
    assert sr_validator_errors(sr) == []
