"""The configuration of an ainode installation: the one description of every setting.

A YAML file in the shape documented in ``config/ainode.example.yaml`` is validated by the pydantic
models below. Environment variables named ``AINODE_<SECTION>__<KEY>`` (double underscore between
levels) override file values, e.g. ``AINODE_NODE__PORT=11113`` or
``AINODE_BROKER__URL=redis://10.0.0.5:6379/0``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from node.core.intended_use import IntendedUse

ENV_PREFIX = "AINODE_"
# The least free space kept (storage.min_free_bytes is raised to it): room to place everything
# the journals of four receivers (64 MiB each, node.ingest.journal) hold when the disk fills.
MIN_FREE_FLOOR = 256 * 1024**2

# --- small validated types -------------------------------------------------------------------


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: AE is 16 characters of the default repertoire, no backslash or control chars.
    if not 1 <= len(value.strip()) <= 16:
        raise ValueError("must be 1..16 characters")
    if "\\" in value or any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ValueError("must be printable ASCII without backslash")
    return value.strip()


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be 1..65535")
    return value


def _check_host_pattern(value: str) -> str:
    # An allowed peer address: an IP, a CIDR network, or a host name (resolved at connect time).
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", value):
            raise ValueError("must be an IP address, a CIDR network or a host name") from None
    return value


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, AfterValidator(_check_port)]
HostPattern = Annotated[str, AfterValidator(_check_host_pattern)]
Seconds = Annotated[float, Field(ge=0)]


class Section(BaseModel):
    """Base of every configuration section: unknown keys are errors (typos must not pass)."""

    model_config = ConfigDict(extra="forbid")


# --- node, storage, database, broker ----------------------------------------------------------


class TLSSettings(Section):
    """TLS for the DICOM listener or a destination (TLS 1.2 or newer only)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> "TLSSettings":
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("certificate and private_key are required when TLS is enabled")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("ca_certificates is required to verify client certificates")
        return self


class NodeSettings(Section):
    """The DICOM listener: who we are and how associations are handled."""

    ae_title: AETitle = "AINODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    # Receiver processes sharing the port (SO_REUSEPORT); 0 = one per CPU core, at most 4.
    receivers: int = Field(default=0, ge=0, le=64)
    max_associations: int = Field(default=32, ge=1)
    max_associations_per_peer: int = Field(default=8, ge=1)
    acse_timeout_s: Seconds = 30
    dimse_timeout_s: Seconds = 60
    network_timeout_s: Seconds = 60
    # The receiver's ARTIM timer (PS3.8 9.1.5), from accept: a connection whose A-ASSOCIATE-RQ
    # has not arrived whole by then is closed (and after a reject, one the peer keeps open).
    # The receiver's ACSE timeout; acse_timeout_s is the node's own requests' (destinations).
    artim_timeout_s: float = Field(default=10, gt=0)
    # Pending connections (accepted, A-ASSOCIATE-RQ not yet accepted), per receiver process and
    # apart from the association limits: per source address, and in total for addresses that no
    # peer lists by IP address or network. Connections over either limit are closed at once.
    max_pending_per_address: int = Field(default=8, ge=1)
    max_pending_connections: int = Field(default=64, ge=1)
    # Largest P-DATA PDU we accept (announced to peers; longer PDUs abort the association).
    # 0 announces no limit; the receiver still refuses P-DATA PDUs over 256 MiB.
    max_pdu_bytes: int = Field(default=1_048_576, ge=0)
    # Largest data set accepted, as received or once inflated (Deflated Explicit VR Little
    # Endian): a deflated data set inflating past this is refused with A700 (Out of Resources).
    max_instance_bytes: ByteSize = ByteSize(4 * 1024**3)
    # A second copy of a stored SOP Instance UID with different bytes: keep the first or replace.
    duplicate_policy: Literal["keep_first", "replace"] = "keep_first"
    # A storage SOP class newer than the node's list: "standard" accepts any class the standard
    # could have defined (UID under 1.2.840.10008.5.1.4.1.1), "refuse" only the listed ones.
    unknown_storage_classes: Literal["standard", "refuse"] = "standard"
    # Accept any calling AE title (demo and lab use only); peers are still logged.
    accept_unknown_peers: bool = False
    tls: TLSSettings = TLSSettings()


class StorageSettings(Section):
    """Where received instances and result objects live (shared with the workers)."""

    path: Path = Path("./var/store")
    # Below this much free space new instances are refused with A700 (Out of Resources).
    # Never less than MIN_FREE_FLOOR: what was answered from a journal still needs room to be
    # placed at its final path.
    min_free_bytes: ByteSize = ByteSize(2 * 1024**3)
    # Studies that matched no rule are removed after this many hours.
    unrouted_retention_h: float = Field(default=24.0, ge=0)
    # All received data is removed this many days after processing (0 = keep forever).
    retention_days: float = Field(default=7.0, ge=0)
    # When used space passes this fraction of the disk, the oldest finished studies go first.
    high_water_mark: float = Field(default=0.90, gt=0, le=1)
    # Decode each received instance once, in the background, into a per-series volume file the
    # analysis maps instead of reading and decoding every file again (node.core.volumes).
    stream_volumes: bool = True

    @field_validator("min_free_bytes")
    @classmethod
    def _at_least_the_floor(cls, value: ByteSize) -> ByteSize:
        # 0 (or any small reserve) let the journals' answered instances find no room to be
        # placed, so they were acknowledged and never indexed (issue 19).
        return ByteSize(max(int(value), MIN_FREE_FLOOR))


class DatabaseSettings(Section):
    """The index and the job/outbox tables (SQLAlchemy URL)."""

    url: str = "sqlite:///./var/ainode.db"

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, value: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return value


class BrokerSettings(Section):
    """The Celery broker. Empty: an embedded broker and an in-process worker (single machine)."""

    url: str = ""
    # Longer than the longest hard time limit, so a slow job is never delivered twice.
    visibility_timeout_s: int = Field(default=7200, ge=60)

    @field_validator("url")
    @classmethod
    def _redis_or_empty(cls, value: str) -> str:
        if value and not re.match(r"^(redis|rediss|memory|sqla\+\w+)://", value):
            raise ValueError("must be a redis:// URL, or empty for the embedded broker")
        return value


# --- peers and destinations -------------------------------------------------------------------

# "ups": the UPS Push, Pull and Watch services (create, find, claim, update, subscribe).
PeerAction = Literal["echo", "store", "mpps", "ups"]


class Peer(Section):
    """A remote application entity that may open associations to us."""

    ae_title: AETitle
    hosts: list[HostPattern] = Field(default_factory=list, min_length=1)
    allow: list[PeerAction] = Field(default_factory=lambda: ["echo", "store", "mpps"])
    max_associations: int | None = Field(default=None, ge=1)
    # Where the peer listens, for the associations the node opens to it: UPS N-EVENT-REPORTs to
    # a subscribed watcher (its Receiving AE title is this peer's ae_title; first of hosts).
    port: Port | None = None

    @model_validator(mode="after")
    def _reachable(self) -> "Peer":
        if self.port is not None and "/" in self.hosts[0]:
            raise ValueError(f"peer {self.ae_title!r} has a port: its first host must be an address, not a network")
        return self

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the node reaches this peer at, when it has a port."""
        return (self.hosts[0], self.port) if self.port is not None else None


class CapabilityProfile(Section):
    """Which result objects a destination can display; missing ones get fallbacks (GSPS, SC)."""

    seg: bool = True
    sr: bool = True
    kos: bool = True
    gsps: bool = True
    secondary_capture: bool = False
    derived_series: bool = True
    # IHE IOCM: when a re-run supersedes results this destination already acknowledged, send it a
    # KOS rejection note (Rejected for Quality Reasons) listing them. Off for a PACS that would
    # only keep the note as one more object (it does not act on rejection notes).
    rejection_notes: bool = True


RIS_TYPES = ("hl7", "fhir")


class RISSettings(Section):
    """How results are reported to a RIS (``hl7`` and ``fhir`` destinations)."""

    # HL7 v2 MSH-3..6.
    sending_application: str = "AINODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    # Which DICOM attribute links a result to the RIS order (ORC-2/OBR-2, FHIR basedOn).
    order_number: Literal["accession_number", "requested_procedure_id"] = "accession_number"
    # FHIR Patient.identifier system for the DICOM Patient ID (when the study has no Issuer of Patient ID).
    patient_identifier_system: str = "urn:ainode:patient-id"
    # Bearer token for FHIR (basic auth uses the destination's username/password).
    token: str | None = None
    # Seconds to wait for the HL7 ACK or the FHIR answer.
    answer_timeout_s: Seconds = 30
    # A peer that answers "application error" (HL7 AE/CE, FHIR 4xx other than 400/422) is tried
    # this many times in all before the delivery fails for good with the peer's text.
    max_refusals: int = Field(default=5, ge=1)
    # Most entries one FHIR transaction of conditional writes may hold (Medplum: 8); a larger
    # report is sent in steps. 0: no limit.
    max_transaction_entries: int = Field(default=8, ge=0)
    # A critical report also asks the RIS to raise the order's priority to STAT: an OMG^O19
    # change-order (ORC-1 XO, TQ1-9 S) after the ORU, or a PATCH of the FHIR ServiceRequest.
    priority_update: bool = True


class Destination(Section):
    """Where results are sent: a DICOM C-STORE SCP, a DICOMweb STOW-RS endpoint, or a RIS
    (``hl7``: HL7 v2.5.1 ORU^R01 over MLLP at host:port; ``fhir``: an R4 server at url)."""

    name: str = Field(min_length=1)
    type: Literal["dicom", "dicomweb", "hl7", "fhir"] = "dicom"
    ae_title: AETitle | None = None
    host: str | None = None
    port: Port | None = None
    url: str | None = None  # STOW-RS base, e.g. http://pacs:8042/dicom-web
    username: str | None = None
    password: str | None = None
    tls: TLSSettings = TLSSettings()
    storage_commitment: bool = False
    # A commitment request with no N-EVENT-REPORT after this long is sent again (a new Transaction
    # UID), at most storage_commitment_retries more times; then the commitment is "failed".
    storage_commitment_timeout_s: Seconds = 600
    storage_commitment_retries: int = Field(default=2, ge=0)
    capabilities: CapabilityProfile = CapabilityProfile()
    ris: RISSettings = RISSettings()
    # Retry with exponential backoff from retry_initial_s up to retry_max_s between attempts.
    retry_initial_s: Seconds = 5
    retry_max_s: Seconds = 3600
    # When the worker refuses a job as outside the analysis' intended use, also send this
    # destination a short SR in the study saying it was not analysed and why (dicom/dicomweb).
    notify_not_applicable: bool = False

    @model_validator(mode="after")
    def _address_for_type(self) -> "Destination":
        if self.type == "dicom":
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a dicom destination needs {', '.join(missing)}")
        elif self.type == "hl7":
            missing = [k for k in ("host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"an hl7 destination needs {', '.join(missing)}")
        elif not self.url:
            raise ValueError(f"a {self.type} destination needs url")
        if self.type in RIS_TYPES:
            # A RIS takes reports, not images: only the SR (read into ORU / FHIR resources).
            self.capabilities = CapabilityProfile(
                seg=False,
                sr=True,
                kos=False,
                gsps=False,
                secondary_capture=False,
                derived_series=False,
                rejection_notes=False,
            )
        return self


class Source(Section):
    """A PACS the node retrieves studies from (Query/Retrieve SCU): inputs it does not hold, and
    studies analysed on demand (``ainode run ANALYSIS --study UID --from NAME``).

    ``c-move``: the source sends the instances to the node's own AE title (it must know the node:
    AE title, host and port) and they arrive through the node's C-STORE receiver. ``c-get``: the
    instances come back on the node's own association. ``wado-rs``: DICOMweb (QIDO-RS + WADO-RS)
    at ``url``.
    """

    name: str = Field(min_length=1)
    method: Literal["c-move", "c-get", "wado-rs"] = "c-move"
    ae_title: AETitle | None = None
    host: str | None = None
    port: Port | None = None
    url: str | None = None  # DICOMweb base, e.g. http://pacs:8042/dicom-web
    username: str | None = None
    password: str | None = None
    # The longest one retrieval may take (C-FIND, C-MOVE/C-GET and indexing, or WADO-RS).
    timeout_s: float = Field(default=600, gt=0)

    @model_validator(mode="after")
    def _address_for_method(self) -> "Source":
        if self.method == "wado-rs":
            if not self.url:
                raise ValueError("a wado-rs source needs url")
        else:
            missing = [k for k in ("ae_title", "host", "port") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a {self.method} source needs {', '.join(missing)}")
        return self


# --- rules and analyses -----------------------------------------------------------------------


class Timers(Section):
    """When a study or series counts as complete."""

    series_quiet_s: Seconds = 10
    study_quiet_s: Seconds = 20
    # However much keeps arriving, a study is forced complete after this long.
    force_complete_s: Seconds = 600


class Condition(Section):
    """One test on one attribute: equals, one_of, regex or a numeric range."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    equals: Any = None
    one_of: list[Any] | None = None
    regex: str | None = None
    min: float | None = None
    max: float | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"invalid regular expression: {err}") from None
        return value


MATCH_ATTRIBUTES = (
    "calling_ae",
    "called_ae",
    "modality",
    "sop_class_uid",
    "body_part",
    "study_description",
    "series_description",
    "station_name",
    "manufacturer",
    "patient_age",
    "instances",
    "frames",
    "slice_thickness",
)


class Match(Section):
    """A rule's match: attribute conditions, combined with all/any/not.

    An attribute given a plain value means equals (a list means one_of).
    """

    all: list["Match"] | None = None
    any: list["Match"] | None = None
    not_: "Match | None" = Field(default=None, alias="not")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    calling_ae: Condition | None = None
    called_ae: Condition | None = None
    modality: Condition | None = None
    sop_class_uid: Condition | None = None
    body_part: Condition | None = None
    study_description: Condition | None = None
    series_description: Condition | None = None
    station_name: Condition | None = None
    manufacturer: Condition | None = None
    patient_age: Condition | None = None
    instances: Condition | None = None
    frames: Condition | None = None
    slice_thickness: Condition | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in MATCH_ATTRIBUTES:
                value = data.get(key)
                if value is not None and not isinstance(value, dict):
                    data[key] = {"one_of": value} if isinstance(value, list) else {"equals": value}
        return data


class AnalysisRef(Section):
    """An analysis a rule runs, with its parameters."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class CriticalFinding(Section):
    """When a result is critical: a finding (code or meaning) present, or present with at least
    ``min_probability``, or a measurement (code or meaning) above / below a limit."""

    finding: str | None = None
    min_probability: float | None = Field(default=None, ge=0, le=1)
    measurement: str | None = None
    above: float | None = None
    below: float | None = None

    @model_validator(mode="after")
    def _one_test(self) -> "CriticalFinding":
        if bool(self.finding) == bool(self.measurement):
            raise ValueError("a critical finding names either a finding or a measurement")
        if self.measurement and self.above is None and self.below is None:
            raise ValueError("a critical measurement needs above or below")
        return self


class Rule(Section):
    """A routing rule: what it matches, what it runs, where the results go."""

    name: str = Field(min_length=1)
    match: Match = Match()
    level: Literal["study", "series"] = "study"
    analyses: list[AnalysisRef] = Field(min_length=1)
    priority: Literal["stat", "routine", "low"] = "routine"
    destinations: list[str] = Field(default_factory=list)
    timers: Timers | None = None
    # Results matching any of these are critical: flagged (HL7 OBX-8 AA, FHIR interpretation AA)
    # and the RIS is asked to raise the order's priority.
    critical: list[CriticalFinding] = Field(default_factory=list)

    @field_validator("analyses", mode="before")
    @classmethod
    def _names_as_refs(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


class AnalysisSettings(Section):
    """A model a hospital plugs in by configuration (built-in analyses need no entry)."""

    name: str = Field(min_length=1)
    format: Literal["builtin", "torchscript", "onnx", "monai_bundle"] = "builtin"
    path: Path | None = None
    # What the model does and accepts: the registry uses these to build pre/postprocessing.
    task: Literal["segmentation", "classification", "detection", "reconstruction", "ejection_fraction"] = "segmentation"
    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    labels: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    soft_time_limit_s: int = Field(default=600, ge=1)
    time_limit_s: int = Field(default=900, ge=1)
    # What the model is for (checked by the router and the worker); None: modalities only.
    intended_use: IntendedUse | None = None

    @model_validator(mode="after")
    def _path_for_external(self) -> "AnalysisSettings":
        if self.format != "builtin" and self.path is None:
            raise ValueError(f"a {self.format} analysis needs path")
        if self.time_limit_s < self.soft_time_limit_s:
            raise ValueError("time_limit_s must be at least soft_time_limit_s")
        return self


class IntendedUseSettings(Section):
    """How intended use is read from headers: a site's own words for body regions (added to the
    built-in synonym table of ``node.core.intended_use``), e.g. {"chest": ["THORAXNATIV"]}."""

    synonyms: dict[str, list[str]] = Field(default_factory=dict)


class JobSettings(Section):
    """How jobs are retried and watched."""

    max_attempts: int = Field(default=3, ge=1)
    # A running job without a heartbeat for this long is re-published by the reconciler.
    heartbeat_timeout_s: Seconds = 120
    reconcile_interval_s: Seconds = 15


# --- operations -------------------------------------------------------------------------------


PASSWORD_HASH = re.compile(r"scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9_-]+=*\$[A-Za-z0-9_-]+=*")


class APIUser(Section):
    """A person (or script) who logs in to the admin API and dashboard with a name and password.

    ``viewer`` reads everything the API shows; ``admin`` also changes things (re-run, retry,
    re-send, C-ECHO, configuration reload). Only the password's hash is configured, made by
    ``ainode api hash-password``: ``scrypt$n$r$p$salt$hash``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    role: Literal["viewer", "admin"]
    password_hash: str

    @field_validator("password_hash")
    @classmethod
    def _a_hash_not_a_password(cls, value: str) -> str:
        # Never echo the value: it may be a password typed here by mistake.
        if not PASSWORD_HASH.fullmatch(value):
            raise ValueError("must be a hash made by `ainode api hash-password` (scrypt$n$r$p$salt$hash)")
        return value


class APISettings(Section):
    """The admin API and dashboard."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8080
    # Bearer token for the API (an administrator's credential: the CLI and scripts use it); empty:
    # the node generates one at first start and keeps it in the file api-token in the storage
    # folder (mode 0600).
    token: str = ""
    # HTTPS for the API, the dashboard and /metrics (TLS 1.2 or newer); client certificates are
    # required when require_client_certificate is set (verified against ca_certificates).
    tls: TLSSettings = TLSSettings()
    # People who log in with a name and password (HTTP Basic, or the dashboard's login form).
    users: list[APIUser] = Field(default_factory=list)
    # When set, /metrics answers only to "Authorization: Bearer <metrics_token>" (or any API login).
    metrics_token: str = ""
    # Host names (or "*.domain") the API answers to besides localhost, 127.0.0.1, [::1] and its own
    # listen address: any other Host header is refused (DNS rebinding).
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        names = [name.strip().lower().strip("[]") for name in value]
        for name in names:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                if not re.fullmatch(r"(\*\.)?[a-z0-9_]([a-z0-9._-]{0,252})", name):
                    raise ValueError(f"{name!r}: must be a host name, an IP address or *.domain") from None
        return names

    @field_validator("tls")
    @classmethod
    def _certificate_with_its_key(cls, value: TLSSettings) -> TLSSettings:
        # One of the two without the other is a half-done setup, never "TLS off".
        if (value.certificate is None) != (value.private_key is None):
            raise ValueError("certificate and private_key go together: give both, or neither")
        return value

    @field_validator("users")
    @classmethod
    def _unique_names(cls, value: list[APIUser]) -> list[APIUser]:
        names = [u.name for u in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"user names must be unique: {', '.join(dupes)}")
        return value


class WorkitemCode(Section):
    """A Scheduled Workitem Code (the RIS's code for an AI task) and the analysis it runs.

    Every analysis answers by default to its own name under the coding scheme ``99AINODE``
    (e.g. ``ct-segmentation``); entries here add the codes a RIS already uses."""

    code_value: str = Field(min_length=1, max_length=64)
    coding_scheme_designator: str = Field(default="99AINODE", min_length=1, max_length=64)
    code_meaning: str = ""
    analysis: str = Field(min_length=1)
    # The analysis' parameters for workitems of this code (as a rule's analyses may have).
    params: dict[str, Any] = Field(default_factory=dict)


class WorkflowSettings(Section):
    """The UPS Task Manager (node.workflow): how long final workitems stay, how events retry;
    the Task Performer: which codes it performs, where its results go."""

    # COMPLETED and CANCELED workitems are kept at least this long (IHE AIW-I: 24 h), and while
    # a watcher holds a deletion lock on them.
    keep_final_hours: float = Field(default=24.0, ge=24.0)
    # An N-EVENT-REPORT its subscriber did not take is tried again after this many seconds
    # (doubling per attempt up to event_retry_max_s), until it is taken: events are never dropped.
    event_retry_s: Seconds = 2.0
    event_retry_max_s: Seconds = 300.0
    # The node's Task Performer claims SCHEDULED workitems whose code names an analysis it runs.
    perform: bool = True
    # Codes mapped to analyses, beside each analysis' default (its name, scheme 99AINODE).
    analysis_codes: list[WorkitemCode] = Field(default_factory=list)
    # Where a workitem's results go; empty: the destinations of the rules that run its analysis,
    # else every destination.
    destinations: list[str] = Field(default_factory=list)
    # Every job the rules queue is mirrored as a workitem (performed by the node), so a watcher
    # sees all AI work through one global subscription.
    mirror_jobs: bool = True


class AuditSettings(Section):
    """The audit trail (DICOM PS3.15 A.5 / IHE ATNA messages)."""

    # file: one message a line; syslog: RFC 5424 over UDP (RFC 5426, host:port) or a local socket
    # (/dev/log); syslog-tls: RFC 5424 over TLS (RFC 5425, host:port, 6514 by default), what an
    # IHE ATNA Audit Record Repository expects; none: off.
    sink: Literal["file", "syslog", "syslog-tls", "none"] = "file"
    path: Path = Path("./var/audit.log")
    syslog_address: str = "/dev/log"
    # syslog-tls: the CA that signed the collector's certificate (None: the system's CAs), and the
    # node's own certificate and key for mutual TLS (both or neither).
    tls_ca: Path | None = None
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None

    @model_validator(mode="after")
    def _tls_needs_a_network_address(self) -> "AuditSettings":
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("audit.tls_certificate and audit.tls_private_key go together")
        if self.sink == "syslog-tls" and (self.syslog_address.startswith("/") or ":" not in self.syslog_address):
            raise ValueError("audit.sink syslog-tls needs audit.syslog_address as host:port (e.g. arr.hospital:6514)")
        return self


class Settings(Section):
    """The whole configuration of one ainode installation."""

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    broker: BrokerSettings = BrokerSettings()
    peers: list[Peer] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    # PACS the node retrieves from (Query/Retrieve SCU, DICOMweb).
    sources: list[Source] = Field(default_factory=list)
    timers: Timers = Timers()
    rules: list[Rule] = Field(default_factory=list)
    analyses: list[AnalysisSettings] = Field(default_factory=list)
    intended_use: IntendedUseSettings = IntendedUseSettings()
    jobs: JobSettings = JobSettings()
    api: APISettings = APISettings()
    audit: AuditSettings = AuditSettings()
    workflow: WorkflowSettings = WorkflowSettings()
    # The file these settings came from (None for defaults): rules reload watches it.
    _source_path: Path | None = PrivateAttr(default=None)

    @property
    def source_path(self) -> Path | None:
        """The configuration file these settings were read from, if any."""
        return self._source_path

    @model_validator(mode="after")
    def _references_exist(self) -> "Settings":
        names = [d.name for d in self.destinations]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(sorted(dupes))}")
        sources = [s.name for s in self.sources]
        if len(set(sources)) < len(sources):
            raise ValueError("source names must be unique")
        for rule in self.rules:
            unknown = [d for d in rule.destinations if d not in names]
            if unknown:
                raise ValueError(f"rule {rule.name!r} names unknown destinations: {', '.join(unknown)}")
        return self

    def peer(self, ae_title: str) -> Peer | None:
        """The configured peer with this calling AE title, if any."""
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    def destination(self, name: str) -> Destination:
        """The destination with this name (KeyError if there is none)."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def source(self, name: str) -> Source:
        """The source with this name (KeyError if there is none)."""
        for src in self.sources:
            if src.name == name:
                return src
        raise KeyError(name)


# --- loading ----------------------------------------------------------------------------------


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` lists each problem with its place."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(errors))


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Nested dict from AINODE_A__B=value variables; JSON values (lists, numbers) are parsed."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        path = list(_env_path(key))
        if not path:
            continue
        try:
            value: Any = json.loads(raw)
            if not isinstance(value, (list, dict)):
                value = raw  # let pydantic coerce scalars from their string form
        except ValueError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _env_path(key: str) -> tuple[str, ...]:
    """The setting an ``AINODE_A__B`` variable sets, ``("a", "b")``; empty for other variables."""
    if not key.startswith(ENV_PREFIX) or key == "AINODE_CONFIG":
        return ()
    return tuple(p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p)


def _env_variable(environ: dict[str, str], loc: tuple[Any, ...]) -> str | None:
    """The environment variable that set the value at ``loc`` (or a section holding it), if any."""
    for key in environ:
        path = _env_path(key)
        if path and loc[: len(path)] == path:
            return key
    return None


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for k, v in over.items():
            merged[k] = _deep_merge(base.get(k), v) if k in base else v
        return merged
    return over


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line in the YAML file of the value at ``loc`` (or its nearest parent)."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text or "(top level)"


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic inserts validator names (e.g. "function-after[...]") into locations; drop them.
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def _messages(err: ValidationError, root: yaml.Node | None, source: str, environ: dict[str, str]) -> list[str]:
    lines = []
    for e in err.errors():
        loc = _clean_loc(tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        variable = _env_variable(environ, loc)  # the environment overrides the file: blame it
        line = None if variable else _line_of(root, loc)
        where = f"environment variable {variable}: " if variable else f"{source}:{line}: " if line else f"{source}: "
        lines.append(f"{where}{_format_loc(loc)}: {msg}")
    return lines


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read, merge environment overrides into, and validate a configuration file.

    With no path, ``AINODE_CONFIG`` names the file; with neither, the embedded defaults apply.
    Raises ConfigError listing every problem with its place in the file.
    """
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get("AINODE_CONFIG")
    source = str(path) if path else "<defaults>"
    data: Any = {}
    root: yaml.Node | None = None
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(source, [f"{source}: cannot read: {err.strerror}"]) from None
        try:
            root = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError(source, [f"{where}: not valid YAML: {getattr(err, 'problem', err)}"]) from None
        if not isinstance(data, dict):
            raise ConfigError(source, [f"{source}:1: the file must be a mapping of sections"])
    data = _deep_merge(data, _env_overrides(environ))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, _messages(err, root, source, environ)) from None
    settings._source_path = Path(path).resolve() if path else None
    return settings


def resolve_paths(settings: Settings, base: Path) -> Settings:
    """Relative storage/database/audit paths are taken relative to ``base`` (the config's folder)."""
    s = settings.model_copy(deep=True)
    if not s.storage.path.is_absolute():
        s.storage.path = (base / s.storage.path).resolve()
    if not s.audit.path.is_absolute():
        s.audit.path = (base / s.audit.path).resolve()
    m = re.match(r"^(sqlite(?:\+\w+)?:///)(?!/)(.+)$", s.database.url)
    if m and m.group(2) != ":memory:":
        s.database.url = m.group(1) + str((base / m.group(2)).resolve())
    return s


Match.model_rebuild()
__all__ = [
    "Settings",
    "NodeSettings",
    "StorageSettings",
    "DatabaseSettings",
    "BrokerSettings",
    "Peer",
    "Destination",
    "Source",
    "Rule",
    "Match",
    "Condition",
    "Timers",
    "AnalysisSettings",
    "AnalysisRef",
    "JobSettings",
    "APISettings",
    "APIUser",
    "AuditSettings",
    "TLSSettings",
    "CapabilityProfile",
    "ConfigError",
    "load_settings",
    "resolve_paths",
    "MATCH_ATTRIBUTES",
]


# The settings this process runs with: set by whoever starts it (the node, `ainode worker`, the
# embedded worker's child); a process started by Celery itself reads $AINODE_CONFIG once.
_process_settings: Settings | None = None


def use_settings(settings: Settings) -> Settings:
    """Make ``settings`` the configuration of this process (inherited by forked children)."""
    global _process_settings
    _process_settings = settings
    return settings


def current_settings() -> Settings:
    """The configuration of this process: the one given to use_settings, else $AINODE_CONFIG."""
    if _process_settings is None:
        path = os.environ.get("AINODE_CONFIG")
        use_settings(resolve_paths(load_settings(path), Path(path).resolve().parent if path else Path.cwd()))
    assert _process_settings is not None
    return _process_settings
