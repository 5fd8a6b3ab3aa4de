"""The node process (`ainode serve`): receivers sharing the DICOM port, and every stage's work.

The main process forks N receiver processes (``node.receivers``; 0 = one per core, at most 4),
each binding the port with SO_REUSEPORT so the kernel spreads associations across them. The main
process then runs each later stage's periodic tasks and services (see docs/architecture.md), and
restarts a receiver that dies. SIGTERM: receivers stop accepting, finish their open associations
and exit; then periodic work and services stop; exit status 0.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable

from node import assembler, retention, router
from node.admin import api
from node.core import audit
from node.core.db import dispose_engines, engine_for, init_db
from node.core.errors import describe_error
from node.core.logs import configure_logging
from node.core.migrations import SchemaError
from node.core.settings import Settings
from node.core.wake import StudyWake
from node.dispatch import commitment, outbox
from node.ingest import mpps, store
from node.ingest.indexer import Indexer
from node.ingest.policy import AssociationSlots
from node.ingest.receiver import Receiver
from node.ingest.recovery import recover_all
from node.jobs import embedded, reconciler
from node.workflow import events as ups_events
from node.workflow import performer as ups_performer
from node.workflow import retrieve
from node.workflow import scp as ups_scp
from workers.analysis.intended import declared_uses

log = logging.getLogger("ainode.service")

# (name, interval_s, function), or (name, interval_s, function, wake): a task naming a wake (the
# StudyWake the receivers notify) also runs as soon as it is notified, and its function is told
# whether the wake started the pass (``woken``). None as wake: the interval only.
PeriodicTask = tuple[str, float, Callable[[], None]] | tuple[str, float, Callable[..., None], StudyWake | None]
PeriodicHook = Callable[[Settings], list[PeriodicTask]]
ServiceHook = Callable[[Settings], list[Callable[[], None]]]

_PR_SET_PDEATHSIG = 1
_READY_TIMEOUT_S = 60.0


def installed_analyses(settings: Settings) -> list[dict[str, Any]]:
    """The analyses this installation can run (name, version, whether its weights are present),
    for the admin API's worker view: the node learns them from the analysis side here, at the
    composition root, so the API itself never imports the workers (it logs a failure here)."""
    # Imported when the API first asks, not at the top: the registry brings torch and MONAI
    # (measured 1.7 s and 270 MiB of RSS), which every forked receiver process would carry.
    from workers.analysis.registry import available_analyses, weights_present  # noqa: PLC0415

    return [
        {"name": a.name, "version": getattr(a, "version", ""), "weights": weights_present(a)}
        for a in available_analyses(settings).values()
    ]


def periodic_stages(study_wake: StudyWake | None = None) -> tuple[tuple[str, PeriodicHook], ...]:
    """The later stages, in pipeline order, and what each runs periodically. ``study_wake``: what
    the receivers notify when a study may have just become complete; it wakes the assembler."""
    return (
        ("assembler", lambda settings: assembler.periodic_tasks(settings, wake=study_wake)),
        # The analyses' intended uses (torch-free declarations) are checked before queuing.
        ("router", lambda settings: router.periodic_tasks(settings, intended_uses=declared_uses(settings))),
        ("reconciler", reconciler.periodic_tasks),
        ("dispatcher", outbox.periodic_tasks),
        ("api", api.periodic_tasks),
        ("retention", retention.periodic_tasks),
        ("workflow", ups_events.periodic_tasks),
        # The Task Performer answers to the codes of the analyses the node declares.
        ("performer", lambda settings: ups_performer.periodic_tasks(settings, analyses=declared_uses(settings))),
    )


# The later stages' services, in pipeline order.
SERVICE_STAGES: tuple[tuple[str, ServiceHook], ...] = (
    ("jobs", embedded.start_services),
    ("api", lambda settings: api.start_services(settings, analyses=installed_analyses)),
    # What C-GET and WADO-RS retrievals stored is indexed before the node stops.
    ("workflow", lambda settings: [retrieve.stop_retrieval_stores]),
)


def receiver_count(settings: Settings) -> int:
    """How many receiver processes to run."""
    return settings.node.receivers or max(1, min(4, os.cpu_count() or 1))


def commitment_handlers(settings: Settings) -> list[tuple[Any, Callable[..., Any]]]:
    """Storage Commitment N-EVENT-REPORT handlers, when a destination asks for commitment."""
    if not any(d.storage_commitment for d in settings.destinations):
        return []
    return list(commitment.commitment_handlers(settings))


# --- receiver processes ----------------------------------------------------------------------


def _die_with_parent() -> None:
    # A receiver must never outlive the node (kill -9 of `ainode serve` must free the port).
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def run_receiver(settings: Settings, slots: Any, row: int, ready: Any, parent_pid: int, study_wake: StudyWake) -> None:
    """Body of one receiver process: serve until SIGTERM, then drain open associations.
    ``study_wake`` (the pool's) is notified when a study may have just become complete."""
    _die_with_parent()
    if os.getppid() != parent_pid:
        os._exit(1)
    study_wake.close_read_end()  # only the main process waits on it
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the main process's business
    dispose_engines()  # connections are never shared across fork
    audit.configure(settings.audit, settings.node.ae_title)  # refused peers are Security Alerts
    receiver = Receiver(
        settings,
        engine_for(settings.database.url),
        slots,
        row,
        mpps.handlers(settings, study_may_be_complete=study_wake.notify),
        commitment_handlers(settings),
        ups_sop_classes=ups_scp.SOP_CLASSES,
        ups_handlers=ups_scp.handlers(settings),
        study_may_be_complete=study_wake.notify,
    )
    receiver.recover()  # what this receiver's predecessor answered but did not index
    try:
        server = receiver.start()
    except OSError as err:
        log.error("receiver %d cannot listen on %s:%d: %s", row, settings.node.host, settings.node.port, err.strerror)
        os._exit(3)
    ready.set()
    stop.wait()
    # Stop accepting; associations already open run to their end (peer release or timeouts).
    server.shutdown()
    _drain(server)
    receiver.indexer.stop()
    if receiver.volume_streamer is not None:  # a cache: what it has not decoded is read from files
        receiver.volume_streamer.stop(timeout=5.0)
    audit.trail().close(timeout=1.0)
    dispose_engines()
    logging.shutdown()
    os._exit(0)


def _drain(server: Any) -> None:
    # Established (or negotiating) associations run to their end: peer release, or the DIMSE
    # and network timeouts. A connection that has not asked for an association (a port probe,
    # a stalled peer) has nothing to finish and is dropped when the process exits.
    def busy(assoc: Any) -> bool:
        if assoc.is_established:
            return True
        asked = assoc.requestor.primitive is not None
        return asked and not (assoc.is_rejected or assoc.is_aborted or assoc.is_released)

    while any(busy(a) for a in server.active_associations):
        time.sleep(0.05)


def recover_landed(settings: Settings) -> None:
    """Index every instance answered Success before a crash but not indexed (before receivers run)."""
    indexer = Indexer(
        engine_for(settings.database.url), settings.storage.path, settings.node.duplicate_policy, background=False
    )
    audit.configure(settings.audit, settings.node.ae_title)  # quarantined instances are audited
    try:
        recover_all(indexer, settings.node.ae_title)
    except Exception as err:  # each receiver tries its own share again in the background
        log.error("indexing landed instances failed: %s", describe_error(err))


class ReceiverPool:
    """The receiver processes, supervised from the main process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.count = receiver_count(settings)
        self._ctx = multiprocessing.get_context("fork")
        self.slots = AssociationSlots.create(self._ctx, self.count, settings.peers)
        self._procs: list[Any] = [None] * self.count
        # Notified by any receiver, its restarted successors included (each forked with the same
        # pipe), when a study may have just become complete (MPPS step ended, an ended
        # association's last instances indexed).
        self.study_wake = StudyWake()

    def _spawn(self, row: int) -> bool:
        ready = self._ctx.Event()
        proc = self._ctx.Process(
            target=run_receiver,
            name=f"receiver-{row}",
            daemon=False,
            args=(self.settings, self.slots, row, ready, os.getpid(), self.study_wake),
        )
        proc.start()
        self._procs[row] = proc
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready.wait(0.05):
                return True
            if not proc.is_alive():
                return False
        return False

    def start(self) -> bool:
        """Start every receiver; False when one cannot listen (port taken, bad TLS files...)."""
        for row in range(self.count):
            if not self._spawn(row):
                self.stop()
                return False
        log.info(
            "%d receiver process(es) listening on %s:%d as %s",
            self.count,
            self.settings.node.host,
            self.settings.node.port,
            self.settings.node.ae_title,
        )
        return True

    def supervise(self) -> None:
        """Restart receivers that died (their association slots are freed first)."""
        for row, proc in enumerate(self._procs):
            if proc is not None and not proc.is_alive():
                log.error("receiver %d exited with status %s; restarting it", row, proc.exitcode)
                self.slots.clear_row(row)
                self._spawn(row)

    def stop(self) -> None:
        """SIGTERM every receiver and wait until each has finished its associations."""
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            if proc is not None:
                proc.join()

    def close(self) -> None:
        """Close the wake's pipe, once the receivers and the thread waiting on it have ended."""
        self.study_wake.close()


# --- periodic work and services of the later stages ------------------------------------------


def _next_pass(interval: float, stop: threading.Event, wake: StudyWake | None) -> bool:
    """Wait for the next pass: ``interval`` seconds, or less when ``wake`` is notified (then True).
    The wake's notifications are consumed before the pass, so one made while the pass runs brings
    another at once."""
    if wake is None:
        stop.wait(interval)
        return False
    return wake.wait(interval)


def _run_periodic(
    name: str, interval: float, func: Callable[..., None], stop: threading.Event, wake: StudyWake | None = None
) -> None:
    """Run ``func`` every ``interval`` seconds, and at once when ``wake`` is notified, until ``stop``."""
    while True:
        woken = _next_pass(interval, stop, wake)
        if stop.is_set():
            return
        try:
            if wake is None:
                func()
            else:
                func(woken=woken)
        except Exception as err:  # a failing task must not stop the node; it runs again later
            log.error("periodic task %s failed: %s", name, describe_error(err))


class PeriodicTasks:
    """The threads running every stage's periodic tasks, and the last passes some want at a stop."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.at_stop: list[tuple[str, Callable[[], None]]] = []
        self.wakes: list[StudyWake] = []  # the wakes the threads wait on (notified at the stop)

    def finish(self, timeout: float = 5.0) -> None:
        """Wait for the threads (the stop event is set), then run the passes marked ``run_at_stop``
        once more, in order: they see what the other stages did up to their last moment (the
        audit's last transfers would otherwise belong to no run)."""
        for wake in self.wakes:  # a thread waiting on its wake sees the stop now, not after its interval
            wake.notify()
        for t in self.threads:
            t.join(timeout=timeout)
        for name, func in self.at_stop:
            try:
                func()
            except Exception as err:
                log.error("last pass of %s failed: %s", name, describe_error(err))


def start_periodic(settings: Settings, stop: threading.Event, study_wake: StudyWake | None = None) -> PeriodicTasks:
    """One thread per (name, interval, function[, wake]) from every stage's ``periodic_tasks``;
    ``study_wake`` (notified by the receivers) wakes the assembler."""
    tasks_run = PeriodicTasks()
    for stage, hook in periodic_stages(study_wake):
        try:
            tasks = hook(settings) or []
        except Exception as err:
            log.error("%s: periodic tasks not started: %s", stage, err)
            continue
        for name, interval, func, *wake in tasks:
            wake_event = wake[0] if wake else None
            t = threading.Thread(
                target=_run_periodic,
                args=(name, float(interval), func, stop, wake_event),
                name=f"periodic-{name}",
                daemon=True,
            )
            t.start()
            tasks_run.threads.append(t)
            if wake_event is not None:
                tasks_run.wakes.append(wake_event)
            if getattr(func, "run_at_stop", False):
                tasks_run.at_stop.append((name, func))
    return tasks_run


def start_stage_services(settings: Settings) -> list[Callable[[], None]]:
    """Start every stage's long-running services; return their stop functions."""
    stoppers: list[Callable[[], None]] = []
    for stage, hook in SERVICE_STAGES:
        try:
            stoppers.extend(hook(settings) or [])
        except Exception as err:
            log.error("%s: services not started: %s", stage, err)
    return stoppers


def serve(settings: Settings) -> int:
    """Run the node until SIGTERM or SIGINT; 0 on a clean stop, non-zero when it cannot start."""
    configure_logging()
    try:
        init_db(settings.database.url)
    except SchemaError as err:
        log.error("cannot start: %s", err)
        return 2
    if settings.api.enabled:
        try:
            api.api_tls_context(settings)  # a broken HTTPS setup must not leave the API on plain HTTP
        except ValueError as err:
            log.error("cannot start: %s", err)
            return 2
    store.prepare_root(settings.storage.path)
    recover_landed(settings)
    dispose_engines()  # the receivers fork next: no open connections may cross the fork
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # SIGHUP means "reload the rules", never "stop": ignored until the router installs its
    # handler, and the receivers (forked next) inherit the ignore and keep serving.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pool = ReceiverPool(settings)
    if not pool.start():
        pool.close()
        return 3
    periodic = start_periodic(settings, stop, pool.study_wake)
    stoppers = start_stage_services(settings)
    while not stop.wait(0.5):
        pool.supervise()
    log.info("stopping: receivers finish their open associations")
    pool.stop()
    periodic.finish()  # before the services stop: the audit trail takes the last pass's messages
    pool.close()  # after finish: no thread waits on the wake any more
    for stopper in stoppers:
        try:
            stopper()
        except Exception as err:
            log.error("stopping a service failed: %s", describe_error(err))
    dispose_engines()
    log.info("stopped")
    return 0
