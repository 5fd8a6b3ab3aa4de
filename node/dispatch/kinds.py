"""Result kinds: which kind a result object is, which kinds a destination wants, and the record a
result writer hands to the outbox. The contract between the result writers (workers) and the
dispatcher: the writers decide what to write from the same profiles the dispatcher sends by.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from node.core.settings import CapabilityProfile

ResultKind = Literal["seg", "sr", "kos", "gsps", "sc", "derived", "rejection"]
# What the result writers write; "rejection" (an IHE IOCM rejection note, a KOS) is written by the
# job runner when a re-run supersedes delivered results (workers/results/rejection.py).
ALL_KINDS: tuple[ResultKind, ...] = ("seg", "sr", "kos", "gsps", "sc", "derived")
REJECTION: ResultKind = "rejection"

SOP_CLASS_KINDS: dict[str, ResultKind] = {
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",
    "1.2.840.10008.5.1.4.1.1.66.7": "seg",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.88.33": "sr",  # the not-applicable notice (workers/results/notice.py)
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",
    "1.2.840.10008.5.1.4.1.1.88.59": "kos",
    "1.2.840.10008.5.1.4.1.1.11.1": "gsps",
    "1.2.840.10008.5.1.4.1.1.7": "sc",
    "1.2.840.10008.5.1.4.1.1.7.4": "sc",
}


def kind_of(sop_class_uid: str) -> ResultKind:
    """The result kind of an object by its SOP class (anything else is a derived image)."""
    return SOP_CLASS_KINDS.get(str(sop_class_uid), "derived")


def wanted_kinds(capabilities: CapabilityProfile) -> set[ResultKind]:
    """The result kinds one destination should receive, given what it can display.

    SEG, SR, KOS and derived series go where they are supported. GSPS outlines are a fallback
    for a destination that cannot show SEG; the secondary capture overlay is sent only where the
    profile asks for it (it duplicates pixels, so it is opt-in).
    """
    kinds: set[ResultKind] = set()
    if capabilities.seg:
        kinds.add("seg")
    if capabilities.sr:
        kinds.add("sr")
    if capabilities.kos:
        kinds.add("kos")
    if capabilities.gsps and not capabilities.seg:
        kinds.add("gsps")
    if capabilities.secondary_capture:
        kinds.add("sc")
    if capabilities.derived_series:
        kinds.add("derived")
    if capabilities.rejection_notes:
        kinds.add(REJECTION)
    return kinds


def kinds_for_destinations(profiles: Iterable[CapabilityProfile]) -> set[ResultKind]:
    """Union of the wanted kinds: what must be written so every destination gets its share."""
    kinds: set[ResultKind] = set()
    for profile in profiles:
        kinds |= wanted_kinds(profile)
    return kinds


@dataclass(frozen=True)
class ResultObject:
    """One written result object: its file and what the outbox needs to know of it.

    The writer has these values in memory, so the outbox never reads the file again for them.
    It is a path-like object (``open``, ``pydicom.dcmread`` and ``Path`` take it; ``str`` gives the path).
    """

    path: Path
    kind: ResultKind
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return os.fspath(self.path)
