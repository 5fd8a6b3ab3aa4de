"""The worker container's health check: does this container's Celery worker answer a ping?

``python -m workers.health`` exits 0 when a worker on this host (the container's hostname)
answers a Celery control ping through the broker, 1 otherwise. A worker busy with an analysis
still answers (its main process handles control messages, the pool runs the job), so a long
job does not make the container unhealthy; a worker cut off from the broker does.
"""

from __future__ import annotations

import socket
import sys

from node.core.settings import load_settings
from node.jobs.broker import configured_app


def worker_answers(timeout_s: float = 5.0) -> bool:
    """True when a Celery worker named ``...@<this hostname>`` answers a ping."""
    app = configured_app(load_settings())
    replies = app.control.ping(timeout=timeout_s) or []
    host = socket.gethostname()
    return any(name.endswith("@" + host) for reply in replies for name in reply)


def main() -> int:
    """Exit status for Docker's HEALTHCHECK: 0 healthy, 1 not."""
    try:
        return 0 if worker_answers() else 1
    except Exception as err:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"unhealthy: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
