"""A client of the running node's admin API for the command line (``ainode run``).

The node does the work (retrieval, job, delivery); the command asks it through the API with the
token the node keeps, and follows the request until it has an answer.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from node.admin.access import read_api_token
from node.core.settings import Settings
from node.jobs.table import FINAL_STATES as FINAL_JOB_STATES


class APIError(RuntimeError):
    """The API refused the call or cannot be reached; the message says why."""


def api_base(settings: Settings) -> str:
    """The API's address as seen from this machine (a wildcard listen address means loopback)."""
    host = settings.api.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api.port}"


def call(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One API call with the node's token; the decoded JSON answer, or APIError with its detail."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        api_base(settings) + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {read_api_token(settings)}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read()).get("detail", "")
        except ValueError:
            detail = ""
        raise APIError(f"the node refused the request (HTTP {err.code}): {detail or err.reason}") from None
    except urllib.error.URLError as err:
        raise APIError(f"the node's API at {api_base(settings)} cannot be reached: {err.reason}") from None


def order_analysis(
    settings: Settings,
    study_uid: str,
    analysis: str,
    source: str | None,
    destinations: list[str] | None,
    priority: str = "stat",
    wait: bool = True,
    timeout_s: float = 3600,
    priors: int = 0,
    say: Callable[[str], None] = print,
) -> int:
    """Ask the node to analyse a study (retrieving it from ``source`` first) and follow the request:
    until the job is queued, or with ``wait`` until it has ended. Exit status: 0 when it was
    queued (no wait) or succeeded, 1 otherwise."""
    body = {
        "analysis": analysis,
        "source": source,
        "destinations": destinations or None,
        "priority": priority,
        "priors": priors,
    }
    try:
        request = call(settings, "POST", f"/api/studies/{study_uid}/analyses", body)
        say(f"request {request['id']}: {analysis} of the study" + (f", retrieved from {source}" if source else ""))
        deadline = time.monotonic() + timeout_s
        shown = ""
        while time.monotonic() < deadline:
            request = call(settings, "GET", f"/api/analysis-requests/{request['id']}")
            line = _progress_line(request)
            if line != shown:
                say(line)
                shown = line
            if request["state"] == "failed":
                return 1
            if request["state"] == "job-queued" and (not wait or request.get("job_state") in FINAL_JOB_STATES):
                return 0 if not wait or request["job_state"] == "succeeded" else 1
            time.sleep(0.5)
        say(f"still not finished after {timeout_s:g} s: follow it with GET /api/analysis-requests/{request['id']}")
        return 1
    except APIError as err:
        say(str(err))
        return 1


def _progress_line(request: dict[str, Any]) -> str:
    """What the request is doing, in one line."""
    state = request["state"]
    retrieval = request.get("retrieval") or {}
    if state == "failed":
        return f"failed: {request.get('error')}"
    if state == "retrieving" or (state == "queued" and retrieval):
        return (
            f"retrieving from {retrieval.get('source', request.get('source'))} by {retrieval.get('method', '')}: "
            f"{retrieval.get('completed', 0)} of {retrieval.get('at_source', 0) - retrieval.get('held_before', 0)} "
            "instance(s)"
        )
    if state == "job-queued":
        job = f"job {request['job_id']}: {request.get('job_state', '')}"
        if request.get("job_error"):
            job += f" ({request['job_error']})"
        if retrieval:
            job = (
                f"retrieved {retrieval.get('completed', 0)} instance(s) ({retrieval.get('held_before', 0)} held "
                f"before); {job}"
            )
        return job
    return state
