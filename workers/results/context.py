"""What a result writer needs besides the findings: the job, where to write, what to write.

``ResultContext`` is filled by the job runner (workers/tasks.py). The choice of object kinds
follows the destinations' capability profiles (``core.settings.CapabilityProfile``): a PACS that cannot
show SEG gets GSPS outlines, one that asks for it gets a burned-in secondary capture.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from node.core.dicom import NODE_DEVICE_SERIAL, NODE_MANUFACTURER
from node.core.settings import CapabilityProfile, Settings, current_settings
from node.dispatch.kinds import ResultKind, kinds_for_destinations

MANUFACTURER = NODE_MANUFACTURER
DEVICE_SERIAL = NODE_DEVICE_SERIAL
SOFTWARE_VERSION = "0.1.0"

# Result series numbers: far above what modalities use, one block per kind so a re-run lands in
# the same series (the series UID is deterministic too).
SERIES_NUMBERS: dict[str, int] = {"seg": 9001, "sr": 9002, "kos": 9003, "gsps": 9004, "sc": 9005, "derived": 9010}


@dataclass
class ResultContext:
    """Everything about one job that the result writers need besides the findings.

    ``job_key`` names the job stably (e.g. "<study uid>/<rule>/<analysis>"): together with the
    input instance UIDs and the model version it determines every output UID, so writing the
    same job twice gives byte-identical identities and a re-delivery is idempotent at the PACS.
    """

    job_key: str
    output_dir: Path
    destinations: list[CapabilityProfile] = field(default_factory=lambda: [CapabilityProfile()])
    segmentation_type: Literal["BINARY", "LABELMAP", "FRACTIONAL"] = "BINARY"
    # None: copied from the source images (IHE AIR: the order's identifiers travel with results).
    accession_number: str | None = None
    requested_procedure_description: str | None = None
    requested_procedure_id: str | None = None
    institution_name: str | None = None
    manufacturer: str = MANUFACTURER
    software_version: str = SOFTWARE_VERSION
    device_serial_number: str = DEVICE_SERIAL
    # When the analysis of the images started (local time, as DICOM dates are): the results'
    # Content Date/Time and their algorithm's Contribution DateTime (IHE AIR). None: not known.
    analysis_started: datetime.datetime | None = None

    @classmethod
    def from_job(cls, job: Mapping[str, Any], settings: Settings | None = None) -> "ResultContext":
        """A context from the job runner's mapping (job_key/job_id, output_dir, destinations...).

        ``destinations`` may name configured destinations (their capability profiles are looked
        up in ``settings``) or be profiles already. ``params`` may choose ``segmentation_type``.
        """
        names = list(job.get("destinations") or [])
        profiles: list[CapabilityProfile] = []
        for item in names:
            if isinstance(item, CapabilityProfile):
                profiles.append(item)
                continue
            try:
                profiles.append((settings or _worker_settings()).destination(item).capabilities)
            except (KeyError, AttributeError):
                profiles.append(CapabilityProfile())  # unknown here: write the standard objects
        params = dict(job.get("params") or {})
        return cls(
            job_key=str(job.get("job_key") or f"job-{job.get('job_id')}"),
            output_dir=Path(job["output_dir"]),
            destinations=profiles or [CapabilityProfile()],
            segmentation_type=str(params.get("segmentation_type", "BINARY")).upper(),  # type: ignore[arg-type]
            accession_number=job.get("accession_number"),
            requested_procedure_description=job.get("requested_procedure_description"),
        )

    @property
    def kinds(self) -> set[ResultKind]:
        """The object kinds to write for this job's destinations."""
        return kinds_for_destinations(self.destinations)


# The order attributes a job's parameters may carry (``params["order"]``): a UPS workitem's
# Referenced Request Sequence flows into its results through them (IHE AIW-I / AIR).
ORDER_KEYS = ("accession_number", "requested_procedure_id", "requested_procedure_description")


def order_overrides(params: Mapping[str, Any]) -> dict[str, str]:
    """The ResultContext fields a job's ``params["order"]`` sets (none when it has no order)."""
    order = params.get("order") or {}
    return {key: str(order[key]) for key in ORDER_KEYS if order.get(key) is not None}


# Namespace of ainode's name-based UUIDs (a fixed random UUID; never change it).
UID_NAMESPACE = uuid.UUID("6f0b7c58-2f4e-4b7a-9a51-3d0c2b9e8a11")


def _worker_settings() -> Settings | None:
    """The running worker's settings, when there is one (to find destinations' profiles)."""
    try:
        return current_settings()
    except Exception:  # noqa: BLE001 - no configuration here: fall back to the default profile
        return None


def derived_uid(*parts: object) -> str:
    """A UID under 2.25 (PS3.5 B.2) from a name-based UUID of the parts: same parts, same UID."""
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


class UIDFactory:
    """Deterministic output UIDs for one job: (job key, input instance UIDs, model version)."""

    def __init__(self, job_key: str, input_uids: Iterable[str], model_version: str):
        self._seed = (job_key, "|".join(sorted(input_uids)), model_version)

    def uid(self, *role: object) -> str:
        """The UID of one output (series, instance...) named by its role, e.g. ("seg", "sop")."""
        return derived_uid(*self._seed, *role)
