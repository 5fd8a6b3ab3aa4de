"""``/metrics``: the live instruments of every process of the node (``node.core.metrics``) plus
numbers read from the database at scrape time (``DatabaseCollector``).

The database numbers: instances and bytes stored, jobs per state and priority (queue depth),
deliveries and their retries, and stage latencies computed from the timestamps every stage
already records. Job outcomes and delivery retries are counted only here: the rows are the truth,
and workers on other machines need no metrics path to the node. These survive restarts and are
exact across any number of receiver processes and machines, so they are the numbers to alert on;
names end in ``_stored``/``_total`` as Prometheus conventions ask.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any, Iterable

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select

from node.core.clock import aware
from node.core.db import database_session
from node.core.metrics import LATENCY_BUCKETS, MULTIPROC_ENV
from node.dispatch.table import Delivery
from node.index import Instance, Study
from node.jobs.table import PENDING_STATES, Job


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return max(0.0, (aware(later) - aware(earlier)).total_seconds())


def _histogram(name: str, doc: str, samples: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["stage"])
    for stage, values in samples.items():
        buckets = [(str(b), float(sum(1 for v in values if v <= b))) for b in LATENCY_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        family.add_metric([stage], buckets, float(sum(values)))
    return family


class DatabaseCollector:
    """Collects node-wide numbers from the index, job and outbox tables at scrape time."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def describe(self) -> list[Any]:  # no fixed description: families depend on the data
        return []

    def collect(self) -> Iterable[Any]:
        """Yield metric families."""
        with database_session(self.database_url) as session:
            count, size = session.execute(select(func.count(), func.coalesce(func.sum(Instance.size_bytes), 0))).one()
            yield GaugeMetricFamily("ainode_instances_stored", "Instances in the index", value=count)
            yield GaugeMetricFamily("ainode_bytes_stored", "Bytes of instances in the index", value=int(size))
            studies = GaugeMetricFamily("ainode_studies", "Studies by pipeline state", labels=["state"])
            for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state)):
                studies.add_metric([state], n)
            yield studies
            latencies: dict[str, list[float]] = {"completion": []}
            for first, ready in session.execute(
                select(Study.first_received_at, Study.ready_at).where(Study.ready_at.is_not(None))
            ):
                latencies["completion"].append(_seconds(ready, first) or 0.0)
            yield from self._jobs(session, latencies)
            yield from self._deliveries(session, latencies)
            yield _histogram(
                "ainode_pipeline_stage_seconds",
                "Stage latencies from recorded timestamps (completion, queue wait, analysis, delivery)",
                latencies,
            )

    def _jobs(self, session: Any, latencies: dict[str, list[float]]) -> Iterable[Any]:
        jobs = GaugeMetricFamily("ainode_jobs", "Jobs by state", labels=["state"])
        depth = GaugeMetricFamily("ainode_queue_depth", "Jobs waiting or running, by priority", labels=["priority"])
        outcomes = CounterMetricFamily(
            "ainode_job_outcomes_recorded", "Finished jobs by final state and analysis", labels=["state", "analysis"]
        )
        waiting: dict[str, int] = {"stat": 0, "routine": 0, "low": 0}
        for state, priority, analysis, n in session.execute(
            select(Job.state, Job.priority, Job.analysis, func.count()).group_by(Job.state, Job.priority, Job.analysis)
        ):
            if state in PENDING_STATES:
                waiting[priority] = waiting.get(priority, 0) + n
            else:
                outcomes.add_metric([state, analysis], n)
        for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
            jobs.add_metric([state], n)
        for priority, n in waiting.items():
            depth.add_metric([priority], n)
        latencies["queue_wait"], latencies["analysis"] = [], []
        for created, started, finished in session.execute(
            select(Job.created_at, Job.started_at, Job.finished_at).where(Job.started_at.is_not(None))
        ):
            latencies["queue_wait"].append(_seconds(started, created) or 0.0)
            if finished is not None:
                latencies["analysis"].append(_seconds(finished, started) or 0.0)
        yield from (jobs, depth, outcomes)

    def _deliveries(self, session: Any, latencies: dict[str, list[float]]) -> Iterable[Any]:
        states = GaugeMetricFamily(
            "ainode_deliveries", "Result deliveries by destination and state", labels=["destination", "state"]
        )
        retries = CounterMetricFamily(
            "ainode_delivery_retries_recorded", "Delivery attempts beyond the first", labels=["destination"]
        )
        for dest, state, n, attempts in session.execute(
            select(Delivery.destination, Delivery.state, func.count(), func.sum(Delivery.attempts)).group_by(
                Delivery.destination, Delivery.state
            )
        ):
            states.add_metric([dest, state], n)
            retries.add_metric([dest], max(0, int(attempts or 0) - n))
        latencies["delivery"] = [
            _seconds(done, made) or 0.0
            for made, done in session.execute(
                select(Delivery.created_at, Delivery.delivered_at).where(Delivery.delivered_at.is_not(None))
            )
        ]
        yield from (states, retries)


def exposition(database_url: str) -> bytes:
    """The text exposition for ``/metrics``: live instruments (all processes) plus the database."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    db_registry = CollectorRegistry()
    db_registry.register(DatabaseCollector(database_url))
    return body + generate_latest(db_registry)
