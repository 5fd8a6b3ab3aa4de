"""The ``fhir`` sender: one FHIR R4 transaction Bundle per report, POSTed to the server's base URL.

The Bundle (built with fhir.resources' validated R4B models, whose resources are the same as R4
for these types) holds the Patient (conditional create on its identifier), the DiagnosticReport
(conditional update on a stable report identifier: status preliminary, or corrected when a re-run
supersedes an earlier result; category radiology; basedOn the order by accession identifier;
imagingStudy by Study Instance UID) and one Observation per finding and measurement
(valueCodeableConcept / valueQuantity in UCUM; interpretation AA when critical), each also a
conditional update on its own stable identifier. Re-sending the same Bundle changes nothing: no
duplicates.

HTTP 200 with every entry 2xx: delivered. 408/429/5xx or no connection: link down (retried with
backoff). 400/422 (the server refused the content): failed for good with its OperationOutcome
text. Other 4xx (auth, forbidden): retried up to ``ris.max_refusals`` attempts, then failed.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

from fhir.resources.R4B.bundle import Bundle

from node.core.settings import Destination, Settings
from node.dispatch.link import LinkDown, Outcome, Progress, tls_context
from node.dispatch.report import Code, Group, Quantity, Report, Unbuildable, send_reports
from node.dispatch.table import DELIVERED, FAILED, PENDING, Delivery

SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
}
REPORT_SYSTEM = "urn:ainode:report"
OBSERVATION_SYSTEM = "urn:ainode:observation"
ANALYSIS_SYSTEM = "urn:ainode:analysis"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
GENDER = {"M": "male", "F": "female", "O": "other"}
NAMESPACE = uuid.UUID("6f1c2a7e-3d7b-4a54-9d0e-5f0c8a1b2c3d")


def coding(code: Code) -> dict[str, str]:
    """A FHIR Coding from an SR code (DICOM scheme designators mapped to FHIR system URIs)."""
    return {
        "system": SYSTEMS.get(code.scheme, f"urn:dicom:scheme:{code.scheme}"),
        "code": code.value,
        "display": code.meaning,
    }


def _fhir_date(dicom_date: str) -> str | None:
    if len(dicom_date) >= 8 and dicom_date[:8].isdigit():
        return f"{dicom_date[:4]}-{dicom_date[4:6]}-{dicom_date[6:8]}"
    return None


def _fhir_datetime(dicom_datetime: str) -> str | None:
    day = _fhir_date(dicom_datetime)
    if day is None:
        return None
    clock = dicom_datetime[8:14].ljust(6, "0") if dicom_datetime[8:].isdigit() else "000000"
    return f"{day}T{clock[:2]}:{clock[2:4]}:{clock[4:6]}Z"


def _human_names(report: Report) -> list[dict[str, Any]]:
    names = []
    for representation, (family, given, middle, prefix, suffix) in report.patient_name.groups.items():
        name: dict[str, Any] = {"use": "official"}
        if family:
            name["family"] = family
        if given or middle:
            name["given"] = [n for n in (given, middle) if n]
        if prefix:
            name["prefix"] = [prefix]
        if suffix:
            name["suffix"] = [suffix]
        if representation != "A":
            name["extension"] = [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation",
                    "valueCode": {"I": "IDE", "P": "SYL"}[representation],
                }
            ]
        names.append(name)
    return names


def _patient_identifier(report: Report, dest: Destination) -> dict[str, str]:
    system = (
        f"urn:ainode:issuer:{report.issuer_of_patient_id}"
        if report.issuer_of_patient_id
        else dest.ris.patient_identifier_system
    )
    return {"system": system, "value": report.patient_id}


def _quantity(quantity: Quantity) -> dict[str, Any]:
    return {
        "value": float(f"{quantity.value:.6g}"),
        "unit": quantity.unit.meaning,
        "system": SYSTEMS["UCUM"],
        "code": quantity.unit.value,
    }


def _observation_values(group: Group) -> list[dict[str, Any]]:
    """A finding is one Observation (its evaluation as value, its measurements as components);
    measurements without a finding (an ejection fraction) are one Observation each."""
    if group.finding is None:
        return [{"code": {"coding": [coding(q.name)]}, "valueQuantity": _quantity(q)} for q in group.quantities]
    evaluation = next((value for concept, value in group.evaluations if concept == group.finding), None)
    value = {"coding": [coding(evaluation or group.finding)]}
    components = [{"code": {"coding": [coding(q.name)]}, "valueQuantity": _quantity(q)} for q in group.quantities]
    components += [
        {"code": {"coding": [coding(c)]}, "valueCodeableConcept": {"coding": [coding(v)]}}
        for c, v in group.evaluations
        if c != group.finding
    ]
    item: dict[str, Any] = {"code": {"coding": [coding(group.finding)]}, "valueCodeableConcept": value}
    if components:
        item["component"] = components
    return [item]


def _observations(report: Report, group: Group, index: int, subject: str) -> list[dict[str, Any]]:
    common: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "corrected" if report.correction else "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging"}]}],
        "subject": {"reference": subject},
    }
    if _fhir_datetime(report.content_datetime):
        common["effectiveDateTime"] = _fhir_datetime(report.content_datetime)
    if group.critical:
        common["interpretation"] = [
            {"coding": [{"system": INTERPRETATION, "code": "AA", "display": "Critical abnormal"}]}
        ]
    if group.site is not None:
        common["bodySite"] = {"coding": [coding(group.site)]}
    resources = []
    for n, item in enumerate(_observation_values(group)):
        identifier = f"{report.report_id}-{group.tracking_id or index}-{n}"
        resources.append({**common, **item, "identifier": [{"system": OBSERVATION_SYSTEM, "value": identifier}]})
    return resources


def _entry(resource: dict[str, Any], method: str, url: str, if_none_exist: str | None = None) -> dict[str, Any]:
    full_url = f"urn:uuid:{uuid.uuid5(NAMESPACE, resource['resourceType'] + json.dumps(resource.get('identifier')))}"
    request: dict[str, str] = {"method": method, "url": url}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": full_url, "resource": resource, "request": request}


def build_bundle(report: Report, dest: Destination) -> dict[str, Any]:
    """The transaction Bundle for one report, validated by fhir.resources, as JSON-ready data."""
    ident = _patient_identifier(report, dest)
    patient: dict[str, Any] = {"resourceType": "Patient", "identifier": [ident]}
    if report.patient_name.groups:
        patient["name"] = _human_names(report)
    if _fhir_date(report.birth_date):
        patient["birthDate"] = _fhir_date(report.birth_date)
    patient["gender"] = GENDER.get(report.sex, "unknown")
    patient_entry = _entry(patient, "POST", "Patient", f"identifier={ident['system']}|{ident['value']}")
    subject = patient_entry["fullUrl"]
    observation_entries = []
    for index, group in enumerate(report.groups, start=1):
        for obs in _observations(report, group, index, subject):
            key = obs["identifier"][0]["value"]
            observation_entries.append(_entry(obs, "PUT", f"Observation?identifier={OBSERVATION_SYSTEM}|{key}"))
    status = "corrected" if report.correction else "preliminary"
    diagnostic: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": REPORT_SYSTEM, "value": report.report_id}],
        "status": status,
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": {
            "coding": [{"system": ANALYSIS_SYSTEM, "code": report.analysis or "ai-analysis"}],
            "text": report.algorithm or report.analysis or "AI analysis",
        },
        "subject": {"reference": subject},
        "imagingStudy": [
            {
                "type": "ImagingStudy",
                "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{report.study_instance_uid}"},
            }
        ],
        "result": [{"reference": e["fullUrl"]} for e in observation_entries],
    }
    order = report.order_number(dest.ris.order_number)
    if order:
        diagnostic["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": order},
            }
        ]
    if _fhir_datetime(report.study_datetime):
        diagnostic["effectiveDateTime"] = _fhir_datetime(report.study_datetime)
    if report.critical():
        diagnostic["conclusion"] = "Critical finding (AI, preliminary)"
    report_entry = _entry(diagnostic, "PUT", f"DiagnosticReport?identifier={REPORT_SYSTEM}|{report.report_id}")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [patient_entry, *observation_entries, report_entry],
    }
    Bundle.model_validate(bundle)  # the library's R4B models: a malformed resource fails here, not at the RIS
    return bundle


def _post(dest: Destination, bundle: dict[str, Any]) -> tuple[int, bytes]:
    return _request(dest, "POST", "", bundle)


def _request(
    dest: Destination, method: str, path: str, body: Any = None, content_type: str = "application/fhir+json"
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        dest.url.rstrip("/") + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": content_type, "Accept": "application/fhir+json"},
    )
    if dest.ris.token:
        request.add_header("Authorization", f"Bearer {dest.ris.token}")
    elif dest.username:
        token = base64.b64encode(f"{dest.username}:{dest.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = tls_context(dest) if dest.url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=dest.ris.answer_timeout_s, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError) as err:
        raise LinkDown(f"FHIR request failed: {getattr(err, 'reason', err)}") from None


def _outcome_text(payload: bytes) -> str:
    try:
        doc = json.loads(payload or b"{}")
    except ValueError:
        return payload[:300].decode("utf-8", errors="replace")
    issues = doc.get("issue", []) if isinstance(doc, dict) else []
    return "; ".join(
        str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code", "")) for i in issues
    )[:500]


def answer_outcome(code: int, payload: bytes, attempts: int, dest: Destination) -> Outcome:
    """Delivered, retried or failed by the HTTP status of the transaction and of each entry."""
    if code in (408, 429) or code >= 500:
        raise LinkDown(f"FHIR server answered HTTP {code}: {_outcome_text(payload)}")
    if code == 200:
        doc = json.loads(payload or b"{}")
        statuses = [str((e.get("response") or {}).get("status", "")) for e in doc.get("entry", [])]
        if statuses and all(s[:1] == "2" for s in statuses):
            return Outcome(DELIVERED, "HTTP 200")
        return Outcome(FAILED, "HTTP 200", f"FHIR transaction entries answered {', '.join(statuses)}")
    reason = f"FHIR server answered HTTP {code}: {_outcome_text(payload)}"
    if code in (400, 422) or attempts >= dest.ris.max_refusals:
        return Outcome(FAILED, f"HTTP {code}", reason)
    return Outcome(PENDING, f"HTTP {code}", reason)


def _locations(payload: bytes) -> list[str]:
    """'Type/id' of each entry of a transaction-response, in order."""
    doc = json.loads(payload or b"{}")
    return ["/".join(str((e.get("response") or {}).get("location", "")).split("/")[:2]) for e in doc.get("entry", [])]


def _transaction(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _rewrite(entry: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    """The entry with references to earlier steps' fullUrls replaced by the ids the server gave."""
    text = json.dumps(entry)
    for full_url, location in ids.items():
        text = text.replace(f'"reference": "{full_url}"', f'"reference": "{location}"')
    return json.loads(text)


def post_report(dest: Destination, bundle: dict[str, Any], attempts: int) -> Outcome:
    """POST the Bundle as one transaction; a Bundle larger than ``ris.max_transaction_entries``
    goes in steps (Patient, Observations in chunks, then the DiagnosticReport), each a
    transaction of conditional writes, so a retry after a partial send changes nothing twice."""
    entries = bundle["entry"]
    limit = dest.ris.max_transaction_entries
    if not limit or len(entries) <= limit:
        return answer_outcome(*_post(dest, bundle), attempts, dest)
    patient, observations, report = entries[0], entries[1:-1], entries[-1]
    ids: dict[str, str] = {}
    steps = [[patient]] + [observations[i : i + limit] for i in range(0, len(observations), limit)] + [[report]]
    for step in steps:
        step = [_rewrite(e, ids) for e in step]
        code, payload = _post(dest, _transaction(step))
        outcome = answer_outcome(code, payload, attempts, dest)
        if outcome.result != DELIVERED:
            return outcome
        ids.update({e["fullUrl"]: location for e, location in zip(step, _locations(payload))})
    return Outcome(DELIVERED, "HTTP 200", f"sent in {len(steps)} transactions")


def raise_priority(report: Report, dest: Destination) -> str:
    """Make the report's ServiceRequest (found by its accession identifier) STAT with a JSON
    Patch; what came of it, as a note on the delivered row."""
    order = report.order_number(dest.ris.order_number)
    if not order:
        return "no order number: priority not raised"
    query = urllib.parse.urlencode({"identifier": order})
    try:
        code, payload = _request(dest, "GET", f"/ServiceRequest?{query}")
        found = [e["resource"] for e in json.loads(payload or b"{}").get("entry", [])] if code == 200 else []
        if len(found) != 1:
            return f"no single ServiceRequest with identifier {order}: priority not raised"
        patch = [{"op": "add", "path": "/priority", "value": "stat"}]
        code, payload = _request(
            dest, "PATCH", f"/ServiceRequest/{found[0]['id']}", patch, content_type="application/json-patch+json"
        )
    except LinkDown as err:
        return f"priority update not sent: {err}"
    return (
        "priority raised to stat" if code == 200 else f"priority update answered HTTP {code}: {_outcome_text(payload)}"
    )


def send_fhir_batch(
    dest: Destination, rows: list[Delivery], settings: Settings, progress: Progress | None = None
) -> dict[int, Outcome]:
    """The ``fhir`` sender: a transaction Bundle per SR row, critical ones first."""

    def send(row: Delivery, report: Report) -> Outcome:
        try:
            bundle = build_bundle(report, dest)
        except Exception as err:  # noqa: BLE001 - this report cannot be expressed: say why, send the rest
            raise Unbuildable(f"Bundle not built: {type(err).__name__}: {err}") from err
        outcome = post_report(dest, bundle, row.attempts)
        if outcome.result == DELIVERED and report.critical() and dest.ris.priority_update:
            outcome.reason = raise_priority(report, dest)
        return outcome

    return send_reports(rows, settings, progress, send)
