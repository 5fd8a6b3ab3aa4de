"""The whole pipeline into a real PACS: storescu → ainode serve → CT segmentation → Orthanc.

The phantom study is pushed by DCMTK storescu to the node (and to the PACS, as a modality would);
the results are fetched back from Orthanc's REST API and the SEG is decoded with highdicom and
compared with the phantom's exact labels.
"""

from __future__ import annotations

import io
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from tests.helpers import NodeProcess, wait_for
from workers.analysis.models import segmentation
from workers.synthetic import phantoms

pytestmark = pytest.mark.slow


def storescu(port: int, aec: str, files) -> None:
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        check=True,
        capture_output=True,
    )


def result_series(orthanc, study_uid: str) -> dict[str, list[str]]:
    """Modality → instance ids of the study in Orthanc."""
    out: dict[str, list[str]] = {}
    for study in orthanc.get_json("/studies"):
        info = orthanc.get_json(f"/studies/{study}")
        if info["MainDicomTags"]["StudyInstanceUID"] != study_uid:
            continue
        for series in info["Series"]:
            s = orthanc.get_json(f"/series/{series}")
            out.setdefault(s["MainDicomTags"]["Modality"], []).extend(s["Instances"])
    return out


@pytest.mark.skipif(
    not segmentation.WEIGHTS.exists(), reason="ct-segmentation weights not trained yet (ainode train ct-segmentation)"
)
def test_phantom_study_results_reach_orthanc_with_correct_segmentation(tmp_path, orthanc):
    phantom = phantoms.make_ct_phantom(4242, shape=(48, 64, 64))
    files = phantoms.write_ct_series(phantom, tmp_path / "study")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    storescu(orthanc.dicom_port, orthanc.aet, files)
    node = NodeProcess(
        tmp_path / "node",
        {
            "destinations": [
                {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
            "rules": [
                {
                    "name": "ct-seg",
                    "match": {"modality": "CT"},
                    "analyses": ["ct-segmentation"],
                    "destinations": ["pacs"],
                }
            ],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        },
    )
    with node:
        storescu(node.port, node.ae_title, files)
        arrived = wait_for(
            lambda: {"SEG", "SR", "KO"} <= set(result_series(orthanc, study_uid)), timeout=600, interval=1.0
        )
        assert arrived, node.log_text()[-4000:]
    series = result_series(orthanc, study_uid)
    assert len(series["CT"]) == len(files)  # results joined the source study as new series
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(orthanc.instance_file(series["SEG"][0]))))
    # write_ct_series writes one file per phantom slice k, in k order.
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    labels = {item.SegmentLabel: int(item.SegmentNumber) for item in seg.SegmentSequence}
    assert "liver" in labels
    decoded = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[labels["liver"]], assert_missing_frames_are_empty=True
    )[..., 0].astype(bool)
    truth = phantom.labels == 2
    dice = 2 * np.logical_and(decoded, truth).sum() / (decoded.sum() + truth.sum())
    print(f"end to end: liver Dice from the SEG fetched back from Orthanc = {dice:.3f}")
    assert dice > 0.8
