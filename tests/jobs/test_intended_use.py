"""Intended use from headers: the synonym table (several languages), coded regions, and what the
router decides before queuing, on real files nobody here wrote."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.core.intended_use import BodyRegions, IntendedUse, SeriesHeaders, header_reason, series_headers
from node.core.settings import Settings
from tests.real_files import real_file
from workers.analysis.intended import REFERENCE, declared_uses

CHEST_CT = IntendedUse(modalities=("CT",), body_regions=("chest", "abdomen"), dimensionality="3d", min_slices=8)


def _headers(body_part: str = "", descriptions: tuple[str, ...] = (), codes: tuple[str, ...] = (), frames: int = 40):
    return SeriesHeaders(
        modality="CT", body_part=body_part, descriptions=list(descriptions), region_codes=list(codes), frames=frames
    )


@pytest.mark.parametrize("word", ["CHEST", "THORAX", "Poumon", "POUMONS", "Lunge", "Tórax", "胸部", "ABDOMEN", "Leber"])
def test_chest_and_abdomen_words_of_several_languages_fit_a_trunk_model(word):
    assert header_reason(CHEST_CT, _headers(body_part=word), BodyRegions()) is None
    assert header_reason(CHEST_CT, _headers(descriptions=(f"CT {word} nativ",)), BodyRegions()) is None


@pytest.mark.parametrize("word", ["HEAD", "BRAIN", "Schädel", "CRANE", "Cabeza", "KNEE", "EXTREMITY"])
def test_other_regions_are_refused_with_the_attribute_named(word):
    reason = header_reason(CHEST_CT, _headers(body_part=word), BodyRegions())
    assert reason is not None and "BodyPartExamined" in reason and "intended for chest, abdomen" in reason


def test_coded_region_wins_over_descriptions_and_empty_headers_do_not_refuse():
    regions = BodyRegions()
    # Anatomic Region Sequence: SNOMED 69536005 (Head).
    assert "head" in header_reason(CHEST_CT, _headers(codes=("69536005",)), regions)
    # Body part says chest: a description naming the head does not refuse it.
    assert header_reason(CHEST_CT, _headers(body_part="CHEST", descriptions=("HEAD PROTOCOL",)), regions) is None
    # Nothing said about the region: the image check decides later.
    assert header_reason(CHEST_CT, _headers(descriptions=("5/5mm Plain",)), regions) is None


def test_a_site_adds_its_own_words_in_the_configuration():
    settings = Settings.model_validate({"intended_use": {"synonyms": {"head": ["NEUROCT"]}}})
    regions = BodyRegions(settings.intended_use.synonyms)
    assert header_reason(CHEST_CT, _headers(body_part="NEUROCT"), BodyRegions()) is None  # unknown word
    assert "head" in header_reason(CHEST_CT, _headers(body_part="NEUROCT"), regions)


def test_dimensionality_and_spacing_are_checked():
    assert "3D volume of at least 8" in header_reason(CHEST_CT, _headers(frames=1), BodyRegions())
    fine = IntendedUse(modalities=("CT",), pixel_spacing_mm=(0.3, 2.0))
    coarse = SeriesHeaders(modality="CT", pixel_spacing_mm=5.0)
    assert "pixel spacing 5 mm outside 0.3-2 mm" in header_reason(fine, coarse, BodyRegions())


def test_real_headers_tibia_radiograph_and_head_mr_are_refused_chest_radiograph_is_not():
    regions = BodyRegions()
    tibia = series_headers(pydicom.dcmread(real_file("RG3_UNCI.dcm"), stop_before_pixels=True), frames=1)
    reason = header_reason(REFERENCE["nodule-classification"], tibia, regions)
    assert reason is not None and "EXTREMITY" in reason
    chest = series_headers(pydicom.dcmread(real_file("RG1_UNCI.dcm"), stop_before_pixels=True), frames=1)
    assert header_reason(REFERENCE["nodule-classification"], chest, regions) is None
    brain = series_headers(pydicom.dcmread(real_file("emri_small.dcm"), stop_before_pixels=True), frames=10)
    assert "head" in header_reason(REFERENCE["ejection-fraction"], brain, regions)
    # The head CT says nothing of its region: the headers let it through (the image check refuses it).
    head_ct = series_headers(pydicom.dcmread(real_file("693_UNCI.dcm"), stop_before_pixels=True), frames=20)
    assert header_reason(REFERENCE["ct-segmentation"], head_ct, regions) is None


def test_configured_analyses_declare_their_use_in_the_configuration():
    settings = Settings.model_validate(
        {
            "analyses": [
                {
                    "name": "hospital-lung",
                    "format": "onnx",
                    "path": "/models/lung.onnx",
                    "intended_use": {"modalities": ["CT"], "body_regions": ["chest"], "dimensionality": "3d"},
                },
                {"name": "hospital-any", "format": "onnx", "path": "/models/any.onnx", "modalities": ["MR"]},
            ]
        }
    )
    uses = declared_uses(settings)
    assert uses["hospital-lung"].body_regions == ("chest",)
    assert uses["hospital-any"] == IntendedUse(modalities=("MR",))
    assert uses["ct-segmentation"] is REFERENCE["ct-segmentation"]


def test_series_headers_reads_the_anatomic_region_sequence():
    ds = Dataset()
    ds.Modality = "CT"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "51185008", "SCT", "Thorax"
    ds.AnatomicRegionSequence = [item]
    ds.PixelSpacing = [0.7, 0.7]
    headers = series_headers(ds, frames=30)
    assert headers.region_codes == ["51185008"] and headers.pixel_spacing_mm == 0.7
    assert header_reason(CHEST_CT, headers, BodyRegions()) is None
