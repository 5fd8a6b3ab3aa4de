"""The worker's check before inference, on real files: headers again, the loaded geometry, and
what the image itself shows (a head CT without Body Part Examined must not yield lung nodules)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.real_files import real_file, renamed, stacked_series
from workers.analysis import domain, registry
from workers.analysis.contract import NotApplicable
from workers.analysis.imaging import load_series
from workers.synthetic import phantoms
from workers.synthetic.dynamic import make_cine, write_us_multiframe
from workers.synthetic.projection import projection_source, radiographs_of, write_dx


@pytest.mark.parametrize("name", ["ct-segmentation", "ct-lesion-detection"])
def test_head_ct_without_body_part_is_refused_by_the_image(tmp_path, name):
    volume = load_series(stacked_series("693_UNCI.dcm", tmp_path, slices=12, step_mm=5.0))
    with pytest.raises(NotApplicable, match="body section of 187 cm², 136 mm wide.*not an adult chest or abdomen"):
        registry.run_analysis(name, volume, {"device": "cpu"})


def test_neck_ct_is_refused_and_a_real_abdomen_ct_is_accepted(tmp_path):
    trunk = registry.get_analysis("ct-segmentation")
    neck = load_series(stacked_series("bad_sequence.dcm", tmp_path / "neck", 12, 5.0, drop=("BodyPartExamined",)))
    assert "not an adult chest or abdomen" in trunk.accepts(neck)
    abdomen = load_series(stacked_series("explicit_VR-UN.dcm", tmp_path / "abdomen", 12, 5.0))
    assert trunk.accepts(abdomen) is None


def test_tibia_radiograph_is_refused_by_its_headers(tmp_path):
    volume = load_series([renamed("RG3_UNCI.dcm", tmp_path)])
    with pytest.raises(NotApplicable, match="BodyPartExamined 'EXTREMITY' names extremity"):
        registry.run_analysis("nodule-classification", volume, {"device": "cpu"})


def test_real_chest_radiograph_fits_and_images_of_other_modalities_do_not(tmp_path):
    classifier = registry.get_analysis("nodule-classification")
    assert classifier.accepts(load_series([real_file("RG1_UNCI.dcm")])) is None
    assert domain.chest_radiograph(load_series([real_file("US1_UNCR.dcm")])) is not None
    assert domain.chest_radiograph(load_series([real_file("CT_small.dcm")])) is not None


def test_brain_mr_as_cine_is_refused_even_without_body_part(tmp_path):
    volume = load_series([renamed("emri_small.dcm", tmp_path, drop=("BodyPartExamined",))])
    with pytest.raises(NotApplicable, match="ejection-fraction"):
        registry.run_analysis("ejection-fraction", volume, {"device": "cpu"})
    # Given a frame time (headers lie), the image check still sees different slices, not one view.
    volume.frame_time_s = 0.04
    assert "look like different slices" in domain.heart_cine(volume)


def test_in_domain_phantoms_are_accepted(tmp_path):
    trunk = registry.get_analysis("ct-segmentation")
    for seed in range(4):
        phantom = phantoms.random_ct_phantom(seed)
        assert trunk.accepts(load_series(phantoms.write_ct_series(phantom, tmp_path / f"ct{seed}"))) is None
    hu, lung, spacing = projection_source(424_007)
    classifier = registry.get_analysis("nodule-classification")
    for n, shot in enumerate(radiographs_of(hu, lung, spacing, 4, np.random.default_rng(7))):
        assert classifier.accepts(load_series([write_dx(shot, tmp_path / f"dx{n}.dcm")])) is None
    ef = registry.get_analysis("ejection-fraction")
    for seed in range(4):
        loop = make_cine(np.random.default_rng(seed))
        assert ef.accepts(load_series([write_us_multiframe(loop, tmp_path / f"cine{seed}.dcm")])) is None
