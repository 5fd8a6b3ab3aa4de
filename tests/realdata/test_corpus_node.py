"""The corpus through the real job path: pydicom-data's and pydicom's test files pushed to
`ainode serve` (embedded worker, the reference models) with DCMTK storescu in their native
transfer syntaxes and through Orthanc's REST push, with naive rules that send every modality to
every analysis it could plausibly be routed to, and Orthanc as the PACS the results go to.

Checked: every file is answered as docs/conformance.md says; every job ends succeeded, not
applicable, or failed once with a reason naming a UID and the attribute (none dead, none
retried); every result object Orthanc received passes dciodvfy (less the errors its source has)
and one SR per analysis passes PixelMed's DicomSRValidator; no SR or SEG claims a finding for the
images outside the models' intended use; the node's log holds no patient names, nor does the
audit log outside its Patient participant objects.

Select it with ``-m realdata``; it takes a few minutes on two cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.uid import UID
from sqlalchemy import create_engine, text

from tests.helpers import NodeProcess, outside_patient_objects, wait_for
from tests.results.peers import Orthanc
from tests.results.validators import dciodvfy_errors, sr_validator_errors

pytestmark = pytest.mark.realdata

STORESCU = "/usr/bin/storescu"
RULES = [
    {"name": "ct", "match": {"modality": "CT"}, "analyses": ["ct-segmentation", "ct-lesion-detection", "ct-denoising"]},
    {"name": "xr", "match": {"modality": {"one_of": ["CR", "DX"]}}, "analyses": ["nodule-classification"]},
    {"name": "cine", "match": {"modality": {"one_of": ["US", "MR"]}}, "analyses": ["ejection-fraction"]},
]
# storescu's option proposing each transfer syntax (with -R: only what the files need).
PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
# Studies pushed by Orthanc (POST /modalities/{id}/store) instead of storescu: a CT, an
# enhanced multi-frame CT, a colour ultrasound cine.
THROUGH_ORTHANC = ("CT_small.dcm", "eCT_Supplemental.dcm", "color3d_jpeg_baseline.dcm")
# Images outside every reference model's intended use (head CT, neck CT, tibia radiograph, brain,
# knee and abdomen MR, fetal ultrasound): no SR may claim a finding or a measurement for them, no
# SEG. (examples_ybr_color / color3d_jpeg_baseline is a real echocardiogram: in scope.)
OUT_OF_SCOPE = re.compile(
    r"^(693_|RG3_|emri_small|MR_small|MR2_|J2K_pixelrep|bad_sequence|OBXXXX1A|MR-SIEMENS|examples_overlay|examples_palette)"
)
FINDING_CODES = {"52101004", "10230-1"}  # Present; Left ventricular ejection fraction
# A permanent failure names the input (a UID) and the attribute (a tag or a keyword).
NAMES_INPUT = re.compile(r"(SOP Instance|Series Instance|Study Instance) UID [0-9.]+")
NAMES_ATTRIBUTE = re.compile(r"\([0-9A-F]{4},[0-9A-F]{4}\)")
SEG_WITHOUT_SLICE_THICKNESS = "/PixelMeasuresSequence(0028,9110)[1]/SliceThickness(0018,0050)> - Missing attribute"


@dataclass
class Source:
    """One corpus file: what the node should make of it."""

    path: Path
    sop_uid: str
    study_uid: str
    series_uid: str
    syntax: str
    patient_name: str


def valid_uid(value: str) -> bool:
    return bool(value) and UID(value).is_valid


def sources() -> list[Source]:
    """Every readable file of pydicom's and pydicom-data's test files with pixel data, by name."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(set(get_testdata_files("*")) | set(get_charset_files("*.dcm")), key=lambda p: Path(p).name):
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True)
                if "PixelData" not in pydicom.dcmread(name, specific_tags=["PixelData"]):
                    continue
                syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
            except Exception:  # noqa: BLE001 - not a readable DICOM file: not part of the corpus
                continue
            found.append(
                Source(
                    Path(name),
                    str(ds.get("SOPInstanceUID", "")),
                    str(ds.get("StudyInstanceUID", "")),
                    str(ds.get("SeriesInstanceUID", "")),
                    syntax,
                    str(ds.get("PatientName", "")),
                )
            )
    return found


def push(node: NodeProcess, files: list[Source], syntax: str) -> dict[Path, str]:
    """storescu the files (one association) proposing their own transfer syntax; each sent
    file's answer as storescu prints it ("Success", "Warning ...", "Error ..."; absent: not sent)."""
    propose = [PROPOSE[syntax]] if syntax in PROPOSE else []
    cmd = [STORESCU, "-v", "-nh", "-R", *propose, "-aet", "STORESCU", "-aec", node.ae_title]
    run = subprocess.run(
        [*cmd, "127.0.0.1", str(node.port), *(str(f.path) for f in files)], capture_output=True, text=True
    )
    answers, current = {}, None
    for line in (run.stdout + run.stderr).splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif current and line.startswith("I: Received Store Response ("):
            answers[current] = line.removeprefix("I: Received Store Response (").rstrip(")")
        elif current and line.startswith("E: Store Failed"):
            answers[current] = "Error: not sent"
    return answers


def expected_answer(source: Source, seen: dict[str, bytes]) -> set[str]:
    """The answers docs/conformance.md allows, given what was sent before (first word)."""
    if not (valid_uid(source.study_uid) and valid_uid(source.series_uid) and valid_uid(source.sop_uid)):
        return {"Error"}  # 0xC001: a missing or invalid UID
    if source.sop_uid in seen:
        # The same instance again in another transfer syntax: identical (Success), corrected
        # identification (Success), otherwise keep_first's Warning 0xB006.
        return {"Success", "Warning"}
    return {"Success"}


def query(node: NodeProcess, sql: str, **params) -> list[tuple]:
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params).all()]
    finally:
        engine.dispose()


def settled(node: NodeProcess) -> bool:
    """Every study routed and done, every job final, every delivery final."""
    busy = query(
        node,
        "SELECT (SELECT count(*) FROM studies WHERE state IN ('received', 'ready', 'routed'))"
        " + (SELECT count(*) FROM jobs WHERE state IN ('queued', 'running', 'retrying'))"
        " + (SELECT count(*) FROM deliveries WHERE state IN ('pending', 'sending'))",
    )[0][0]
    return busy == 0 and query(node, "SELECT count(*) FROM jobs")[0][0] > 0


def indexed_uids(node: NodeProcess) -> set[str]:
    """SOP Instance UIDs of every instance in the node's index."""
    return {uid for (uid,) in query(node, "SELECT sop_instance_uid FROM instances")}


def orthanc_push(orthanc: Orthanc, files: list[Source]) -> list[str]:
    """Upload the files into Orthanc, then have Orthanc push their studies to the node."""
    studies = set()
    for source in files:
        answer = json.loads(
            subprocess.run(
                ["curl", "-sf", "-X", "POST", "--data-binary", f"@{source.path}", orthanc_url(orthanc, "/instances")],
                capture_output=True,
                check=True,
            ).stdout
        )
        studies.add(answer["ParentStudy"])
    body = json.dumps({"Resources": sorted(studies), "Synchronous": True})
    subprocess.run(
        ["curl", "-sf", "-X", "POST", "-d", body, orthanc_url(orthanc, "/modalities/ainode/store")],
        capture_output=True,
        check=True,
    )
    return sorted(studies)


def orthanc_url(orthanc: Orthanc, path: str) -> str:
    return f"http://127.0.0.1:{orthanc.http_port}{path}"


def fetch_result(orthanc: Orthanc, sop_uid: str, folder: Path) -> Path | None:
    """The instance Orthanc holds under this SOP Instance UID, as a file (None: not there)."""
    found = json.loads(
        subprocess.run(
            ["curl", "-sf", "-X", "POST", "-d", sop_uid, orthanc_url(orthanc, "/tools/lookup")],
            capture_output=True,
            check=True,
        ).stdout
    )
    ids = [f["ID"] for f in found if f["Type"] == "Instance"]
    if not ids:
        return None
    path = folder / f"{sop_uid}.dcm"
    path.write_bytes(orthanc.instance_file(ids[0]))
    return path


def referenced_uids(ds: pydicom.Dataset) -> set[str]:
    """Every Referenced SOP Instance UID anywhere in a result (its evidence, its sources)."""
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            found.add(str(elem.value))
    return found


def claims(ds: pydicom.Dataset) -> list[str]:
    """What a result asserts: a SEG's segments, an SR's 'Present', LVEF, image regions."""
    if ds.Modality == "SEG":
        return [f"segment {s.SegmentLabel}" for s in ds.get("SegmentSequence", [])]
    out = []
    for elem in ds.iterall():
        if elem.keyword == "CodeValue" and str(elem.value) in FINDING_CODES:
            out.append(f"code {elem.value}")
        elif elem.keyword == "ValueType" and elem.value in ("SCOORD", "SCOORD3D"):
            out.append("image region")
    return out


def test_the_corpus_through_the_node_ends_in_documented_outcomes(tmp_path):
    corpus = sources()
    by_name = {s.path.name: s for s in corpus}
    orthanc_studies = {by_name[n].study_uid for n in THROUGH_ORTHANC}
    orthanc_files = [s for s in corpus if s.study_uid in orthanc_studies]
    storescu_files = [s for s in corpus if s.study_uid not in orthanc_studies]
    assert len(corpus) > 120 and orthanc_files

    orthanc = Orthanc(tmp_path / "orthanc")
    node = NodeProcess(
        tmp_path / "node",
        {
            "destinations": [
                {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
            ],
            "rules": [dict(rule, destinations=["pacs"]) for rule in RULES],
            "timers": {"series_quiet_s": 1, "study_quiet_s": 2},
        },
    )
    orthanc.modalities = {"ainode": (node.ae_title, node.port)}
    orthanc.start()
    problems: list[str] = []
    try:
        with node:
            # storescu: one association per study and transfer syntax, in name order.
            seen: dict[str, bytes] = {}
            groups: dict[tuple[str, str], list[Source]] = defaultdict(list)
            for source in storescu_files:
                groups[(source.study_uid, source.syntax)].append(source)
            pushed = 0
            for (_, syntax), files in groups.items():
                answers = push(node, files, syntax)
                for source in files:
                    answer = answers.get(source.path)
                    if answer is None:
                        continue  # storescu could not read or propose it: never reached the node
                    pushed += 1
                    allowed = expected_answer(source, seen)
                    if answer.split(":")[0].split(",")[0].split(" ")[0] not in allowed:
                        problems.append(f"{source.path.name}: answered {answer!r}, expected {sorted(allowed)}")
                    if answer.startswith(("Success", "Warning")):
                        seen.setdefault(source.sop_uid, b"")
            assert pushed > 100, f"storescu sent only {pushed} files"
            orthanc_push(orthanc, orthanc_files)
            # Orthanc's push returns once the node answered; the instances reach the index (and
            # their study a state settled() sees) a moment later, after the journal.
            expected = {s.sop_uid for s in orthanc_files if valid_uid(s.sop_uid)}
            wait_for(lambda: expected <= indexed_uids(node), timeout=600, interval=1.0)
            done = wait_for(lambda: settled(node), timeout=3600, interval=2.0)
            assert done, node.log_text()[-4000:]

            jobs = query(node, "SELECT id, study_uid, analysis, state, attempts, error FROM jobs ORDER BY id")
            outcomes = Counter(j[3] for j in jobs)
            for job_id, _study, analysis, state, attempts, error in jobs:
                if state not in ("succeeded", "inapplicable", "failed"):
                    problems.append(f"job {job_id} {analysis}: {state} ({error})")
                if attempts > 1:
                    problems.append(f"job {job_id} {analysis}: retried ({attempts} attempts): {error}")
                if state == "failed" and not (NAMES_INPUT.search(error) and NAMES_ATTRIBUTE.search(error)):
                    problems.append(f"job {job_id} {analysis}: failed without naming input and attribute: {error}")
            # Every source study the node took reached the index whole (Orthanc's push lost nothing).
            indexed = indexed_uids(node)
            missing = [s.path.name for s in orthanc_files if valid_uid(s.sop_uid) and s.sop_uid not in indexed]
            assert not missing, f"Orthanc's push lost {missing}"

            deliveries = query(
                node,
                "SELECT d.sop_instance_uid, d.kind, d.state, d.reason, j.analysis FROM deliveries d"
                " JOIN jobs j ON j.id = d.job_id ORDER BY d.id",
            )
        log = node.log_text()
        audit = (node.workdir / "audit.log").read_text(errors="replace")
        fetched = []
        (tmp_path / "results").mkdir()
        for sop_uid, kind, state, reason, analysis in deliveries:
            if state != "delivered":
                problems.append(f"{analysis} {kind} {sop_uid}: {state} ({reason})")
            elif (path := fetch_result(orthanc, sop_uid, tmp_path / "results")) is None:
                problems.append(f"{analysis} {kind} {sop_uid}: delivered but not in Orthanc")
            else:
                fetched.append((path, kind, analysis))
    finally:
        orthanc.stop()

    # Validation: dciodvfy on every object, less what its sources already have; SRs sampled.
    source_by_uid = {s.sop_uid: s for s in corpus}
    source_errors: dict[Path, list[str]] = {}
    all_uids = {u for s in corpus for u in (s.sop_uid, s.study_uid, s.series_uid)}
    sampled: dict[str, Path] = {}
    for path, kind, analysis in fetched:
        ds = pydicom.dcmread(path)
        refs = [source_by_uid[u] for u in referenced_uids(ds) & set(source_by_uid)]
        inherited: set[str] = set()
        for ref in refs:
            if ref.path not in source_errors:
                source_errors[ref.path] = dciodvfy_errors(ref.path)
            if pydicom.dcmread(ref.path, stop_before_pixels=True).SOPClassUID == ds.SOPClassUID:
                inherited.update(source_errors[ref.path])
        errors = [
            e
            for e in dciodvfy_errors(path)
            if e not in inherited
            and SEG_WITHOUT_SLICE_THICKNESS not in e
            and not ("Illegal root for UID" in e and any(f"<{u}>" in e for u in all_uids))
        ]
        if errors:
            problems.append(f"{analysis} {kind} over {[r.path.name for r in refs][:3]}: {errors[:3]}")
        if ds.Modality == "SR":
            sampled.setdefault(analysis, path)
        outside = sorted({r.path.name for r in refs if OUT_OF_SCOPE.match(r.path.name)})
        if outside and claims(ds):
            problems.append(f"{analysis} {kind} claims {claims(ds)[:3]} for out-of-scope {outside[:3]}")
    # The validator can fail: a copy of a result SR without its root concept name is flagged.
    broken = pydicom.dcmread(next(iter(sampled.values())))
    del broken.ConceptNameCodeSequence
    broken.save_as(tmp_path / "broken-sr.dcm")
    assert any("ConceptNameCodeSequence" in e for e in dciodvfy_errors(tmp_path / "broken-sr.dcm"))
    for analysis, sr in sorted(sampled.items()):
        errors = sr_validator_errors(sr)
        if errors:
            problems.append(f"SR of {analysis}: {errors[:3]}")

    # No patient names in the node's log, nor in its audit trail outside the Patient participant
    # objects PS3.15 asks for (the audit trail is the protected record of whose data was handled).
    audit = outside_patient_objects(audit)
    names = {s.patient_name for s in corpus if len(s.patient_name.replace("^", "")) >= 4}
    for name in sorted(names):
        for part in {name, *name.split("^")} - {""}:
            if len(part) >= 4 and (part in log or part in audit):
                problems.append(f"patient name part {part!r} of {name!r} in the node's log or audit")

    print(
        f"{pushed} files by storescu, {len(orthanc_files)} through Orthanc; jobs {dict(outcomes)};"
        f" {len(fetched)} result objects validated, {len(sampled)} SRs through DicomSRValidator"
    )
    assert problems == [], "\n".join(problems)
    assert outcomes["succeeded"] > 0 and outcomes["inapplicable"] > 0 and len(fetched) > 0
