"""C-ECHO and C-STORE as a service user, so hospital IT can test links (`ainode echo`/`send`)."""

from __future__ import annotations

import logging
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pydicom import dcmread
from pydicom import uid as dcm_uid
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from node.core.dicom import SUCCESS, answers_stay_with_the_sender, quiet_pynetdicom

console = Console(stderr=True)
log = logging.getLogger("ainode.scu")
_MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


@dataclass(frozen=True)
class Target:
    """A remote AE: title, host, port."""

    ae_title: str
    host: str
    port: int


def parse_target(text: str) -> Target:
    """``AE@HOST:PORT`` -> Target; ValueError with a readable message otherwise."""
    m = re.fullmatch(r"([^@]{1,16})@(\[[^\]]+\]|[^:@]+):(\d{1,5})", text.strip())
    if not m or not 1 <= int(m.group(3)) <= 65535:
        raise ValueError(f"target must be AE@HOST:PORT, got {text!r}")
    return Target(m.group(1), m.group(2).strip("[]"), int(m.group(3)))


def associate(ae: AE, host: str, port: int, **kwargs: Any) -> Association:
    """``ae.associate`` with TCP_NODELAY on the established association's socket, its answers
    kept for the waiting sender (``node.core.dicom.answers_stay_with_the_sender``).

    pynetdicom leaves Nagle's algorithm on. A C-STORE is written as a command PDU and then a data
    set PDU; when the data set is smaller than a segment (an SR, a KOS, most SEGs), Nagle holds it
    until the peer acknowledges the command, and the peer delays that acknowledgement: about 40 ms
    per object (measured against Orthanc on loopback: 49 ms per small object, 8 ms with this).
    """
    assoc = answers_stay_with_the_sender(ae.associate(host, port, **kwargs))
    sock = getattr(assoc.dul.socket, "socket", None) if assoc.is_established else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (or already closed): nothing to tune
            pass
    return assoc


def verify(calling_ae: str, ae_title: str, host: str, port: int, timeout_s: float | None = 10.0) -> dict[str, Any]:
    """C-ECHO a remote AE, the one Verification of the node (``ainode echo`` and the admin API).

    Returns ``{'ok', 'result', 'round_trip_ms', 'status'}``: ok on status Success; result in words
    ("status 0x0000", "association rejected", "no answer or aborted", "no response");
    round_trip_ms None when no association was made; status the DIMSE status (None without one).
    ``timeout_s`` bounds the ACSE, DIMSE and network waits (None: pynetdicom's defaults).
    """
    ae = AE(ae_title=calling_ae)
    if timeout_s is not None:
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    start = time.monotonic()
    assoc = associate(ae, host, port, ae_title=ae_title)
    if not assoc.is_established:
        return {
            "ok": False,
            "result": "association rejected" if assoc.is_rejected else "no answer or aborted",
            "round_trip_ms": None,
            "status": None,
        }
    response = assoc.send_c_echo()
    assoc.release()
    ms = round((time.monotonic() - start) * 1000, 1)
    code = getattr(response, "Status", None)
    return {
        "ok": code == SUCCESS,
        "result": f"status 0x{code:04X}" if code is not None else "no response",
        "round_trip_ms": ms,
        "status": code,
    }


def echo(target: str, calling_ae: str) -> int:
    """C-ECHO the target; print the outcome; 0 on Success."""
    quiet_pynetdicom()
    try:
        t = parse_target(target)
    except ValueError as err:
        console.print(str(err), style="red")
        return 2
    outcome = verify(calling_ae, t.ae_title, t.host, t.port, timeout_s=None)
    if outcome["round_trip_ms"] is None:
        why = "rejected" if outcome["result"] == "association rejected" else outcome["result"]
        console.print(f"association with {t.ae_title} at {t.host}:{t.port} failed ({why})", style="red")
        return 1
    code = outcome["status"]
    if outcome["ok"]:
        console.print(f"C-ECHO {t.ae_title} at {t.host}:{t.port}: Success", style="green")
        return 0
    console.print(f"C-ECHO {t.ae_title}: status {code if code is None else hex(code)}", style="red")
    return 1


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Files under the given files and folders (recursively), in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
    return files


def _file_contexts(files: list[Path]) -> tuple[list[tuple[Path, str, str]], list[Path]]:
    # (path, SOP Class, transfer syntax) of each readable DICOM file, and the ones that are not.
    good, bad = [], []
    for path in files:
        try:
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            good.append((path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            bad.append(path)
    return good, bad


def send(target: str, paths: list[Path], calling_ae: str) -> int:
    """C-STORE the DICOM files under ``paths`` to the target with a progress bar; 0 if all stored.

    Files are sent as they are on disk (no transcoding): each (SOP Class, transfer syntax) pair
    gets its own presentation context.
    """
    quiet_pynetdicom()
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream from disk: large files stay out of memory
    try:
        t = parse_target(target)
    except ValueError as err:
        console.print(str(err), style="red")
        return 2
    items, unreadable = _file_contexts(dicom_files(paths))
    for path in unreadable:
        console.print(f"skipped (not DICOM): {path}", style="yellow")
    if not items:
        console.print("no DICOM files to send", style="red")
        return 1
    pairs = sorted({(c, ts) for _, c, ts in items})
    failed = 0
    with Progress(
        TextColumn("C-STORE"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task("send", total=len(items))
        for start in range(0, len(pairs), _MAX_CONTEXTS):
            chunk = set(pairs[start : start + _MAX_CONTEXTS])
            batch = [it for it in items if (it[1], it[2]) in chunk]
            failed += _send_batch(t, calling_ae, chunk, batch, progress, task)
    sent = len(items) - failed
    console.print(f"{sent} of {len(items)} instance(s) stored at {t.ae_title}", style="green" if not failed else "red")
    return 0 if failed == 0 and not unreadable else 1


def _send_batch(
    t: Target,
    calling_ae: str,
    pairs: set[tuple[str, str]],
    batch: list[tuple[Path, str, str]],
    progress: Progress,
    task: int,
) -> int:
    ae = AE(ae_title=calling_ae)
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, [dcm_uid.UID(ts)])
    assoc = associate(ae, t.host, t.port, ae_title=t.ae_title)
    if not assoc.is_established:
        console.print(f"association with {t.ae_title} at {t.host}:{t.port} failed", style="red")
        progress.advance(task, len(batch))
        return len(batch)
    failed = 0
    try:
        for path, _, _ in batch:
            if not assoc.is_established:
                failed += 1
                continue
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code is None or not (code == SUCCESS or 0xB000 <= code <= 0xBFFF):  # Bxxx: warning, stored
                failed += 1
                console.print(f"failed: {path.name}: status {code if code is None else hex(code)}", style="red")
            progress.advance(task)
    finally:
        if assoc.is_established:
            assoc.release()
    return failed
