"""Specific Character Set end to end through the writers: the patient name in every result object
equals the source's, for each character set, and the results carry the source's set as it was
written (an ISO 2022 set with an empty first value included)."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_charset_files

from node.core.settings import CapabilityProfile
from tests.results.synthetic import detection_findings, segmentation_findings, volume_of, write_ct_series
from tests.results.validators import dciodvfy_errors
from workers.results import ResultContext, write_results

ALL_PROFILES = [CapabilityProfile(), CapabilityProfile(seg=False, secondary_capture=True)]
# (Specific Character Set as encoded, a patient name in it): PS3.5 Annex H-K examples.
CASES = {
    "japanese-iso2022-empty-first": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "japanese-katakana-kanji": (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    "japanese-ir13": ("ISO_IR 13", "ﾔﾏﾀﾞ^ﾀﾛｳ"),
    "korean-ir149": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    "greek-ir126": ("ISO_IR 126", "Διονυσιος"),
    "hebrew-ir138": ("ISO_IR 138", "שרון^דבורה"),
    "chinese-gb18030": ("GB18030", "Wang^XiaoDong=王^小东"),
    "chinese-utf8": ("ISO_IR 192", "王小明"),
    "latin1-ir100": ("ISO_IR 100", "Müller^Jörg"),
}


def _encoded_charset(path) -> list[str]:
    value = pydicom.dcmread(path, stop_before_pixels=True).SpecificCharacterSet
    return [value] if isinstance(value, str) else list(value)


@pytest.mark.parametrize("case", sorted(CASES))
def test_patient_name_survives_every_result_object(tmp_path, case):
    charset, name = CASES[case]
    paths, hu, ids = write_ct_series(tmp_path / "ct", shape=(4, 32, 32))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet, ds.PatientName = charset, name
        ds.save_as(path, enforce_file_format=True)
    assert str(pydicom.dcmread(paths[0]).PatientName) == name  # the source says what we meant
    volume = volume_of(paths, hu, ids)
    written = []
    for n, findings in enumerate([segmentation_findings(volume), detection_findings(volume)]):
        context = ResultContext(job_key=f"job-{n}", output_dir=tmp_path / "out" / str(n), destinations=ALL_PROFILES)
        written += write_results(findings, context)
    assert {obj.kind for obj in written} == {"seg", "sr", "kos", "gsps", "sc", "derived"}
    expected = [charset] if isinstance(charset, str) else charset
    for obj in written:
        ds = pydicom.dcmread(obj.path, stop_before_pixels=True)
        assert str(ds.PatientName) == name, (obj.kind, str(ds.PatientName))
        assert _encoded_charset(obj.path) == expected, obj.kind
    if case == "japanese-iso2022-empty-first":
        for obj in written:
            assert dciodvfy_errors(obj.path) == [], obj.kind
        raw = pydicom.dcmread(written[0].path, stop_before_pixels=True)["PatientName"]
        assert b"\x1b$B" in raw.value.original_string  # JIS X 0208 by escape, as in the source


@pytest.mark.parametrize("path", sorted(get_charset_files("chr*.dcm")), ids=lambda p: p.rsplit("/", 1)[-1])
def test_pydicom_charset_examples(tmp_path, path):
    """The character set examples of pydicom's test files (PS3.5 annexes), their own names."""
    example = pydicom.dcmread(path)
    if "PatientName" not in example or "SpecificCharacterSet" not in example:
        pytest.skip("no name or character set")
    name, charset = str(example.PatientName), example.SpecificCharacterSet
    paths, hu, ids = write_ct_series(tmp_path / "ct", shape=(3, 24, 24))
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SpecificCharacterSet, ds.PatientName = charset, example.PatientName
        ds.save_as(p, enforce_file_format=True)
    volume = volume_of(paths, hu, ids)
    context = ResultContext(job_key="job", output_dir=tmp_path / "out", destinations=ALL_PROFILES)
    for obj in write_results(segmentation_findings(volume), context):
        assert str(pydicom.dcmread(obj.path, stop_before_pixels=True).PatientName) == name, obj.kind
