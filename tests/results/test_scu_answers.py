"""pynetdicom's requestor reactor must not drop the answer a ``send_*`` call waits for
(``node.core.dicom.answers_stay_with_the_sender``): shown on real associations to a real SCP."""

from __future__ import annotations

import pytest
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification

from node.core.dicom import answers_stay_with_the_sender
from tests.helpers import free_port


@pytest.fixture
def echo_scp():
    ae = AE(ae_title="ECHOSCP")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


def echo_answer() -> C_ECHO:
    rsp = C_ECHO()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.AffectedSOPClassUID = Verification
    rsp.Status = 0x0000
    return rsp


def associate(port: int, guarded: bool):
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHOSCP")
    assert assoc.is_established
    return answers_stay_with_the_sender(assoc) if guarded else assoc


def reactor_takes_the_answer(assoc) -> object:
    """What happens in the race: a sender waits (checkpoint cleared, as every send_* does) and
    the reactor, already past the checkpoint, takes the peer's answer off the DIMSE queue first.
    Returns what the sender's wait then finds."""
    assoc._reactor_checkpoint.clear()
    try:
        assoc._serve_request(echo_answer(), 1)  # the reactor's call for a message it took
        return assoc.dimse.get_msg(block=False)[1]  # the sender's wait
    finally:
        assoc._reactor_checkpoint.set()


def test_a_waiting_senders_answer_taken_by_the_reactor_goes_back_to_it(echo_scp):
    assoc = associate(echo_scp, guarded=True)
    try:
        answer = reactor_takes_the_answer(assoc)
        assert isinstance(answer, C_ECHO) and answer.MessageIDBeingRespondedTo == 1
        # Nobody waiting: the reactor's own handling (an unexpected answer is dropped), not re-queued.
        assoc._serve_request(echo_answer(), 1)
        assert assoc.dimse.get_msg(block=False) == (None, None)
        # The association still works end to end.
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_without_the_guard_pynetdicom_drops_it(echo_scp):
    """The failure the guard is for (pynetdicom 3.0.x): the sender would wait its DIMSE timeout."""
    assoc = associate(echo_scp, guarded=False)
    try:
        assert reactor_takes_the_answer(assoc) is None
    finally:
        assoc.release()
