"""The node's UPS Task Performer (IHE AI Workflow for Imaging, AIW-I): it performs the workitems
whose Scheduled Workitem Code names an analysis it runs, and mirrors every job the rules queue as
a workitem of its own, so that a watcher sees all AI work through one global subscription.

A workitem goes through the same manager operations as a UPS Pull SCU's would (``manager``):

1. *claim*: a SCHEDULED workitem whose code maps to an analysis (each analysis answers to its
   name under ``99AINODE``; ``workflow.analysis_codes`` maps others) and whose Input Readiness
   State is READY (INCOMPLETE and UNAVAILABLE wait) is changed to IN PROGRESS with a Transaction
   UID of its own. The row keeps that UID and the node's AE title as performer: after a restart
   the performer finds its IN PROGRESS workitems there and carries on.
2. *start*: the studies of the Input Information Sequence are retrieved (from the configured
   source whose AE title the item names, else the first source) when the node lacks them, and
   the analysis is queued as an on-demand one is (``ondemand.queue_analysis``), under the rule
   name ``ups-<workitem hash>``: a restart that queues it again finds the same job. The
   workitem↔job link is the row's ``job_id``.
3. *follow*: Progress Information follows the job (queued, analysing, delivering); when it ends,
   the Output Information Sequence lists every result a destination acknowledged (from the
   outbox, with that destination's Retrieve AE Title or WADO-RS URL) and the workitem is
   COMPLETED, or CANCELED with a Procedure Step Discontinuation Reason (failed, not applicable,
   cancel requested, nothing delivered).

Mirrored jobs: a job the rules (or an on-demand request) queued gets a workitem created by the
node (``job_id`` set, unique: at most one per job), claimed when the job leaves the queue and
followed as above. Everything is read from and written to the database each pass: idempotent,
and nothing is held only in memory. Logs name workitems by a short hash, never patient data.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from datetime import timedelta
from typing import Any, Callable, Collection, Iterable

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from node.core.clock import utcnow
from node.core.db import ChangeGate, database_session
from node.core.errors import describe_error
from node.core.settings import Settings, Source
from node.dispatch.table import DELIVERED, FAILED, PENDING, SENDING, Delivery
from node.index import Patient, Study
from node.jobs import lifecycle
from node.jobs.table import INAPPLICABLE, PENDING_STATES, QUEUED, RETRYING, SUCCEEDED, Job
from node.workflow import manager, states
from node.workflow.manager import short
from node.workflow.ondemand import default_destinations, held_as_input, queue_analysis
from node.workflow.retrieve import retrieve_study
from node.workflow.table import Workitem

log = logging.getLogger("ainode.performer")

NODE_SCHEME = "99AINODE"
# The rule name of the performer's jobs: "ups-" and the workitem's hash (a job key of its own).
UPS_RULE_PREFIX = "ups-"
# Procedure Step Discontinuation Reasons (CID 9300 where it has one; 99AINODE otherwise).
NOT_APPLICABLE = ("NOT-APPLICABLE", NODE_SCHEME, "Input outside the analysis' intended use")
UNSPECIFIED = ("110513", "DCM", "Discontinued for unspecified reason")
UPS_PRIORITY = {"stat": "HIGH", "routine": "MEDIUM", "low": "LOW"}
JOB_PRIORITY = {"HIGH": "stat", "MEDIUM": "routine", "LOW": "low"}
_BATCH = 100
# Workitems whose inputs are retrieved at once (each on its own thread); the others wait a pass.
_PARALLEL_STARTS = 4
# Job ids are not committed strictly in order (PostgreSQL sequences): the mirror looks this far
# below the highest job id it has seen.
_ID_MARGIN = 1000


def now_dt() -> str:
    """A DICOM DT of now (UTC, as the manager's own date-times)."""
    return utcnow().strftime("%Y%m%d%H%M%S")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    """A code item; a value over 16 characters is a Long Code Value (PS3.3 8.8)."""
    item = Dataset()
    if len(value) > 16:
        item.LongCodeValue = value
    else:
        item.CodeValue = value
    item.CodingSchemeDesignator, item.CodeMeaning = scheme, meaning[:64]
    return item


def code_key(item: Dataset) -> tuple[str, str]:
    """(Coding Scheme Designator, Code Value or Long Code Value) of a code item."""
    return _text(item, "CodingSchemeDesignator"), _text(item, "CodeValue") or _text(item, "LongCodeValue")


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def code_map(settings: Settings, analyses: Iterable[str]) -> dict[tuple[str, str], str]:
    """(Coding Scheme Designator, Code Value) → analysis: each analysis' default code (its name
    under 99AINODE), then the configured ``workflow.analysis_codes`` (which win)."""
    codes = {(NODE_SCHEME, name): name for name in analyses}
    for entry in settings.workflow.analysis_codes:
        codes[(entry.coding_scheme_designator, entry.code_value)] = entry.analysis
    return codes


def progress_item(percent: int, description: str) -> Dataset:
    """One Procedure Step Progress Information item."""
    item = Dataset()
    item.ProcedureStepProgress = percent
    item.ProcedureStepProgressDescription = description[:64]
    return item


class Performer:
    """The Task Performer of one node (one per ``ainode serve``)."""

    def __init__(self, settings: Settings, analyses: Collection[str]):
        self.settings = settings
        self.url = settings.database.url
        self.ae = settings.node.ae_title
        self.codes = code_map(settings, analyses)
        # Workitems whose inputs are being retrieved on a thread of their own (this process only:
        # after a restart the row, IN PROGRESS without a job, says to start again).
        self._starting: set[str] = set()
        self._lock = threading.Lock()
        self._highest_job = 0

    # --- one pass --------------------------------------------------------------------------

    def run_once(self) -> None:
        """Mirror new jobs, claim what is due, move every claimed workitem on."""
        if self.settings.workflow.mirror_jobs:
            self.mirror_jobs()
        self.claim_scheduled()
        self.advance()

    def analysis_for(self, ds: Dataset) -> str | None:
        """The analysis the workitem's Scheduled Workitem Code names (None: not the node's work)."""
        for item in ds.get("ScheduledWorkitemCodeSequence") or []:
            found = self.codes.get(code_key(item))
            if found:
                return found
        return None

    def params_for(self, ds: Dataset) -> dict[str, Any]:
        """The configured parameters of the workitem's code (``workflow.analysis_codes``)."""
        for item in ds.get("ScheduledWorkitemCodeSequence") or []:
            for entry in self.settings.workflow.analysis_codes:
                if (entry.coding_scheme_designator, entry.code_value) == code_key(item):
                    return dict(entry.params)
        return {}

    def code_for(self, analysis: str) -> Dataset:
        """The code a workitem of ``analysis`` is scheduled with (the first mapped to it)."""
        for (scheme, value), name in self.codes.items():
            if name == analysis and scheme != NODE_SCHEME:
                meaning = next(
                    (c.code_meaning for c in self.settings.workflow.analysis_codes if c.code_value == value), ""
                )
                return _code(value, scheme, meaning or analysis)
        return _code(analysis, NODE_SCHEME, analysis)

    # --- claim -----------------------------------------------------------------------------

    def claim_scheduled(self) -> None:
        """Claim the SCHEDULED workitems that are the node's: a mapped code and READY inputs, or a
        mirrored job that has left the queue."""
        with database_session(self.url) as session:
            rows = session.execute(
                select(Workitem.sop_instance_uid, Workitem.dataset, Workitem.job_id, Job.state)
                .outerjoin(Job, Job.id == Workitem.job_id)
                .where(Workitem.state == states.SCHEDULED)
                .order_by(Workitem.id)
                .limit(_BATCH)
            ).all()
        for uid, text, job_id, job_state in rows:
            if job_id is not None:
                if job_state == QUEUED:
                    continue  # the mirror of a job still waiting: SCHEDULED, as the job
            else:
                ds = Dataset.from_json(text)
                if self.analysis_for(ds) is None or _text(ds, "InputReadinessState") != "READY":
                    continue  # another performer's work, or inputs not ready yet
            self.claim(uid)

    def claim(self, uid: str) -> str | None:
        """Change the workitem to IN PROGRESS with a new Transaction UID (None: someone else
        claimed it first), and record when the procedure step started."""
        transaction_uid = generate_uid()
        info = Dataset()
        info.ProcedureStepState = states.IN_PROGRESS
        info.TransactionUID = transaction_uid
        answer = manager.change_state(self.url, uid, info, self.ae)
        if answer.status != states.SUCCESS:
            return None
        mods = Dataset()
        mods.TransactionUID = transaction_uid
        performed = Dataset()
        performed.PerformedProcedureStepStartDateTime = now_dt()
        performed.PerformedStationNameCodeSequence = Sequence([_code(self.ae, NODE_SCHEME, "ainode")])
        mods.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
        mods.ProcedureStepProgressInformationSequence = Sequence([progress_item(0, "claimed by ainode")])
        manager.set_attributes(self.url, uid, mods)
        log.info("workitem %s claimed", short(uid))
        return transaction_uid

    # --- the claimed workitems ---------------------------------------------------------------

    def advance(self) -> None:
        """Start (retrieve and queue) or follow every workitem the node has IN PROGRESS."""
        with database_session(self.url) as session:
            rows = session.execute(
                select(
                    Workitem.sop_instance_uid,
                    Workitem.transaction_uid,
                    Workitem.job_id,
                    Workitem.cancel_requested,
                    Workitem.dataset,
                )
                .where(Workitem.state == states.IN_PROGRESS, Workitem.performer_ae == self.ae)
                .order_by(Workitem.id)
                .limit(_BATCH)
            ).all()
        for uid, transaction_uid, job_id, cancel_requested, text in rows:
            ds = Dataset.from_json(text)
            try:
                if job_id is None:
                    self._start_in_background(uid, transaction_uid, ds)
                else:
                    self.follow(uid, transaction_uid, job_id, ds, cancel_requested)
            except Exception as err:  # noqa: BLE001 - one workitem's trouble must not stop the others
                log.error("workitem %s: %s", short(uid), describe_error(err))

    def _start_in_background(self, uid: str, transaction_uid: str, ds: Dataset) -> None:
        with self._lock:
            if uid in self._starting or len(self._starting) >= _PARALLEL_STARTS:
                return
            self._starting.add(uid)

        def run() -> None:
            try:
                self.start(uid, transaction_uid, ds)
            except Exception as err:  # noqa: BLE001 - the workitem ends with a reason, never silently
                self.cancel(uid, transaction_uid, UNSPECIFIED, f"could not start: {describe_error(err)}")
            finally:
                with self._lock:
                    self._starting.discard(uid)

        threading.Thread(target=run, name=f"ups-{short(uid)}", daemon=True).start()

    def start(self, uid: str, transaction_uid: str, ds: Dataset) -> None:
        """Retrieve the workitem's inputs the node lacks, queue its analysis, link the job."""
        analysis = self.analysis_for(ds)
        if analysis is None:
            self.cancel(uid, transaction_uid, UNSPECIFIED, "no analysis of this node answers to the workitem's code")
            return
        inputs = input_studies(ds)
        if not inputs:
            self.cancel(uid, transaction_uid, UNSPECIFIED, "the Input Information Sequence names no study")
            return
        for study_uid, retrieve_ae in inputs:
            problem = self.fetch(uid, transaction_uid, study_uid, retrieve_ae)
            if problem:
                self.cancel(uid, transaction_uid, UNSPECIFIED, problem)
                return
        destinations = self.destinations(analysis)
        if not destinations:
            self.cancel(uid, transaction_uid, UNSPECIFIED, "no destination configured for the results")
            return
        params: dict[str, Any] = {**self.params_for(ds), "order": order_of(ds), "workitem": uid}
        if len(inputs) > 1:
            # Further studies are inputs of this analysis only: the rules leave them alone.
            params["prior_study_uids"] = [s for s, _ in inputs[1:]]
            for prior_uid, _ in inputs[1:]:
                held_as_input(self.settings, prior_uid)
        job_id, _state = queue_analysis(
            self.settings,
            inputs[0][0],
            analysis,
            destinations,
            JOB_PRIORITY.get(_text(ds, "ScheduledProcedureStepPriority"), "routine"),
            params,
            rule_name=f"{UPS_RULE_PREFIX}{short(uid)}",
        )
        with database_session(self.url) as session:
            row = session.scalar(select(Workitem).where(Workitem.sop_instance_uid == uid))
            if row is not None and row.job_id is None:
                row.job_id = job_id
        self.report(uid, transaction_uid, ds, 20, "queued for analysis")
        log.info("workitem %s: %s queued as job %d", short(uid), analysis, job_id)

    def fetch(self, uid: str, transaction_uid: str, study_uid: str, retrieve_ae: str) -> str:
        """Bring an input study onto the node when it lacks any of it; "" or what went wrong."""
        source = self.source_for(retrieve_ae)
        if source is None:
            if held(self.url, study_uid):
                return ""
            named = f" at {retrieve_ae}" if retrieve_ae else ""
            return f"input study{named} not on the node and no configured source to retrieve it from"
        self.report(uid, transaction_uid, None, 5, f"retrieving inputs from {source.name}")
        outcome = retrieve_study(self.settings, study_uid, source)
        if not outcome.ok:
            return f"inputs not retrieved: {outcome.error}"
        return ""

    def source_for(self, retrieve_ae: str) -> Source | None:
        """The configured source with the item's Retrieve AE Title (none named: the first source)."""
        if retrieve_ae:
            return next((s for s in self.settings.sources if s.ae_title == retrieve_ae), None)
        return self.settings.sources[0] if self.settings.sources else None

    def destinations(self, analysis: str) -> list[str]:
        """Where a workitem's results go (``workflow.destinations``, the rules', every one)."""
        return (
            list(self.settings.workflow.destinations)
            or default_destinations(self.settings, analysis)
            or [d.name for d in self.settings.destinations if d.type in ("dicom", "dicomweb")]
        )

    # --- following the job ---------------------------------------------------------------------

    def follow(self, uid: str, transaction_uid: str, job_id: int, ds: Dataset, cancel_requested: bool) -> None:
        """Progress while the job runs; COMPLETED or CANCELED once it (and its delivery) ended."""
        with database_session(self.url) as session:
            job = session.get(Job, job_id)
            state, error = (job.state, job.error) if job is not None else ("", "")
            deliveries = session.execute(
                select(Delivery.destination, Delivery.path, Delivery.sop_class_uid, Delivery.sop_instance_uid)
                .add_columns(Delivery.study_instance_uid, Delivery.state, Delivery.rejected_by)
                .where(Delivery.job_id == job_id)
            ).all()
        if not state:
            self.cancel(uid, transaction_uid, UNSPECIFIED, "its job no longer exists")
        elif cancel_requested and state in PENDING_STATES:
            # A job still waiting is not run; one already running ends, its results unlisted.
            lifecycle.cancel_queued(self.settings, job_id, "its UPS workitem was canceled")
            self.cancel(uid, transaction_uid, UNSPECIFIED, "canceled at the scheduler's request")
        elif state in PENDING_STATES:
            percent, text = (20, "queued for analysis") if state == QUEUED else (50, "analysing")
            if state == RETRYING:
                text = "analysis retried"
            self.report(uid, transaction_uid, ds, percent, text)
        elif state == SUCCEEDED:
            self._finish_succeeded(uid, transaction_uid, ds, deliveries)
        elif state == INAPPLICABLE:
            self.cancel(uid, transaction_uid, NOT_APPLICABLE, f"not applicable: {error}")
        else:
            self.cancel(uid, transaction_uid, UNSPECIFIED, f"analysis {state}: {error}".rstrip(": "))

    def _finish_succeeded(self, uid: str, transaction_uid: str, ds: Dataset, deliveries: list[Any]) -> None:
        live = [d for d in deliveries if not d.rejected_by]
        if any(d.state in (PENDING, SENDING) for d in live):
            self.report(uid, transaction_uid, ds, 90, "delivering results")
            return
        delivered = [d for d in live if d.state == DELIVERED]
        if not delivered and any(d.state == FAILED for d in live):
            self.cancel(uid, transaction_uid, UNSPECIFIED, "no result could be delivered")
            return
        self.complete(uid, transaction_uid, ds, self.outputs(delivered))

    def outputs(self, delivered: list[Any]) -> list[Dataset]:
        """The Output Information Sequence: the delivered results grouped by study, series and
        the destination that acknowledged them (its Retrieve AE Title, or WADO-RS URL)."""
        groups: dict[tuple[str, str, str], list[tuple[str, str]]] = defaultdict(list)
        # Only what can be retrieved as DICOM (an HL7 or FHIR report is no Output Information).
        image_stores = {d.name for d in self.settings.destinations if d.type in ("dicom", "dicomweb")}
        for d in (d for d in delivered if d.destination in image_stores):
            groups[(d.study_instance_uid, series_of(d.path), d.destination)].append(
                (d.sop_class_uid, d.sop_instance_uid)
            )
        items = []
        for (study_uid, series_uid, destination), instances in sorted(groups.items()):
            item = Dataset()
            item.TypeOfInstances = "DICOM"
            item.StudyInstanceUID = study_uid
            item.SeriesInstanceUID = series_uid
            refs = []
            for sop_class, sop_instance in sorted(instances, key=lambda x: x[1]):
                ref = Dataset()
                ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class, sop_instance
                refs.append(ref)
            item.ReferencedSOPSequence = Sequence(refs)
            self._where(item, destination, study_uid, series_uid)
            items.append(item)
        return items

    def _where(self, item: Dataset, destination: str, study_uid: str, series_uid: str) -> None:
        try:
            dest = self.settings.destination(destination)
        except KeyError:
            return
        if dest.type == "dicom" and dest.ae_title:
            location = Dataset()
            location.RetrieveAETitle = dest.ae_title
            item.DICOMRetrievalSequence = Sequence([location])
        elif dest.type == "dicomweb" and dest.url:
            location = Dataset()
            location.RetrieveURL = f"{dest.url.rstrip('/')}/studies/{study_uid}/series/{series_uid}"
            item.WADORSRetrievalSequence = Sequence([location])

    # --- writing the workitem --------------------------------------------------------------------

    def report(self, uid: str, transaction_uid: str, ds: Dataset | None, percent: int, text: str) -> None:
        """Progress Information, when it says something new (each change is a Progress event)."""
        if ds is not None:
            current = (ds.get("ProcedureStepProgressInformationSequence") or [Dataset()])[0]
            if _text(current, "ProcedureStepProgressDescription") == text[:64]:
                return
        mods = Dataset()
        mods.TransactionUID = transaction_uid
        mods.ProcedureStepProgressInformationSequence = Sequence([progress_item(percent, text)])
        manager.set_attributes(self.url, uid, mods)

    def complete(self, uid: str, transaction_uid: str, ds: Dataset, outputs: list[Dataset]) -> None:
        """Record what was performed and produced, then COMPLETED (both repeatable after a crash)."""
        performed = (ds.get("UnifiedProcedureStepPerformedProcedureSequence") or [Dataset()])[0]
        if not _text(performed, "PerformedProcedureStepStartDateTime"):
            performed.PerformedProcedureStepStartDateTime = now_dt()
        performed.PerformedProcedureStepEndDateTime = now_dt()
        performed.PerformedWorkitemCodeSequence = Sequence(list(ds.get("ScheduledWorkitemCodeSequence") or []))
        performed.OutputInformationSequence = Sequence(outputs)
        mods = Dataset()
        mods.TransactionUID = transaction_uid
        mods.UnifiedProcedureStepPerformedProcedureSequence = Sequence([performed])
        mods.ProcedureStepProgressInformationSequence = Sequence([progress_item(100, "completed")])
        self._final(uid, transaction_uid, mods, states.COMPLETED)
        log.info("workitem %s COMPLETED with %d output series", short(uid), len(outputs))

    def cancel(self, uid: str, transaction_uid: str, code: tuple[str, str, str], reason: str) -> None:
        """CANCELED with a Procedure Step Discontinuation Reason and the Reason for Cancellation."""
        item = progress_item(100, "canceled")
        item.ReasonForCancellation = reason[:1024]
        item.ProcedureStepCancellationDateTime = now_dt()
        item.ProcedureStepDiscontinuationReasonCodeSequence = Sequence([_code(*code)])
        mods = Dataset()
        mods.TransactionUID = transaction_uid
        mods.ProcedureStepProgressInformationSequence = Sequence([item])
        self._final(uid, transaction_uid, mods, states.CANCELED)
        log.info("workitem %s CANCELED (%s)", short(uid), code[2])

    def _final(self, uid: str, transaction_uid: str, mods: Dataset, state: str) -> None:
        answer = manager.set_attributes(self.url, uid, mods)
        if answer.status != states.SUCCESS:
            log.warning("workitem %s: N-SET before %s answered 0x%04X", short(uid), state, answer.status)
            return
        info = Dataset()
        info.ProcedureStepState = state
        info.TransactionUID = transaction_uid
        manager.change_state(self.url, uid, info, self.ae)

    # --- mirroring the rules' jobs -------------------------------------------------------------

    def mirror_jobs(self) -> int:
        """A workitem for every recent job without one (not the performer's own); how many."""
        since = utcnow() - timedelta(hours=self.settings.workflow.keep_final_hours)
        with database_session(self.url) as session:
            linked = select(Workitem.job_id).where(Workitem.job_id.is_not(None))
            rows = session.execute(
                select(Job, Patient.name, Patient.patient_id, Study.accession_number)
                .outerjoin(Study, Study.id == Job.study_pk)
                .outerjoin(Patient, Patient.id == Study.patient_pk)
                .where(
                    Job.id > self._highest_job - _ID_MARGIN,
                    Job.created_at >= since,
                    Job.rule.not_like(f"{UPS_RULE_PREFIX}%"),
                    Job.id.not_in(linked),
                )
                .order_by(Job.id)
                .limit(_BATCH)
            ).all()
            for job, *_ in rows:
                session.expunge(job)
            if len(rows) < _BATCH:
                # Everything up to the newest job has its workitem now: later passes look from there.
                self._highest_job = max(self._highest_job, session.scalar(select(func.max(Job.id))) or 0)
        made = 0
        for job, patient_name, patient_id, accession in rows:
            ds = self.mirror_dataset(job, patient_name or "", patient_id or "", accession or "")
            answer = manager.create(self.url, generate_uid(), ds, self.ae, self.ae, job_id=job.id)
            made += answer.status == states.SUCCESS
        return made

    def mirror_dataset(self, job: Job, patient_name: str, patient_id: str, accession: str) -> Dataset:
        """The workitem of a job the node queued itself (it schedules and performs it)."""
        ds = Dataset()
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.ProcedureStepState = states.SCHEDULED
        ds.ScheduledProcedureStepPriority = UPS_PRIORITY.get(job.priority, "MEDIUM")
        ds.ProcedureStepLabel = f"{job.analysis} ({job.rule})"[:64]
        ds.WorklistLabel = self.ae
        ds.ScheduledProcedureStepStartDateTime = job.created_at.strftime("%Y%m%d%H%M%S")
        ds.InputReadinessState = "READY"
        ds.ScheduledWorkitemCodeSequence = Sequence([self.code_for(job.analysis)])
        ds.ScheduledStationNameCodeSequence = Sequence([_code(self.ae, NODE_SCHEME, "ainode")])
        study = Dataset()
        study.TypeOfInstances = "DICOM"
        study.StudyInstanceUID = job.study_uid
        if job.series_uid:
            study.SeriesInstanceUID = job.series_uid
        where = Dataset()
        where.RetrieveAETitle = self.ae
        study.DICOMRetrievalSequence = Sequence([where])
        ds.InputInformationSequence = Sequence([study])
        if accession:
            request = Dataset()
            request.StudyInstanceUID = job.study_uid
            request.AccessionNumber = accession
            ds.ReferencedRequestSequence = Sequence([request])
        return ds


# --- reading the workitem and the node ----------------------------------------------------------


def input_studies(ds: Dataset) -> list[tuple[str, str]]:
    """(Study Instance UID, Retrieve AE Title or "") of each study the Input Information Sequence
    names, in order and once each."""
    out: list[tuple[str, str]] = []
    for item in ds.get("InputInformationSequence") or []:
        study_uid = _text(item, "StudyInstanceUID")
        if not study_uid or any(s == study_uid for s, _ in out):
            continue
        retrieve_ae = _text(item, "RetrieveAETitle")
        for location in item.get("DICOMRetrievalSequence") or []:
            retrieve_ae = retrieve_ae or _text(location, "RetrieveAETitle")
        out.append((study_uid, retrieve_ae.split("\\")[0]))
    return out


def order_of(ds: Dataset) -> dict[str, str]:
    """The order a workitem carries (Referenced Request Sequence), for its results."""
    requests = ds.get("ReferencedRequestSequence") or []
    if not requests:
        return {}
    item = requests[0]
    found = {
        "accession_number": _text(item, "AccessionNumber"),
        "requested_procedure_id": _text(item, "RequestedProcedureID"),
        "requested_procedure_description": _text(item, "RequestedProcedureDescription"),
    }
    return {k: v for k, v in found.items() if v}


def held(url: str, study_uid: str) -> bool:
    """Whether the node's index holds the study."""
    with database_session(url) as session:
        return session.scalar(select(Study.id).where(Study.study_uid == study_uid)) is not None


def series_of(path: str) -> str:
    """A result file's Series Instance UID ("" when the file is gone)."""
    try:
        return str(
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
        )
    except Exception:  # noqa: BLE001 - retention may have removed it: listed without its series
        return ""


def periodic_tasks(settings: Settings, analyses: Collection[str] = ()) -> list[tuple[str, float, Callable[[], None]]]:
    """The Task Performer inside ``ainode serve`` (``analyses``: the names the node runs)."""
    if not settings.workflow.perform:
        return []
    performer = Performer(settings, analyses)
    gate = ChangeGate(settings.database.url, max_quiet_s=2.0)

    def perform() -> None:
        if gate.due():
            performer.run_once()

    return [("workflow.performer", 0.5, perform)]
