"""The receivers wake the assembler when a study may have just become complete (an MPPS step
ended, an ended association's last instances indexed), instead of leaving it to the next tick.

Every wait here is an hour long where only the wake can end it sooner: what ends it is the wake.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep
from sqlalchemy import func, select

from node import assembler
from node.core.db import dispose_engines, engine_for, session_scope
from node.core.wake import StudyWake
from node.index import Instance
from node.ingest import mpps
from node.ingest.policy import AssociationSlots
from node.ingest.receiver import Receiver
from node.service import PeriodicTasks, ReceiverPool, _run_periodic
from tests.helpers import free_port
from tests.jobs.test_completion_and_routing import _mpps_completed, _mpps_create

AN_HOUR = 3600.0
FORK = multiprocessing.get_context("fork")
MODALITY = [{"ae_title": "MODALITY", "hosts": ["127.0.0.1"]}]


def _notify_from_another_process(wake: StudyWake) -> None:
    child = FORK.Process(target=wake.notify)
    child.start()
    child.join(60)
    assert child.exitcode == 0


def _notify_forever(wake: StudyWake) -> None:
    wake.close_read_end()
    while True:
        wake.notify()


def test_a_wake_from_another_process_runs_the_periodic_pass_before_its_interval():
    stop, wake = threading.Event(), StudyWake()
    passes: list[tuple[bool, bool]] = []  # (woken, wake still pending when the pass ran)
    ran = threading.Event()

    def task(woken: bool = False) -> None:
        passes.append((woken, wake.pending()))
        ran.set()

    periodic = PeriodicTasks()
    thread = threading.Thread(target=_run_periodic, args=("assembler", AN_HOUR, task, stop, wake), daemon=True)
    thread.start()
    periodic.threads.append(thread)
    periodic.wakes.append(wake)
    try:
        _notify_from_another_process(wake)
        assert ran.wait(60), "the wake did not start a pass"
        assert passes == [(True, False)]  # woken, and the wake consumed before the pass
        stop.set()
        periodic.finish(timeout=60)  # notifies the wakes: the thread sees the stop without its hour's wait
        assert not thread.is_alive()
        assert passes == [(True, False)]  # no pass after the stop
    finally:
        wake.close()


def test_a_notifier_killed_with_sigkill_leaves_the_wake_working():
    # A multiprocessing.Event's lock stays held when its holder is killed inside set(): the
    # waiter would block for good. The pipe holds nothing: a later notify still wakes the waiter.
    wake = StudyWake()
    try:
        for _ in range(3):  # each kill lands anywhere in notify()
            wake.wait(0)  # what the last one left: the next wait is this one's
            notifier = FORK.Process(target=_notify_forever, args=(wake,))
            notifier.start()
            assert wake.wait(60), "the notifier did not notify"
            os.kill(notifier.pid, signal.SIGKILL)
            notifier.join(60)
            assert notifier.exitcode == -signal.SIGKILL
        wake.wait(0)  # what the killed notifiers left pending
        assert not wake.pending()
        results: list[bool] = []
        waiter = threading.Thread(target=lambda: results.append(wake.wait(AN_HOUR)), daemon=True)
        waiter.start()
        _notify_from_another_process(wake)
        waiter.join(60)
        assert results == [True], "a notify after the kills did not wake the waiter"
    finally:
        wake.close()


def test_a_closed_wake_neither_blocks_nor_fails():
    wake = StudyWake()
    wake.notify()
    wake.close()
    wake.close()
    wake.notify()  # a receiver telling a stopping node: nothing happens
    assert not wake.wait(AN_HOUR) and not wake.pending()


def test_a_full_pipe_is_a_pending_wake_and_one_wait_consumes_it_all():
    wake = StudyWake()
    try:
        for _ in range(100_000):  # more than a pipe holds: the notifies beyond it are dropped
            wake.notify()
        assert wake.wait(AN_HOUR)
        assert not wake.pending() and not wake.wait(0)
    finally:
        wake.close()


def test_a_woken_completion_ticker_runs_its_pass_though_nothing_was_committed(make_settings, monkeypatch):
    settings = make_settings()
    ticker = assembler.CompletionTicker(settings)
    passes = []
    real_tick = assembler.tick
    monkeypatch.setattr(assembler, "tick", lambda s: (passes.append(1), real_tick(s)))
    ticker()
    ticker()
    ticker()
    assert len(passes) <= 2 and not ticker.in_progress  # idle: the gate skips (its first pass aside)
    before = len(passes)
    ticker(woken=True)
    assert len(passes) == before + 1


def _mpps_over_dicom(port: int, study_uid: str, final: str = "COMPLETED") -> list[int]:
    """N-CREATE, an N-SET that keeps the step IN PROGRESS, the N-SET ending it, and one more
    N-SET (refused: a final step may no longer be updated). Returns the four statuses."""
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(ModalityPerformedProcedureStep)
    assoc = scu.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    try:
        step = generate_uid()
        statuses = [assoc.send_n_create(_mpps_create(study_uid), ModalityPerformedProcedureStep, step)[0].Status]
        still = Dataset()
        still.PerformedProcedureStepStatus = "IN PROGRESS"
        statuses.append(assoc.send_n_set(still, ModalityPerformedProcedureStep, step)[0].Status)
        done = _mpps_completed(study_uid + ".1", [study_uid + ".1.1"], status=final)
        statuses.append(assoc.send_n_set(done, ModalityPerformedProcedureStep, step)[0].Status)
        statuses.append(assoc.send_n_set(done, ModalityPerformedProcedureStep, step)[0].Status)
    finally:
        assoc.release()
    return statuses


@pytest.mark.parametrize("final", ["COMPLETED", "DISCONTINUED"])
def test_an_ended_mpps_step_wakes_once_it_is_committed(make_settings, final):
    settings = make_settings()
    seen: list[str] = []  # the step's status as another connection reads it, at each wake

    def study_may_be_complete() -> None:
        with session_scope(engine_for(settings.database.url)) as session:
            seen.append(session.scalar(select(mpps.PerformedProcedureStep.status)))

    scp = AE(ae_title="AINODE")
    scp.add_supported_context(ModalityPerformedProcedureStep)
    port = free_port()
    handlers = mpps.handlers(settings, study_may_be_complete=study_may_be_complete)
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        statuses = _mpps_over_dicom(port, "1.2.7.1", final)
    finally:
        server.shutdown()
    assert statuses == [0, 0, 0, mpps.MAY_NO_LONGER_BE_UPDATED]
    assert seen == [final]  # only the N-SET that ended the step, after its commit


def _ct_instance(study_uid: str, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, study_uid + ".1"
    ds.PatientID, ds.PatientName, ds.Modality, ds.InstanceNumber = "WAKE1", "Wake^Test", "CT", number
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = bytes(32)
    return ds


def _instances(settings) -> int:
    with session_scope(engine_for(settings.database.url)) as session:
        return session.scalar(select(func.count(Instance.id)))


def test_the_receiver_wakes_once_an_ended_association_s_instances_are_indexed(make_settings):
    port = free_port()
    settings = make_settings(node={"host": "127.0.0.1", "port": port, "receivers": 1}, peers=MODALITY)
    indexed_at_wake: list[int] = []
    woken = threading.Event()

    def study_may_be_complete() -> None:
        indexed_at_wake.append(_instances(settings))
        woken.set()

    slots = AssociationSlots.create(FORK, 1, settings.peers)
    receiver = Receiver(settings, engine_for(settings.database.url), slots, study_may_be_complete=study_may_be_complete)
    receiver.indexer._linger = AN_HOUR  # lone arrivals wait for company: only the association's end ends it
    receiver.recover()
    server = receiver.start()
    try:
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        for number in (1, 2):
            assert assoc.send_c_store(_ct_instance("1.2.7.2", number)).Status == 0
        assert not woken.is_set() and _instances(settings) == 0  # answered, lingering for company
        assoc.release()
        assert woken.wait(60), "the end of the association did not wake the assembler"
        assert indexed_at_wake == [2]  # told after the batch's commit
    finally:
        server.shutdown()
        receiver.indexer.stop()
        if receiver.volume_streamer is not None:
            receiver.volume_streamer.stop(timeout=5.0)
        dispose_engines()


def test_every_receiver_process_notifies_the_pool_s_wake_a_restarted_one_too(make_settings):
    port = free_port()
    settings = make_settings(node={"host": "127.0.0.1", "port": port, "receivers": 1}, peers=MODALITY)
    dispose_engines()  # no connection may cross the fork
    pool = ReceiverPool(settings)
    assert pool.start()
    try:
        assert not pool.study_wake.pending()
        assert _mpps_over_dicom(port, "1.2.7.3")[2] == 0
        assert pool.study_wake.wait(60), "the receiver's MPPS N-SET did not wake the assembler"
        crashed = pool._procs[0]
        os.kill(crashed.pid, signal.SIGKILL)
        crashed.join(60)
        pool.supervise()  # restarts it
        assert pool._procs[0] is not crashed and pool._procs[0].is_alive()
        assert _mpps_over_dicom(port, "1.2.7.4")[2] == 0
        assert pool.study_wake.wait(60), "the restarted receiver does not share the pool's wake"
    finally:
        pool.stop()
        pool.close()
