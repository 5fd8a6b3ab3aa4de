"""kill -9 of the Celery worker that is delivering: every result still arrives, once per object."""

from __future__ import annotations

import pydicom
import pytest
import yaml

from node.core.db import init_db, session_scope
from node.core.settings import CapabilityProfile, load_settings
from node.dispatch.outbox import DELIVERED, enqueue_results
from node.jobs.broker import publish_delivery
from tests.helpers import wait_for
from tests.jobs.conftest import RedisServer, Worker
from tests.results.peers import StoreSCP
from tests.results.synthetic import segmentation_findings
from tests.results.test_dispatcher import rows, run_until_settled
from workers.results import ResultContext, write_results

pytestmark = pytest.mark.slow

SC_SOP = "1.2.840.10008.5.1.4.1.1.7"
RESULT_SOPS = ["1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.59", SC_SOP]


def test_worker_killed_mid_delivery(ct, tmp_path):
    redis = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis.start()
    pacs = StoreSCP(RESULT_SOPS, aet="SLOWPACS", delay_s=0.4).start()
    worker = None
    try:
        config = {
            "node": {"ae_title": "AINODE", "acse_timeout_s": 5, "dimse_timeout_s": 5, "network_timeout_s": 5},
            "database": {"url": f"sqlite:///{tmp_path}/ainode.db"},
            "broker": {"url": redis.url},
            "storage": {"path": str(tmp_path / "store")},
            "audit": {"path": str(tmp_path / "audit.log")},
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": "SLOWPACS",
                    "host": "127.0.0.1",
                    "port": pacs.port,
                    "retry_initial_s": 0.5,
                    "retry_max_s": 2,
                    "capabilities": {"secondary_capture": True},
                }
            ],
        }
        config_path = tmp_path / "ainode.yaml"
        config_path.write_text(yaml.safe_dump(config))
        settings = load_settings(config_path)
        volume, _ = ct
        outputs = write_results(
            segmentation_findings(volume),
            ResultContext(
                job_key="kill", output_dir=tmp_path / "out", destinations=[CapabilityProfile(secondary_capture=True)]
            ),
        )
        expected = sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in outputs)
        assert len(expected) >= 8

        init_db(settings.database.url)
        worker = Worker(config_path, queues="cpu")
        with session_scope(init_db(settings.database.url)) as session:
            ids = enqueue_results(session, 1, outputs, ["pacs"])
        assert publish_delivery(settings, ids[0])

        assert wait_for(lambda: len(pacs.answers) >= 3, timeout=180), worker.output()[-3000:]
        worker.kill9()  # mid-association: the rest of the batch is claimed by a dead process
        done_by_worker = [r for r in rows(settings) if r.state == DELIVERED]
        assert 2 <= len(done_by_worker) < len(expected)  # answers were recorded as they came

        # The node's periodic delivery pass takes over once the dead worker's lease runs out.
        assert run_until_settled(settings, timeout=300)
        assert {r.state for r in rows(settings)} == {DELIVERED}
        assert sorted(set(pacs.received)) == expected
        # Only the object in flight at the kill may reach the PACS twice (same UID: idempotent).
        assert len(pacs.received) <= len(expected) + 1
    finally:
        if worker is not None:
            worker.stop()
        pacs.stop()
        redis.stop()
