"""Router: matches ready studies and series against the configured rules and creates their jobs.

Facts about a study (modality, body part, descriptions, AE titles, counts...) come from the index;
``ainode rules test`` builds the same facts from DICOM files, so what the command says is what the
node does. Rules are evaluated per series: each series' facts (modality, SOP class, body part,
series description, station, manufacturer, slice thickness, ``instances`` in the series,
``frames``: the Number of Frames of its largest instance) together with the study's (AE titles,
study description, patient age). A study-level rule matches a study when at least one series
satisfies its whole match, and its job analyses exactly the series that do (``Job.series_uids``);
a series-level rule sees only its series. Rules reload on SIGHUP or when the configuration file
changes; an invalid file keeps the rules in force and logs each error with its line.

Before queuing, each analysis' intended use (``node.core.intended_use``, handed over by the
composition root) is checked against the headers of the job's series. A job that cannot apply
is still recorded, in its final state ``inapplicable`` with the reason, and never published: what
the node decided not to analyse, and why, stays visible in ``ainode status``, the API and the
dashboard. A study-level job applies when any of its selected series fits.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pydicom
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.core.clock import utcnow
from node.core.db import database_session
from node.core.intended_use import BodyRegions, IntendedUse, header_reason, series_headers
from node.core.settings import MATCH_ATTRIBUTES, Condition, ConfigError, Match, Rule, Settings, load_settings
from node.index import NODE_OUTPUT, Instance, Series, Study
from node.jobs.broker import publish_job
from node.jobs.lifecycle import queue_job
from node.jobs.table import DEAD, FAILED, INAPPLICABLE, PENDING_STATES, Job, input_fingerprint

log = logging.getLogger("ainode.router")

Facts = dict[str, list[Any]]


# --- facts -----------------------------------------------------------------------------------


def analysable_series() -> Any:
    """The condition on series rows that rules and jobs may see: not the node's own results sent
    back by a PACS (``index.NODE_OUTPUT``), whatever sent them."""
    return Series.state != NODE_OUTPUT


def age_in_years(age: str) -> float | None:
    """DICOM AS ('045Y', '006M', '003W', '010D') as years; None when absent or malformed."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", age or "")
    if not m:
        return None
    per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[m.group(2)]
    return round(int(m.group(1)) / per_year, 3)


def _distinct(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in (None, "") and v not in out:
            out.append(v)
    return out


def study_facts(session: Session, study: Study, series: Series | None = None) -> Facts:
    """What rules can test about one series of a study (or, without ``series``, about all of them
    together: instances summed, frames the largest), from the index."""
    members = (
        [series]
        if series is not None
        else list(session.scalars(select(Series).where(Series.study_pk == study.id, analysable_series())))
    )
    pks = [s.id for s in members]
    sop_classes = session.scalars(select(Instance.sop_class_uid).where(Instance.series_pk.in_(pks)).distinct()).all()
    # Frames of one instance, never a sum: three stills are not a three-frame cine.
    count, frames = session.execute(
        select(func.count(Instance.id), func.coalesce(func.max(Instance.number_of_frames), 0)).where(
            Instance.series_pk.in_(pks)
        )
    ).one()
    return {
        "calling_ae": _distinct([study.calling_ae]),
        "called_ae": _distinct([study.called_ae]),
        "modality": _distinct(s.modality for s in members),
        "sop_class_uid": _distinct(sop_classes),
        "body_part": _distinct(s.body_part for s in members),
        "study_description": _distinct([study.description]),
        "series_description": _distinct(s.description for s in members),
        "station_name": _distinct(s.station_name for s in members),
        "manufacturer": _distinct(s.manufacturer for s in members),
        "patient_age": _distinct([age_in_years(study.patient_age)]),
        "instances": [int(count)],
        "frames": [int(frames)],
        "slice_thickness": _distinct(s.slice_thickness for s in members),
    }


@dataclass
class FileSeries:
    """Headers of one series read from files, for `ainode rules test`."""

    uid: str
    headers: list[pydicom.Dataset] = field(default_factory=list)


def _str(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def file_facts(series_list: list[FileSeries]) -> Facts:
    """The same facts as study_facts, from DICOM headers (AE titles are unknown for files): of one
    series, or of several together (instances summed, frames the largest)."""
    headers = [h for s in series_list for h in s.headers]
    first = headers[0]

    def each(keyword: str) -> list[Any]:
        return _distinct(_str(s.headers[0], keyword) for s in series_list)

    thickness = []
    for s in series_list:
        try:
            thickness.append(float(s.headers[0].get("SliceThickness")))
        except (TypeError, ValueError):
            pass
    frames = 0
    for h in headers:
        try:
            frames = max(frames, int(h.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            frames = max(frames, 1)
    return {
        "calling_ae": [],
        "called_ae": [],
        "modality": each("Modality"),
        "sop_class_uid": _distinct(_str(h, "SOPClassUID") for h in headers),
        "body_part": each("BodyPartExamined"),
        "study_description": _distinct([_str(first, "StudyDescription")]),
        "series_description": each("SeriesDescription"),
        "station_name": each("StationName"),
        "manufacturer": each("Manufacturer"),
        "patient_age": _distinct([age_in_years(_str(first, "PatientAge"))]),
        "instances": [len(headers)],
        "frames": [frames],
        "slice_thickness": _distinct(thickness),
    }


# --- matching --------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).strip() == str(b).strip()


def condition_holds(cond: Condition, value: Any) -> bool:
    """Every test the condition sets holds for this one value."""
    if cond.equals is not None and not _same(value, cond.equals):
        return False
    if cond.one_of is not None and not any(_same(value, option) for option in cond.one_of):
        return False
    if cond.regex is not None and not re.search(cond.regex, str(value)):
        return False
    if cond.min is not None or cond.max is not None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return False
        if cond.min is not None and number < cond.min:
            return False
        if cond.max is not None and number > cond.max:
            return False
    return True


def describe(cond: Condition) -> str:
    """The condition in words, for explanations."""
    parts = []
    if cond.equals is not None:
        parts.append(f"equal to {cond.equals!r}")
    if cond.one_of is not None:
        parts.append(f"one of {cond.one_of!r}")
    if cond.regex is not None:
        parts.append(f"matching /{cond.regex}/")
    if cond.min is not None and cond.max is not None:
        parts.append(f"between {cond.min:g} and {cond.max:g}")
    elif cond.min is not None:
        parts.append(f"at least {cond.min:g}")
    elif cond.max is not None:
        parts.append(f"at most {cond.max:g}")
    return " and ".join(parts) or "anything"


def evaluate(match: Match, facts: Facts) -> tuple[bool, str]:
    """Whether a match holds for these facts; when it does not, which condition failed on what value."""
    for attr in MATCH_ATTRIBUTES:
        cond = getattr(match, attr)
        if cond is None:
            continue
        values = facts.get(attr, [])
        if not any(condition_holds(cond, v) for v in values):
            shown = ", ".join(repr(v) for v in values) if values else "no value"
            return False, f"{attr}: {shown} is not {describe(cond)}"
    for sub in match.all or []:
        ok, why = evaluate(sub, facts)
        if not ok:
            return False, why
    if match.any:
        reasons = []
        for sub in match.any:
            ok, why = evaluate(sub, facts)
            if ok:
                break
            reasons.append(why)
        else:
            return False, "none of any: " + "; ".join(reasons)
    if match.not_ is not None:
        ok, _ = evaluate(match.not_, facts)
        if ok:
            return False, "not: the excluded condition holds"
    return True, ""


def evaluate_per_series(match: Match, per_series: list[tuple[str, Facts]]) -> tuple[bool, str, list[str]]:
    """A study-level match, series by series: whether any series satisfies all of it, why none
    does (each distinct reason once), and the UIDs of the series that do."""
    matched, reasons = [], []
    for uid, facts in per_series:
        ok, why = evaluate(match, facts)
        if ok:
            matched.append(uid)
        elif why not in reasons:
            reasons.append(why)
    if matched:
        return True, "", matched
    return False, "; ".join(reasons) or "the study has no series", []


def study_verdict(session: Session, study: Study, match: Match) -> tuple[bool, str, list[str]]:
    """``evaluate_per_series`` for a study in the index."""
    members = session.scalars(select(Series).where(Series.study_pk == study.id).order_by(Series.id)).all()
    return evaluate_per_series(match, [(s.series_uid, study_facts(session, study, s)) for s in members])


# --- rules in force and reloading ------------------------------------------------------------


class RuleBook:
    """The rules in force, reloaded from the configuration file on SIGHUP or when it changes."""

    def __init__(self, settings: Settings):
        self.rules: list[Rule] = list(settings.rules)
        # Each analysis' intended use by name (set by the composition root; empty: not checked).
        self.intended_uses: dict[str, IntendedUse] = {}
        self.regions = BodyRegions(settings.intended_use.synonyms)
        self.path: Path | None = settings.source_path
        self._mtime = self._stat()
        self._requested = threading.Event()
        self._lock = threading.Lock()

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime if self.path else None
        except OSError:
            return None

    def request_reload(self) -> None:
        """Ask for a reload at the next check (safe from a signal handler)."""
        self._requested.set()

    def check(self) -> bool:
        """Reload when asked or when the file changed; True when new rules are in force."""
        mtime = self._stat()
        if not self._requested.is_set() and mtime == self._mtime:
            return False
        self._requested.clear()
        self._mtime = mtime
        if self.path is None:
            return False
        try:
            fresh = load_settings(self.path)
        except ConfigError as err:
            for line in err.errors:
                log.error("rules not reloaded: %s", line)
            log.error("keeping the %d rules in force", len(self.rules))
            return False
        with self._lock:
            self.rules = list(fresh.rules)
        log.info(
            "rules reloaded from %s: %d rules (%s)",
            self.path,
            len(self.rules),
            ", ".join(r.name for r in self.rules) or "none",
        )
        return True


# Keyed by id() but holding the settings object too: while an entry exists its id cannot be
# reused by a new settings object after garbage collection (which once handed a test's new
# settings the previous test's rules).
_books: dict[int, tuple[Settings, RuleBook]] = {}


def rule_book(settings: Settings) -> RuleBook:
    """The rule book of this settings object (one per node process)."""
    entry = _books.get(id(settings))
    if entry is None or entry[0] is not settings:
        entry = _books[id(settings)] = (settings, RuleBook(settings))
    return entry[1]


def current_rules(settings: Settings) -> list[Rule]:
    """The rules in force now (after any reload)."""
    return rule_book(settings).rules


def matching_rules(
    session: Session, settings: Settings, study: Study, series: Series | None = None, level: str | None = None
) -> list[Rule]:
    """Rules (of a level, or all) whose match holds for the series, or for any series of the study."""
    rules = [r for r in current_rules(settings) if level is None or r.level == level]
    if series is not None:
        facts = study_facts(session, study, series)
        return [r for r in rules if evaluate(r.match, facts)[0]]
    return [r for r in rules if study_verdict(session, study, r.match)[0]]


# --- intended use ----------------------------------------------------------------------------


def _series_frames(session: Session, series: Series) -> int:
    return int(
        session.scalar(
            select(func.coalesce(func.sum(Instance.number_of_frames), 0)).where(Instance.series_pk == series.id)
        )
        or 0
    )


def stored_headers(session: Session, settings: Settings, series: Series) -> pydicom.Dataset | None:
    """The header of one stored instance of the series (None when none can be read)."""
    path = session.scalar(select(Instance.path).where(Instance.series_pk == series.id).order_by(Instance.id).limit(1))
    if path is None:
        return None
    try:
        return pydicom.dcmread(Path(settings.storage.path) / path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError):
        return None


def not_applicable_reason(
    session: Session,
    settings: Settings,
    use: IntendedUse | None,
    study: Study,
    series: Series | None,
    selected: list[str] | None = None,
) -> str | None:
    """Why the analysis cannot apply to the series (or to any selected series of the study); None
    when it may (the worker checks the loaded images again)."""
    if use is None:
        return None
    if series is not None:
        members = [series]
    else:
        query = select(Series).where(Series.study_pk == study.id, analysable_series())
        if selected is not None:
            query = query.where(Series.series_uid.in_(selected))
        members = list(session.scalars(query))
    regions = rule_book(settings).regions
    reasons = []
    for member in members:
        ds = stored_headers(session, settings, member)
        if ds is None:
            return None
        reason = header_reason(use, series_headers(ds, _series_frames(session, member)), regions)
        if reason is None:
            return None
        reasons.append(f"series {member.series_uid}: {reason}")
    return "; ".join(reasons) or None


def _done_when_nothing_pending(session: Session, study: Study) -> None:
    """A routed study whose jobs have all ended (e.g. every one not applicable) is done."""
    jobs = session.scalars(select(Job.state).where(Job.study_pk == study.id)).all()
    if jobs and not any(state in PENDING_STATES for state in jobs):
        study.state = "done"


# --- routing ---------------------------------------------------------------------------------


def _input_uids(session: Session, study: Study, series: Series | None, selected: list[str] | None = None) -> list[str]:
    """What the inputs' fingerprint is made of: each input's SOP Instance UID and content hash, so a
    re-sent instance with new content (a corrected patient name) makes the analyses run again."""
    query = select(Instance.sop_instance_uid + ":" + Instance.sha256).join(Series, Instance.series_pk == Series.id)
    if series is not None:
        query = query.where(Series.id == series.id)
    else:
        query = query.where(Series.study_pk == study.id, analysable_series())
        if selected is not None:
            query = query.where(Series.series_uid.in_(selected))
    return list(session.scalars(query))


def create_jobs(
    session: Session,
    settings: Settings,
    rule: Rule,
    study: Study,
    series: Series | None = None,
    selected: list[str] | None = None,
) -> list[int]:
    """Queue the rule's analyses unless the same inputs were already handled; returns new job ids.

    ``selected``: for a study-level rule, the series that satisfy its match (the job's inputs).
    A job with the same key and other inputs (late arrivals) is superseded by the new one.
    """

    uid = series.series_uid if series is not None else study.study_uid
    fingerprint = input_fingerprint(_input_uids(session, study, series, selected))
    created = []
    for analysis in rule.analyses:
        key = f"{rule.name}/{analysis.name}/{rule.level}/{uid}"
        previous = session.scalars(select(Job).where(Job.key == key).order_by(Job.id.desc()).limit(1)).first()
        if previous is not None and previous.input_fingerprint == fingerprint:
            if previous.state in (FAILED, DEAD):
                log.info(
                    "job %s for rule %s already %s with these inputs; not repeated",
                    previous.id,
                    rule.name,
                    previous.state,
                )
            continue
        reason = not_applicable_reason(
            session, settings, rule_book(settings).intended_uses.get(analysis.name), study, series, selected
        )
        job = queue_job(
            session,
            settings,
            key=key,
            analysis=analysis.name,
            params=analysis.params,
            rule=rule.name,
            level=rule.level,
            priority=rule.priority,
            destinations=rule.destinations,
            study_pk=study.id,
            series_pk=series.id if series is not None else None,
            study_uid=study.study_uid,
            series_uid=series.series_uid if series is not None else "",
            fingerprint=fingerprint,
            supersedes=previous.id if previous is not None else None,
        )
        if series is None and selected is not None:
            job.series_uids = json.dumps(selected)
        if reason is not None:
            job.state, job.error, job.finished_at = INAPPLICABLE, f"{analysis.name}: {reason}", utcnow()
            session.flush()
            log.info("study %s: rule %s: job %s not applicable (%s)", study.id, rule.name, job.id, reason)
            continue
        session.flush()
        created.append(job.id)
        log.info(
            "study %s: rule %s queued job %s (%s, %s%s)",
            study.id,
            rule.name,
            job.id,
            analysis.name,
            rule.priority,
            f", supersedes job {previous.id}" if previous is not None else "",
        )
    return created


def route_ready(settings: Settings) -> list[int]:
    """Route every ready series (series-level rules) and study (study-level rules); publish the new jobs."""

    new_jobs: list[int] = []
    with database_session(settings.database.url) as session:
        rules = current_rules(settings)
        for series in session.scalars(select(Series).where(Series.state == "ready")).all():
            study = session.get(Study, series.study_pk)
            facts = study_facts(session, study, series)
            hits = [r for r in rules if r.level == "series" and evaluate(r.match, facts)[0]]
            for rule in hits:
                new_jobs += create_jobs(session, settings, rule, study, series)
            series.state = "routed" if hits else "unrouted"
        for study in session.scalars(select(Study).where(Study.state == "ready")).all():
            verdicts = [(r, *study_verdict(session, study, r.match)) for r in rules if r.level == "study"]
            hits = [r for r, ok, _, _ in verdicts if ok]
            for rule, ok, _, selected in verdicts:
                if ok:
                    new_jobs += create_jobs(session, settings, rule, study, selected=selected)
            series_routed = session.scalar(
                select(func.count(Series.id)).where(Series.study_pk == study.id, Series.state == "routed")
            )
            if hits or series_routed:
                study.state = "routed"
                _done_when_nothing_pending(session, study)
            else:
                study.state = "unrouted"
                # The reason without patient data: the study's row id and each rule's failed condition.
                reasons = "; ".join(f"{r.name}: {why}" for r, _, why, _ in verdicts) or "no study-level rules"
                log.warning(
                    "study %s unrouted (kept %g h): %s", study.id, settings.storage.unrouted_retention_h, reasons
                )
    for job_id in new_jobs:
        publish_job(settings, job_id)
    return new_jobs


def _install_sighup(book: RuleBook) -> None:
    try:
        previous = signal.getsignal(signal.SIGHUP)

        def on_hup(signum: int, frame: Any) -> None:
            book.request_reload()
            if callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
                previous(signum, frame)

        signal.signal(signal.SIGHUP, on_hup)
    except (ValueError, AttributeError):  # not the main thread, or no SIGHUP on this platform
        log.info("SIGHUP reload not installed here; the file is watched instead")


def periodic_tasks(
    settings: Settings, intended_uses: dict[str, IntendedUse] | None = None
) -> list[tuple[str, float, Callable[[], None]]]:
    """Rule reload watch (SIGHUP or file change), once a second. ``intended_uses`` (analysis name
    -> IntendedUse, from the composition root) are checked before a job is queued."""
    book = rule_book(settings)
    book.intended_uses = dict(intended_uses or {})
    _install_sighup(book)
    log.info(
        "%d rules in force (%s); they reload on SIGHUP or when %s changes",
        len(book.rules),
        ", ".join(r.name for r in book.rules) or "none",
        book.path or "the configuration file",
    )
    return [("rules-reload", 1.0, book.check)]


# --- ainode rules test -----------------------------------------------------------------------


def _read_headers(paths: list[Path]) -> tuple[dict[str, dict[str, FileSeries]], int]:
    studies: dict[str, dict[str, FileSeries]] = {}
    skipped = 0
    files: list[Path] = []
    for p in paths:
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        except Exception:  # noqa: BLE001 - not DICOM, or no study/series: reported as skipped
            skipped += 1
            continue
        series = studies.setdefault(study_uid, {}).setdefault(series_uid, FileSeries(series_uid))
        series.headers.append(ds)
    return studies, skipped


def explain_rules(settings: Settings, paths: list[Path]) -> int:
    """Print, per study (and series for series-level rules), which rules match and why others do not.

    Returns 0 when DICOM data was found, 1 when none was.
    """
    studies, skipped = _read_headers(paths)
    if skipped:
        print(f"{skipped} file(s) skipped: not DICOM or without Study/Series Instance UID")
    if not studies:
        print("no DICOM data found")
        return 1
    if not settings.rules:
        print("the configuration has no rules: every study would be unrouted")
    for number, (study_uid, series_map) in enumerate(studies.items(), 1):
        all_series = list(series_map.values())
        facts = file_facts(all_series)
        print(
            f"study {number}: {study_uid} ({len(all_series)} series, {facts['instances'][0]} instances, "
            f"modality {', '.join(facts['modality']) or '-'})"
        )
        per_series = [(s.uid, file_facts([s])) for s in all_series]
        for rule in settings.rules:
            if rule.level == "study":
                ok, why, selected = evaluate_per_series(rule.match, per_series)
                _print_verdict(rule, ok, why, indent="  ")
                if ok:
                    print(f"    on {len(selected)} of {len(all_series)} series: {', '.join(selected)}")
            else:
                print(f"  {rule.name} (series level):")
                for s in all_series:
                    label = f"series {s.uid} ({_str(s.headers[0], 'Modality') or '-'}, {len(s.headers)} instances)"
                    _print_verdict(rule, *evaluate(rule.match, file_facts([s])), indent="    ", label=label)
    return 0


def _print_verdict(rule: Rule, ok: bool, why: str, indent: str, label: str | None = None) -> None:
    name = label or rule.name
    if ok:
        analyses = ", ".join(a.name for a in rule.analyses)
        print(
            f"{indent}{name}: MATCH -> {analyses} (priority {rule.priority}, "
            f"destinations {', '.join(rule.destinations) or 'none'})"
        )
    else:
        print(f"{indent}{name}: no match - {why}")
