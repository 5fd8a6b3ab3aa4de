"""The portable time-to-result bench (bench/time_to_result_portable.py, run on the lent GPU
machine): its node runs on the embedded broker, its test PACS acknowledges an object only once
the object is on disk (what the bench counts as "in the PACS"), and its big phantom, rendered in
several processes, is the phantom one process renders."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE

from node.core.settings import load_settings
from node.demo import PACS_AE, BuiltinPACS
from node.jobs.broker import embedded
from tests.helpers import REPO_ROOT
from workers.synthetic import phantoms

sys.path.insert(0, str(REPO_ROOT / "bench"))

from time_to_result_portable import median_of, node_config  # noqa: E402


def test_the_bench_node_runs_on_the_embedded_broker_and_sends_to_the_pacs(tmp_path: Path):
    path = tmp_path / "ainode.yaml"
    path.write_text(yaml.safe_dump(node_config(tmp_path, 11112, 11113)))
    settings = load_settings(path)  # extra=forbid: a misspelt setting fails here, not on the device
    assert embedded(settings)
    assert [d.port for d in settings.destinations] == [11113]
    assert settings.rules[0].destinations == ["pacs"]


def test_the_builtin_pacs_has_the_object_on_disk_when_it_acknowledges(tmp_path: Path):
    pacs = BuiltinPACS(tmp_path / "pacs")
    pacs.start()
    try:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ae = AE(ae_title="NODE")
        ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=PACS_AE)
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        stored = (tmp_path / "pacs" / f"{ds.SOPInstanceUID}.dcm").exists()  # looked at right on the answer
        assoc.release()
        assert status.Status == 0
        assert stored
        assert list(pacs.objects(ds.StudyInstanceUID)) == [ds.SOPInstanceUID]
    finally:
        pacs.stop()


def test_median_of_reads_a_path_into_each_run():
    runs = [{"stages": {"run": 3.0}}, {"stages": {"run": 1.0}}, {"stages": {"run": 2.0}}]
    assert median_of(runs, "stages", "run") == 2.0


def test_a_phantom_rendered_in_several_processes_is_the_one_rendered_in_one():
    one = phantoms.make_ct_phantom(3, shape=(17, 48, 48), spacing=(12.0, 8.0, 8.0))
    three = phantoms.make_ct_phantom(3, shape=(17, 48, 48), spacing=(12.0, 8.0, 8.0), processes=3)
    assert np.array_equal(one.labels, three.labels)
    assert np.allclose(one.hu, three.hu, atol=1e-3)
    assert (one.labels > 0).any()
