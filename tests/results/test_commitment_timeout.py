"""Storage commitment whose N-EVENT-REPORT never comes: asked again after the timeout, then failed."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from node.core.db import init_db, session_scope
from node.dispatch.commitment import commitments_overdue
from node.dispatch.outbox import status_summary
from node.dispatch.table import DELIVERED
from tests.helpers import free_port, wait_for
from tests.results.test_dispatcher import (
    KOS_SOP,
    SEG_SOP,
    SR_SOP,
    enqueue,
    make_settings,
    results,
    rows,
    run_until_settled,
)


class SilentCommitmentSCP:
    """Stores what it is sent and accepts Storage Commitment requests (N-ACTION Success), but never
    sends the N-EVENT-REPORT: the PACS that forgot, or whose report cannot reach the node."""

    def __init__(self, aet: str = "SILENT"):
        self.aet, self.port = aet, free_port()
        self.transactions: list[str] = []
        ae = AE(ae_title=aet)
        for sop_class in (SEG_SOP, SR_SOP, KOS_SOP):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(StorageCommitmentPushModel)
        handlers = [(evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_N_ACTION, self._on_action)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _on_action(self, event):  # noqa: ANN001
        self.transactions.append(str(event.action_information.TransactionUID))
        return 0x0000, None

    def stop(self) -> None:
        self._server.shutdown()


def test_commitment_without_report_is_requested_again_then_failed(ct, tmp_path):
    pacs = SilentCommitmentSCP()
    try:
        dest = {
            "name": "pacs",
            "ae_title": pacs.aet,
            "host": "127.0.0.1",
            "port": pacs.port,
            "storage_commitment": True,
            "storage_commitment_timeout_s": 0.5,
            "storage_commitment_retries": 1,
        }
        settings = make_settings(tmp_path, [dest])
        paths = results(ct, tmp_path)
        enqueue(settings, paths, ["pacs"])
        assert run_until_settled(settings)
        first = rows(settings)
        assert {(r.state, r.commitment, r.commitment_requests) for r in first} == {(DELIVERED, "requested", 1)}
        assert len(pacs.transactions) == 1

        # No report: after the timeout it is asked again, with a new transaction.
        assert wait_for(lambda: commitments_overdue(settings).get("pacs", {}).get("requested_again"), timeout=60)
        again = rows(settings)
        assert {(r.commitment, r.commitment_requests) for r in again} == {("requested", 2)}
        assert len(pacs.transactions) == 2 and len(set(pacs.transactions)) == 2
        assert {r.transaction_uid for r in again} == {pacs.transactions[1]}

        # Still no report: the retries are spent, so the commitment fails with the reason.
        assert wait_for(lambda: commitments_overdue(settings).get("pacs", {}).get("failed"), timeout=60)
        last = rows(settings)
        assert {(r.state, r.commitment) for r in last} == {(DELIVERED, "failed")}
        assert {r.reason for r in last} == {"storage commitment: no N-EVENT-REPORT after 2 requests (0.5 s each)"}
        assert len(pacs.transactions) == 2  # not asked a third time
        assert commitments_overdue(settings) == {}
        with session_scope(init_db(settings.database.url)) as session:
            summary = status_summary(session)["destinations"]["pacs"]
        assert summary["commitment"] == {"requested": 0, "committed": 0, "failed": len(paths)}
        assert summary["commitment_failures"][0]["reason"].startswith("storage commitment: no N-EVENT-REPORT")
    finally:
        pacs.stop()
