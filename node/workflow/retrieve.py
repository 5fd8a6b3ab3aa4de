"""Query/Retrieve SCU: fetch a study the node does not hold (or its missing part) from a source.

``retrieve_study(settings, study_uid, source)`` asks the source what it holds for the study
(Study Root C-FIND at SERIES then IMAGE level, or QIDO-RS), compares that with the node's index,
and fetches only what is missing:

* ``c-move``: the source sends the instances to the node's own AE title; they arrive through the
  node's C-STORE receiver (durable, then indexed, as every C-STORE). The source must know the node
  (its AE title, host and port), and the node's receivers must be running.
* ``c-get``: the instances come back on the node's own association (the node plays the Storage
  SCP role for the storage contexts it proposes), and each goes through the receiver's store path
  (``Receiver.store_retrieved``: the same checks, journal or landed file, and index row).
* ``wado-rs``: QIDO-RS to list the instances, WADO-RS to fetch each; stored the same way.

It returns once what was fetched is in the index (or the time ran out), with counts of the
sub-operations and a precise error when it failed. Every instance stored is complete and durable:
a source that goes down part way leaves the instances that arrived, never half of one. It knows
nothing of jobs or UPS: the on-demand analysis (``node.workflow.ondemand``) and a UPS performer
call it. Logs name studies by a short hash of their UID, never by patient data.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from node.core.db import engine_for, session_scope
from node.core.dicom import answers_stay_with_the_sender
from node.core.errors import describe_error
from node.core.settings import Settings, Source
from node.index import NODE_OUTPUT, Instance, Patient, Series, Study
from node.ingest.arrival import instance_tag
from node.ingest.receiver import TRANSFER_SYNTAXES, Receiver

log = logging.getLogger("ainode.retrieve")

# The receiver row (journal and file prefix ``r99-``) of the in-process store that keeps what
# C-GET and WADO-RS bring; rows 0..63 are the listener's receiver processes.
RETRIEVAL_ROW = 99
# An association proposes at most 128 presentation contexts: one is the C-GET model.
_MAX_STORAGE_CONTEXTS = 127
# The index follows the receiver's Success answer within a batch: how long to wait for it at most.
_INDEX_WAIT_S = 60.0
_QUERY_CHUNK = 500

# PS3.4 C.4.2.1.5 / C.4.3.1.4: statuses of a C-MOVE / C-GET response.
_STATUS_TEXT = {
    0xA701: "refused: out of resources (number of matches)",
    0xA702: "refused: out of resources (sub-operations)",
    0xA801: "refused: move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xC000: "unable to process",
    0xFE00: "cancelled",
    0xB000: "sub-operations complete, one or more failures or warnings",
}


class RetrieveError(Exception):
    """A retrieval that could not be done; the message says why, precisely."""


class SourceUnavailable(RetrieveError):
    """The source cannot be reached or refused the association."""


class StudyNotFound(RetrieveError):
    """The source holds no instance of the study."""


@dataclass
class SourceInstance:
    """One instance the source holds for the study (from C-FIND or QIDO-RS)."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ""


@dataclass
class PriorStudy:
    """An earlier study of the same patient at the source."""

    study_uid: str
    study_date: str = ""
    study_time: str = ""


@dataclass
class RetrieveOutcome:
    """What a retrieval did: counts, and the error when it failed (``ok`` is False then)."""

    study_uid: str
    source: str
    method: str
    state: str = "failed"  # retrieved | held (nothing was missing) | failed
    at_source: int = 0  # instances the source holds for the study
    held_before: int = 0  # of those, already in the node's index
    completed: int = 0
    failed: int = 0
    warning: int = 0
    not_indexed: int = 0  # of the source's instances, still not in the index at the end
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the node now holds every instance the source has for the study."""
        return self.state in ("retrieved", "held")

    def as_dict(self) -> dict[str, Any]:
        """The outcome for the API and logs."""
        return asdict(self) | {"ok": self.ok}


# --- the entry point ---------------------------------------------------------------------------


def retrieve_study(
    settings: Settings,
    study_uid: str,
    source: str | Source,
    method: str | None = None,
    progress: Callable[[RetrieveOutcome], None] | None = None,
) -> RetrieveOutcome:
    """Bring every instance of ``study_uid`` that ``source`` holds and the node does not into the
    node's store and index. ``source`` is a configured source's name (or the Source); ``method``
    overrides its configured one. ``progress`` is called with the outcome as it changes.
    Never raises for a failed retrieval: the outcome says what happened."""
    started = time.monotonic()
    try:
        src = settings.source(source) if isinstance(source, str) else source
    except KeyError:
        known = ", ".join(s.name for s in settings.sources) or "none configured"
        return RetrieveOutcome(
            study_uid, str(source), method or "", error=f"unknown source {source!r} (known: {known})"
        )
    how = method or src.method
    outcome = RetrieveOutcome(study_uid, src.name, how)
    report = progress or (lambda _: None)
    try:
        fetcher = _WadoRs(settings, src) if how == "wado-rs" else _Dimse(settings, src, how)
        instances = fetcher.find(study_uid)
        if not instances:
            raise StudyNotFound(f"source {src.name} holds no instance of study {study_uid}")
        wanted = [i.sop_instance_uid for i in instances]
        held = held_instances(settings, wanted)
        outcome.at_source, outcome.held_before = len(wanted), len(held)
        missing = [i for i in instances if i.sop_instance_uid not in held]
        report(outcome)
        if missing:
            fetcher.fetch(study_uid, instances, missing, outcome, report)
            outcome.not_indexed = _wait_indexed(settings, wanted, started + src.timeout_s)
        _conclude(outcome, bool(missing))
    except RetrieveError as err:
        outcome.state, outcome.error = "failed", str(err)
    except Exception as err:  # noqa: BLE001 - the outcome carries every failure, with its cause
        outcome.state, outcome.error = "failed", f"retrieval from {src.name} failed: {describe_error(err)}"
    outcome.seconds = round(time.monotonic() - started, 3)
    _log(outcome)
    report(outcome)
    return outcome


def find_prior_studies(settings: Settings, study_uid: str, source: str | Source) -> list[PriorStudy]:
    """The same patient's earlier studies of the same modality at ``source``, most recent first.

    The study itself must be in the node's index (its Patient ID, date and modalities are read
    there). Studies without a date, or dated after the study, are left out. RetrieveError when the
    source cannot be asked.
    """
    try:
        src = settings.source(source) if isinstance(source, str) else source
    except KeyError:
        raise RetrieveError(f"unknown source {source!r}") from None
    patient_id, study_date, study_time, modalities = _study_facts(settings, study_uid)
    if not patient_id or not modalities:
        return []
    fetcher = _WadoRs(settings, src) if src.method == "wado-rs" else _Dimse(settings, src, src.method)
    found: dict[str, PriorStudy] = {}
    for modality in modalities:
        for prior in fetcher.find_studies(patient_id, modality):
            if (
                prior.study_uid != study_uid
                and prior.study_date
                and (prior.study_date, prior.study_time)
                <= (
                    study_date or "99999999",
                    study_time,
                )
            ):
                found[prior.study_uid] = prior
    return sorted(found.values(), key=lambda p: (p.study_date, p.study_time), reverse=True)


def _study_facts(settings: Settings, study_uid: str) -> tuple[str, str, str, list[str]]:
    """(Patient ID, study date, study time, image modalities) of an indexed study."""
    with session_scope(engine_for(settings.database.url)) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise RetrieveError(f"the node holds no instance of study {study_uid}")
        patient = session.get(Patient, study.patient_pk)
        modalities = session.scalars(
            select(Series.modality).where(Series.study_pk == study.id, Series.state != NODE_OUTPUT).distinct()
        )
        return (
            patient.patient_id if patient else "",
            study.study_date,
            study.study_time,
            sorted(m for m in modalities if m),
        )


def _conclude(outcome: RetrieveOutcome, fetched: bool) -> None:
    """The final state: what is still not indexed, or failed sub-operations, fail the retrieval."""
    if outcome.not_indexed:
        outcome.state = "failed"
        done = f"{outcome.completed} completed, {outcome.failed} failed, {outcome.warning} warning"
        outcome.error = outcome.error or (
            f"{outcome.not_indexed} of {outcome.at_source} instance(s) of the study are not in the node after "
            f"the retrieval from {outcome.source} ({done})"
        )
    else:
        outcome.state = "retrieved" if fetched else "held"


def _log(outcome: RetrieveOutcome) -> None:
    name = instance_tag(outcome.study_uid)  # a short hash: no UID or patient data in logs
    if outcome.ok:
        log.info(
            "study %s from %s by %s: %s (%d at source, %d held before, %d completed, %d failed, %d warning) in %.1f s",
            name,
            outcome.source,
            outcome.method,
            outcome.state,
            outcome.at_source,
            outcome.held_before,
            outcome.completed,
            outcome.failed,
            outcome.warning,
            outcome.seconds,
        )
    else:
        said = outcome.error.replace(outcome.study_uid, f"#{name}")
        log.warning("study %s from %s by %s failed: %s", name, outcome.source, outcome.method, said)


# --- the index -----------------------------------------------------------------------------------


def held_instances(settings: Settings, sop_instance_uids: Iterable[str]) -> set[str]:
    """Which of these SOP Instance UIDs the node's index holds."""
    uids = list(sop_instance_uids)
    held: set[str] = set()
    with session_scope(engine_for(settings.database.url)) as session:
        for k in range(0, len(uids), _QUERY_CHUNK):
            chunk = uids[k : k + _QUERY_CHUNK]
            held.update(session.scalars(select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(chunk))))
    return held


def _wait_indexed(settings: Settings, wanted: list[str], deadline: float) -> int:
    """Wait until the index holds every wanted instance (at most _INDEX_WAIT_S more); how many it
    still lacks. Instances answered Success are durable; their rows follow within a batch."""
    until = min(deadline, time.monotonic() + _INDEX_WAIT_S)
    while True:
        lacking = len(wanted) - len(held_instances(settings, wanted))
        if not lacking or time.monotonic() >= until:
            return lacking
        time.sleep(0.2)


# --- DIMSE: C-FIND, then C-MOVE or C-GET ------------------------------------------------------------


class _Dimse:
    """A DICOM source: Study Root C-FIND, then C-MOVE to the node or C-GET."""

    def __init__(self, settings: Settings, source: Source, method: str):
        self.settings, self.source, self.method = settings, source, method

    @property
    def where(self) -> str:
        src = self.source
        return f"{src.name} ({src.ae_title}@{src.host}:{src.port})"

    def _ae(self) -> AE:
        node, src = self.settings.node, self.source
        ae = AE(ae_title=node.ae_title)
        ae.acse_timeout = node.acse_timeout_s
        # A C-MOVE's final answer comes only when every sub-operation is done.
        ae.dimse_timeout = src.timeout_s
        ae.network_timeout = src.timeout_s
        return ae

    def _associate(self, ae: AE, model: Any, **kwargs: Any) -> Any:
        """An association with the source on which ``model`` was accepted, or SourceUnavailable /
        RetrieveError saying precisely why not."""
        src = self.source
        try:  # a TCP probe first: pynetdicom only says that the association failed
            socket.create_connection((src.host, src.port), timeout=self.settings.node.acse_timeout_s).close()
        except OSError as err:
            raise SourceUnavailable(
                f"source {self.where} cannot be reached: {err.strerror or type(err).__name__}"
            ) from None
        assoc = answers_stay_with_the_sender(ae.associate(src.host, src.port, ae_title=src.ae_title, **kwargs))
        if assoc.is_established:
            if any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
                return assoc
            assoc.release()
            raise RetrieveError(f"source {self.where} does not offer {model.name} ({model})")
        if assoc.is_rejected:
            raise SourceUnavailable(
                f"source {self.where} rejected the association from {self.settings.node.ae_title} "
                "(is the node's AE title known to it?)"
            )
        raise SourceUnavailable(f"source {self.where} did not accept an association (aborted or timed out)")

    # -- C-FIND

    def find(self, study_uid: str) -> list[SourceInstance]:
        """Every instance the source holds for the study (SERIES, then IMAGE level per series)."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae, StudyRootQueryRetrieveInformationModelFind)
        try:
            series = [
                str(ds.SeriesInstanceUID)
                for ds in self._c_find(assoc, _query("SERIES", study_uid, SeriesInstanceUID=""))
                if ds.get("SeriesInstanceUID")
            ]
            found: list[SourceInstance] = []
            for series_uid in series:
                query = _query("IMAGE", study_uid, SeriesInstanceUID=series_uid, SOPInstanceUID="", SOPClassUID="")
                for ds in self._c_find(assoc, query):
                    if ds.get("SOPInstanceUID"):
                        found.append(
                            SourceInstance(series_uid, str(ds.SOPInstanceUID), str(ds.get("SOPClassUID", "") or ""))
                        )
            return found
        finally:
            assoc.release()

    def find_studies(self, patient_id: str, modality: str) -> list[PriorStudy]:
        """The patient's studies at the source with this modality (STUDY level C-FIND)."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae, StudyRootQueryRetrieveInformationModelFind)
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.PatientID, query.ModalitiesInStudy = patient_id, modality
            query.StudyInstanceUID, query.StudyDate, query.StudyTime = "", "", ""
            return [
                PriorStudy(
                    str(ds.StudyInstanceUID), str(ds.get("StudyDate", "") or ""), str(ds.get("StudyTime", "") or "")
                )
                for ds in self._c_find(assoc, query)
                if ds.get("StudyInstanceUID")
            ]
        finally:
            assoc.release()

    def _c_find(self, assoc: Any, query: Dataset) -> Iterator[Dataset]:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise SourceUnavailable(
                    f"source {self.where} ended the association instead of answering the C-FIND (as a PACS "
                    f"does when it does not know or allow the calling AE title {self.settings.node.ae_title})"
                )
            if code in (0xFF00, 0xFF01):
                if identifier is not None:
                    yield identifier
            elif code != 0x0000:
                raise RetrieveError(f"source {self.where} refused the C-FIND: status 0x{code:04X}")

    # -- C-MOVE / C-GET

    def fetch(
        self,
        study_uid: str,
        instances: list[SourceInstance],
        missing: list[SourceInstance],
        outcome: RetrieveOutcome,
        report: Callable[[RetrieveOutcome], None],
    ) -> None:
        """Move or get what is missing: the whole study, whole series, or single instances."""
        if self.method == "c-get":
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
            classes = _storage_classes(instances)
            for uid in classes:
                ae.add_requested_context(uid, TRANSFER_SYNTAXES)
            store = retrieval_store(self.settings)
            handler = _GetStore(store, self.source.ae_title or self.source.name)
            roles = [build_role(uid, scp_role=True) for uid in classes]
            assoc = self._associate(
                ae, StudyRootQueryRetrieveInformationModelGet, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, handler)]
            )
            model, send = StudyRootQueryRetrieveInformationModelGet, assoc.send_c_get
        else:
            ae = self._ae()
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            assoc = self._associate(ae, StudyRootQueryRetrieveInformationModelMove)
            model = StudyRootQueryRetrieveInformationModelMove

            def send(identifier: Dataset, query_model: Any) -> Any:
                return assoc.send_c_move(identifier, self.settings.node.ae_title, query_model)

        try:
            for identifier in _identifiers(study_uid, instances, missing):
                self._one_retrieve(send, model, identifier, outcome, report)
        finally:
            if assoc.is_established:
                assoc.release()
        if self.method == "c-get":
            store.indexer.wait_idle(timeout=_INDEX_WAIT_S)

    def _one_retrieve(
        self,
        send: Callable[..., Any],
        model: Any,
        identifier: Dataset,
        outcome: RetrieveOutcome,
        report: Callable[[RetrieveOutcome], None],
    ) -> None:
        base = (outcome.completed, outcome.failed, outcome.warning)
        final = None
        for status, _ in send(identifier, query_model=model):
            code = getattr(status, "Status", None)
            if code is None:
                raise SourceUnavailable(
                    f"source {self.where} stopped answering the {self.method.upper()} (association lost); "
                    f"{outcome.completed} instance(s) arrived before"
                )
            _count(outcome, base, status)
            report(outcome)
            if code != 0xFF00:
                final = code
        if final is None:
            raise RetrieveError(f"source {self.where} gave no final answer to the {self.method.upper()}")
        if final not in (0x0000, 0xB000):
            text = _STATUS_TEXT.get(final, "failed")
            hint = ""
            if final == 0xA801:
                node = self.settings.node
                hint = (
                    f": add the node ({node.ae_title}, its host and port {node.port}) to the source's known modalities"
                )
            raise RetrieveError(
                f"source {self.where} answered the {self.method.upper()} with 0x{final:04X} ({text}){hint}"
            )


def _count(outcome: RetrieveOutcome, base: tuple[int, int, int], status: Dataset) -> None:
    """Sub-operation counts of one C-MOVE/C-GET response added to what earlier ones did."""
    for k, attr in enumerate(("completed", "failed", "warning")):
        keyword = f"NumberOf{attr.capitalize()}Suboperations"
        value = status.get(keyword)
        if value is not None:
            setattr(outcome, attr, base[k] + int(value))


def _query(level: str, study_uid: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.StudyInstanceUID = study_uid
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _identifiers(study_uid: str, instances: list[SourceInstance], missing: list[SourceInstance]) -> list[Dataset]:
    """The fewest retrieve identifiers for what is missing: the study when all is, each series
    missing whole at SERIES level, the instances of a partly held series at IMAGE level."""
    if len(missing) == len(instances):
        return [_query("STUDY", study_uid)]
    per_series: dict[str, int] = {}
    for item in instances:
        per_series[item.series_uid] = per_series.get(item.series_uid, 0) + 1
    lacking: dict[str, list[str]] = {}
    for item in missing:
        lacking.setdefault(item.series_uid, []).append(item.sop_instance_uid)
    out = []
    for series_uid, uids in lacking.items():
        if len(uids) == per_series[series_uid]:
            out.append(_query("SERIES", study_uid, SeriesInstanceUID=series_uid))
        else:
            query = _query("IMAGE", study_uid, SeriesInstanceUID=series_uid)
            query.SOPInstanceUID = uids
            out.append(query)
    return out


def _storage_classes(instances: list[SourceInstance]) -> list[str]:
    """The storage SOP classes to propose for C-GET: those the source named, else the common ones."""
    named = sorted({i.sop_class_uid for i in instances if i.sop_class_uid})
    if named and len(named) <= _MAX_STORAGE_CONTEXTS:
        return named
    return [str(cx.abstract_syntax) for cx in StoragePresentationContexts][:_MAX_STORAGE_CONTEXTS]


class _GetStore:
    """The C-STORE sub-operations of the node's C-GET: each through the receiver's store path."""

    def __init__(self, store: Receiver, source_ae: str):
        self.store, self.source_ae = store, source_ae

    def __call__(self, event: Any) -> int | Dataset:
        req = event.request
        answer = self.store.store_retrieved(
            self.source_ae,
            str(req.AffectedSOPClassUID or ""),
            str(req.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax),
            req.DataSet.getvalue(),
        )
        if isinstance(answer, tuple):
            status = Dataset()
            status.Status, status.ErrorComment = answer[0], answer[1][:64]
            return status
        return answer


# --- the in-process store for C-GET and WADO-RS ------------------------------------------------------

_stores: dict[tuple[str, str], Receiver] = {}
_stores_lock = threading.Lock()


def retrieval_store(settings: Settings) -> Receiver:
    """This process's receiver for retrieved instances (its own journal, row RETRIEVAL_ROW): made
    and recovered on first use. One process per storage folder retrieves by C-GET or WADO-RS (the
    node's main process); C-MOVE needs none, its instances come through the listener."""
    key = (str(settings.storage.path), settings.database.url)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = Receiver(settings, engine_for(settings.database.url), None, RETRIEVAL_ROW)  # type: ignore[arg-type]
            store.recover()
            _stores[key] = store
        return store


def stop_retrieval_stores() -> None:
    """Index what the retrieval stores hold and stop their indexers (at the node's stop)."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.indexer.stop()
        if store.volume_streamer is not None:
            store.volume_streamer.stop(timeout=5.0)


# --- DICOMweb: QIDO-RS, then WADO-RS ---------------------------------------------------------------


class _WadoRs:
    """A DICOMweb source: instances listed by QIDO-RS, each fetched by WADO-RS."""

    def __init__(self, settings: Settings, source: Source):
        self.settings, self.source = settings, source
        session = requests.Session()
        if source.username:
            session.auth = (source.username, source.password or "")
        self.client = DICOMwebClient(url=str(source.url).rstrip("/"), session=session, timeout=source.timeout_s)

    def _call(self, what: str, func: Callable[[], Any]) -> Any:
        try:
            return func()
        except requests.ConnectionError as err:
            raise SourceUnavailable(
                f"source {self.source.name} ({self.source.url}) cannot be reached: {_reason(err)}"
            ) from None
        except requests.HTTPError as err:
            code = err.response.status_code if err.response is not None else "?"
            raise RetrieveError(f"source {self.source.name} answered {what} with HTTP {code}") from None

    def find(self, study_uid: str) -> list[SourceInstance]:
        """Every instance the source holds for the study (QIDO-RS per series)."""
        series = self._call("QIDO-RS", lambda: self.client.search_for_series(study_instance_uid=study_uid))
        found: list[SourceInstance] = []
        for item in series or []:
            series_uid = _json_value(item, "0020000E")
            listed = self._call(
                "QIDO-RS",
                lambda s=series_uid: self.client.search_for_instances(
                    study_instance_uid=study_uid, series_instance_uid=s
                ),
            )
            for inst in listed or []:
                found.append(SourceInstance(series_uid, _json_value(inst, "00080018"), _json_value(inst, "00080016")))
        return [i for i in found if i.sop_instance_uid]

    def find_studies(self, patient_id: str, modality: str) -> list[PriorStudy]:
        """The patient's studies at the source with this modality (QIDO-RS)."""
        filters = {"PatientID": patient_id, "ModalitiesInStudy": modality}
        found = self._call("QIDO-RS", lambda: self.client.search_for_studies(search_filters=filters))
        return [
            PriorStudy(_json_value(s, "0020000D"), _json_value(s, "00080020"), _json_value(s, "00080030"))
            for s in found or []
            if _json_value(s, "0020000D")
        ]

    def fetch(
        self,
        study_uid: str,
        instances: list[SourceInstance],
        missing: list[SourceInstance],
        outcome: RetrieveOutcome,
        report: Callable[[RetrieveOutcome], None],
    ) -> None:
        """Fetch each missing instance and store it through the receiver's store path."""
        store = retrieval_store(self.settings)
        sender = (self.source.ae_title or self.source.name)[:16]
        for item in missing:
            ds = self._call(
                "WADO-RS",
                lambda i=item: self.client.retrieve_instance(study_uid, i.series_uid, i.sop_instance_uid),
            )
            transfer_syntax, data = _data_set_bytes(ds)
            answer = store.store_retrieved(sender, str(ds.SOPClassUID), str(ds.SOPInstanceUID), transfer_syntax, data)
            status = answer[0] if isinstance(answer, tuple) else answer
            if status == 0x0000:
                outcome.completed += 1
            elif status & 0xF000 == 0xB000:
                outcome.warning += 1
            else:
                outcome.failed += 1
            report(outcome)
        store.indexer.wait_idle(timeout=_INDEX_WAIT_S)


def _reason(err: Exception) -> str:
    text = str(err)
    return "connection refused" if "refused" in text.lower() else type(err).__name__


def _json_value(item: dict[str, Any], tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _data_set_bytes(ds: Dataset) -> tuple[str, bytes]:
    """The data set as encoded in its transfer syntax, without the file meta information."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    raw = buffer.getvalue()
    # Preamble (128) + "DICM" + (0002,0000) UL: tag 4, VR 2, length 2, value 4 = the meta's length.
    meta_length = int.from_bytes(raw[140:144], "little")
    return str(ds.file_meta.TransferSyntaxUID), raw[144 + meta_length :]


__all__ = [
    "RETRIEVAL_ROW",
    "PriorStudy",
    "find_prior_studies",
    "RetrieveError",
    "RetrieveOutcome",
    "SourceUnavailable",
    "StudyNotFound",
    "held_instances",
    "retrieval_store",
    "retrieve_study",
    "stop_retrieval_stores",
]
