"""The report a RIS receives: what one finished analysis found, read back from its TID 1500 SR.

The SR the workers wrote is the one source of truth: the HL7 and FHIR senders read it here, so a
RIS always says what the PACS shows. A small context file beside the SR (written with the outbox
row, ``write_report_context``) adds what the SR cannot say: which rule ran (for its critical
criteria), a stable report identifier per analysis of a study (so a re-run corrects rather than
duplicates), and whether this result supersedes an earlier one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pydicom
from pydicom.dataset import Dataset

from node.core.settings import CriticalFinding, Rule, Settings
from node.dispatch.link import LinkDown, Outcome, Progress
from node.dispatch.table import FAILED, PENDING, Delivery

MEASUREMENT_GROUP = "125007"
TRACKING_IDENTIFIER = "112039"
FINDING = "121071"
FINDING_SITE = "363698007"
PROBABILITY = "122157"
PRESENT = "52101004"


@dataclass(frozen=True)
class Code:
    """A coded concept as the SR has it."""

    value: str
    scheme: str
    meaning: str

    def matches(self, text: str) -> bool:
        """Whether a configured name (code value or meaning, any case) names this concept."""
        wanted = text.strip().lower()
        return wanted in (self.value.lower(), self.meaning.lower())


@dataclass(frozen=True)
class Quantity:
    """A numeric measurement with its UCUM unit."""

    name: Code
    value: float
    unit: Code


@dataclass
class Group:
    """One TID 1501/1410/1411 measurement group: a finding with its evaluations and measurements."""

    tracking_id: str = ""
    finding: Code | None = None
    site: Code | None = None
    evaluations: list[tuple[Code, Code]] = field(default_factory=list)
    quantities: list[Quantity] = field(default_factory=list)
    critical: bool = False

    def probability(self) -> float | None:
        """The group's probability measurement, if it has one."""
        return next((q.value for q in self.quantities if q.name.value == PROBABILITY), None)

    def present(self) -> bool:
        """Whether the group states its finding present (a detection, or a positive classification)."""
        return any(value.value == PRESENT for _, value in self.evaluations)


@dataclass
class Person:
    """A DICOM person name split into its alphabetic, ideographic and phonetic groups."""

    groups: dict[str, list[str]]  # "A" | "I" | "P" -> family, given, middle, prefix, suffix


@dataclass
class Report:
    """Everything the RIS messages carry for one analysis of one study."""

    sr_sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: Person
    birth_date: str
    sex: str
    accession_number: str
    requested_procedure_id: str
    study_datetime: str
    content_datetime: str
    modality: str
    algorithm: str
    groups: list[Group]
    # From the context file.
    report_id: str = ""
    analysis: str = ""
    rule: str = ""
    correction: bool = False

    def critical(self) -> bool:
        """Whether any group is critical."""
        return any(g.critical for g in self.groups)

    def order_number(self, mapping: str) -> str:
        """The RIS order this result belongs to, by the destination's mapping."""
        return self.accession_number if mapping == "accession_number" else self.requested_procedure_id


# --- the context file ------------------------------------------------------------------------


def context_path(sr_path: str | Path) -> Path:
    """Where the context of the SR at ``sr_path`` is kept."""
    return Path(f"{sr_path}.report.json")


def report_id(job_key: str) -> str:
    """A stable identifier of one analysis of one study or series: a re-run reuses it."""
    return "AIN" + hashlib.sha256(job_key.encode()).hexdigest()[:24].upper()


@dataclass(frozen=True)
class ReportContext:
    """What the job knows of its SR that the SR does not say."""

    job_key: str
    analysis: str
    rule: str
    # The job supersedes an earlier one (a re-run): its report corrects the earlier report.
    correction: bool


def write_report_context(sr_path: str | Path, context: ReportContext) -> None:
    """Write the context file beside an SR (atomically: written, then renamed)."""
    target = context_path(sr_path)
    tmp = target.with_name(target.name + ".tmp")
    data = {
        "report_id": report_id(context.job_key),
        "analysis": context.analysis,
        "rule": context.rule,
        "correction": context.correction,
    }
    tmp.write_text(json.dumps(data))
    tmp.replace(target)


# --- reading the SR --------------------------------------------------------------------------


def _code(item: Dataset | None) -> Code | None:
    if item is None:
        return None
    return Code(
        str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeMeaning", ""))
    )


def _name(item: Dataset) -> Code | None:
    seq = item.get("ConceptNameCodeSequence")
    return _code(seq[0]) if seq else None


def _group(container: Dataset) -> Group:
    group = Group()
    for item in container.get("ContentSequence", []):
        name, kind = _name(item), item.get("ValueType", "")
        if name is None:
            continue
        if kind == "TEXT" and name.value == TRACKING_IDENTIFIER:
            group.tracking_id = str(item.TextValue)
        elif kind == "CODE" and name.value == FINDING:
            group.finding = _code(item.ConceptCodeSequence[0])
        elif kind == "CODE" and name.value == FINDING_SITE:
            group.site = _code(item.ConceptCodeSequence[0])
        elif kind == "CODE":
            value = _code(item.ConceptCodeSequence[0])
            if value is not None:
                group.evaluations.append((name, value))
        elif kind == "NUM" and item.get("MeasuredValueSequence"):
            measured = item.MeasuredValueSequence[0]
            unit = _code(measured.MeasurementUnitsCodeSequence[0]) or Code("1", "UCUM", "no units")
            group.quantities.append(Quantity(name, float(measured.NumericValue), unit))
    return group


def _groups(node: Dataset) -> list[Group]:
    found: list[Group] = []
    for item in node.get("ContentSequence", []):
        name = _name(item)
        if item.get("ValueType") == "CONTAINER" and name is not None and name.value == MEASUREMENT_GROUP:
            found.append(_group(item))
        elif item.get("ValueType") == "CONTAINER":
            found.extend(_groups(item))
    return found


def _person(value: Any) -> Person:
    groups: dict[str, list[str]] = {}
    if value:
        for key, text in zip(("A", "I", "P"), str(value).split("=")):
            if text:
                groups[key] = (text.split("^") + [""] * 5)[:5]
    return Person(groups)


def _requested_procedure_id(ds: Dataset) -> str:
    for item in ds.get("ReferencedRequestSequence", []):
        if item.get("RequestedProcedureID"):
            return str(item.RequestedProcedureID)
    return ""


def _algorithm(ds: Dataset) -> str:
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName"):
            return str(item.ManufacturerModelName)
    return str(ds.get("ManufacturerModelName", "")) or str(ds.get("SeriesDescription", ""))


def read_report(sr_path: str | Path, settings: Settings) -> Report:
    """The report in the SR at ``sr_path`` with its context, critical groups marked by its rule."""
    ds = pydicom.dcmread(str(sr_path))
    context = json.loads(context_path(sr_path).read_text()) if context_path(sr_path).exists() else {}
    report = Report(
        sr_sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        patient_id=str(ds.get("PatientID", "")),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "")),
        patient_name=_person(ds.get("PatientName", "")),
        birth_date=str(ds.get("PatientBirthDate", "")),
        sex=str(ds.get("PatientSex", "")),
        accession_number=str(ds.get("AccessionNumber", "")),
        requested_procedure_id=_requested_procedure_id(ds),
        study_datetime=f"{ds.get('StudyDate', '')}{ds.get('StudyTime', '')}".split(".")[0],
        content_datetime=f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}".split(".")[0],
        modality=str(ds.get("Modality", "SR")),
        algorithm=_algorithm(ds),
        groups=_groups(ds),
        report_id=context.get("report_id", "AIN" + str(ds.SOPInstanceUID).replace(".", "")[-24:]),
        analysis=context.get("analysis", ""),
        rule=context.get("rule", ""),
        correction=bool(context.get("correction", False)),
    )
    mark_critical(report, _rule(settings, report.rule))
    return report


def _rule(settings: Settings, name: str) -> Rule | None:
    return next((r for r in settings.rules if r.name == name), None)


def is_critical(group: Group, criterion: CriticalFinding) -> bool:
    """Whether one measurement group meets one critical criterion of its rule."""
    if criterion.finding:
        named = (group.finding is not None and group.finding.matches(criterion.finding)) or any(
            concept.matches(criterion.finding) for concept, _ in group.evaluations
        )
        if not named or not group.present():
            return False
        probability = group.probability()
        return criterion.min_probability is None or (
            probability is not None and probability >= criterion.min_probability
        )
    for quantity in group.quantities:
        if criterion.measurement and quantity.name.matches(criterion.measurement):
            if criterion.above is not None and quantity.value > criterion.above:
                return True
            if criterion.below is not None and quantity.value < criterion.below:
                return True
    return False


def mark_critical(report: Report, rule: Rule | None) -> None:
    """Set ``critical`` on every group that meets one of the rule's critical criteria."""
    for group in report.groups:
        group.critical = bool(rule and any(is_critical(group, c) for c in rule.critical))


def reports_to_send(
    rows: list[Delivery], settings: Settings
) -> tuple[list[tuple[Delivery, Report]], dict[int, Outcome]]:
    """The reports of a batch of RIS rows, critical ones first (they go out ahead of routine
    ones), and the outcome of each row whose report cannot be read (failed for good, with why)."""
    reports: list[tuple[Delivery, Report]] = []
    unreadable: dict[int, Outcome] = {}
    for row in rows:
        if not Path(row.path).exists():
            unreadable[row.id] = Outcome(FAILED, "missing", f"result file is gone: {row.path}")
            continue
        try:
            reports.append((row, read_report(row.path, settings)))
        except Exception as err:  # noqa: BLE001 - this SR cannot be read: say why, send the rest
            unreadable[row.id] = Outcome(FAILED, "unreadable", f"report not read: {type(err).__name__}: {err}")
    reports.sort(key=lambda pair: not pair[1].critical())
    return reports, unreadable


class Unbuildable(Exception):
    """The report cannot be expressed as the RIS message (the reason is the message)."""


def send_reports(
    rows: list[Delivery], settings: Settings, progress: Progress | None, send: Callable[[Delivery, Report], Outcome]
) -> dict[int, Outcome]:
    """The RIS senders' loop: each row's report through ``send`` (critical ones first), its
    outcome recorded at once; a link that fails after some answers leaves the rest for the retry."""
    reports, outcomes = reports_to_send(rows, settings)
    for row, report in reports:
        try:
            outcomes[row.id] = send(row, report)
        except Unbuildable as err:
            outcomes[row.id] = Outcome(FAILED, "unbuildable", str(err))
        except LinkDown:
            if any(o.status not in ("missing", "unreadable", "unbuildable") for o in outcomes.values()):
                break  # what was answered is recorded; the rest is retried with the link
            raise
        if progress is not None:
            progress(row, outcomes[row.id])
    for row in rows:
        outcomes.setdefault(row.id, Outcome(PENDING, "not-sent", "the link failed before this report"))
    return outcomes
