"""Prometheus metrics kept in Redis, so every receiver and worker process counts into one place.

prometheus-client's multiprocess mode only joins processes that share a directory on one host;
workers scaled across containers do not. So counters and histograms are Redis hash increments
(one round trip, usually inside a pipeline that is sent anyway), and ``/metrics`` on any receiver
renders them, plus gauges read live from RQ (queue depth, failed jobs, workers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from core.keys import METRIC_COUNTERS_KEY as COUNTERS_KEY
from core.keys import METRIC_HISTOGRAMS_KEY as HISTOGRAMS_KEY

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

    from core.receipts import Batch

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
"""Seconds: an action takes from a few ms (notify) to many minutes (a large export)."""

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cvat_hooks_deliveries_total": ("Deliveries received, by event and outcome "
                                    "(queued, no_match, ping, duplicate, unstored).", ("event", "outcome")),
    "cvat_hooks_rejected_total": ("Deliveries rejected before parsing, by reason "
                                  "(signature_missing, signature_mismatch, bad_json, too_large...).", ("reason",)),
    "cvat_hooks_action_runs_total": ("Action attempts, by action and outcome "
                                     "(succeeded, skipped, retrying, failed).", ("action", "outcome")),
    "cvat_hooks_action_retries_total": ("Action attempts that failed and were scheduled again.", ("action",)),
}
"""One place for every counter: name -> (help, label names)."""

HISTOGRAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cvat_hooks_action_duration_seconds": ("Duration of one action attempt.", ("action",)),
}


def _field(name: str, labels: Mapping[str, str]) -> str:
    spec = COUNTERS.get(name) or HISTOGRAMS.get(name)
    if spec is None:
        raise KeyError(f"unknown metric {name}")
    return name + "|" + "|".join(str(labels.get(label, "")) for label in spec[1])


def inc(target: Redis | Pipeline | Batch, name: str, amount: int = 1, **labels: str) -> None:
    """Count ``amount`` on a counter (on a pipeline: sent with the caller's other writes). An action
    run given up is also counted in its minute, for the admin UI's chart (:mod:`core.history`)."""
    target.hincrby(COUNTERS_KEY, _field(name, labels), amount)
    if name == "cvat_hooks_action_runs_total" and labels.get("outcome") == "failed":
        from core.history import count_failure

        count_failure(target)


def safe_inc(redis: Redis, name: str, **labels: str) -> None:
    """Count, but never let metrics break the request that is being counted."""
    try:
        inc(redis, name, 1, **labels)
    except RedisError as exc:
        log.debug("metrics: could not count %s: %s", name, exc)


def observe(target: Redis | Pipeline, name: str, value: float, **labels: str) -> None:
    """Add one observation to a histogram: two writes, the count of the one bucket ``value`` falls in
    (the smallest bound >= value, or ``+Inf``) and the sum (a worker's hot path: see bench/)."""
    base = _field(name, labels)
    bound = next((str(b) for b in DURATION_BUCKETS if value <= b), "+Inf")
    target.hincrby(HISTOGRAMS_KEY, f"{base}|{bound}", 1)
    target.hincrbyfloat(HISTOGRAMS_KEY, f"{base}|sum", value)


def cumulate(values: Mapping[str, float]) -> list[tuple[str, float]]:
    """Prometheus buckets (``le`` cumulative, ending with ``+Inf`` = the count) from per-bucket counts."""
    buckets, total = [], 0.0
    for bound in [*map(str, DURATION_BUCKETS), "+Inf"]:
        total += values.get(bound, 0.0)
        buckets.append((bound, total))
    return buckets


def _decode(raw: Mapping[Any, Any]) -> Iterator[tuple[list[str], str]]:
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        value = value.decode() if isinstance(value, bytes) else value
        yield key.split("|"), value


class RedisCollector:
    """A prometheus-client collector rendering what every process counted in Redis, plus RQ gauges."""

    def __init__(self, redis: Redis, queues: Iterable[str]) -> None:
        self.redis = redis
        self.queues = tuple(queues)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        try:
            counters = self.redis.hgetall(COUNTERS_KEY)
            histograms = self.redis.hgetall(HISTOGRAMS_KEY)
        except RedisError:
            up = GaugeMetricFamily("cvat_hooks_redis_up", "Whether Redis answered this scrape.")
            up.add_metric([], 0)
            yield up
            return
        families = {name: CounterMetricFamily(name.removesuffix("_total"), help_, labels=list(labels))
                    for name, (help_, labels) in COUNTERS.items()}
        for parts, value in _decode(counters):
            if parts[0] in families:
                families[parts[0]].add_metric(parts[1:], float(value))
        yield from families.values()

        grouped: dict[tuple[str, tuple[str, ...]], dict[str, float]] = {}
        for parts, value in _decode(histograms):
            name, labels, bound = parts[0], tuple(parts[1:-1]), parts[-1]
            grouped.setdefault((name, labels), {})[bound] = float(value)
        hist_families = {name: HistogramMetricFamily(name, help_, labels=list(labels))
                         for name, (help_, labels) in HISTOGRAMS.items()}
        for (name, labels), values in grouped.items():
            if name not in hist_families:
                continue
            hist_families[name].add_metric(list(labels), cumulate(values), values.get("sum", 0.0))
        yield from hist_families.values()
        yield from self._rq_gauges()

    def _rq_gauges(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from core.queue_stats import queue_stats, worker_count

        depth = GaugeMetricFamily("cvat_hooks_queue_depth", "Jobs waiting in each queue.", labels=["queue"])
        started = GaugeMetricFamily("cvat_hooks_jobs_running", "Jobs being run now.", labels=["queue"])
        scheduled = GaugeMetricFamily("cvat_hooks_jobs_scheduled",
                                      "Jobs waiting for a delayed retry.", labels=["queue"])
        failed = GaugeMetricFamily("cvat_hooks_jobs_failed",
                                   "Jobs that gave up (RQ's failed registry, the dead letters).", labels=["queue"])
        for name, counts in queue_stats(self.redis, self.queues).items():
            depth.add_metric([name], counts.queued)
            started.add_metric([name], counts.running)
            scheduled.add_metric([name], counts.scheduled)
            failed.add_metric([name], counts.failed)
        workers = GaugeMetricFamily("cvat_hooks_workers", "RQ workers alive.")
        workers.add_metric([], worker_count(self.redis))
        up = GaugeMetricFamily("cvat_hooks_redis_up", "Whether Redis answered this scrape.")
        up.add_metric([], 1)
        yield from (depth, started, scheduled, failed, workers, up)


class RulesCollector:
    """Gauges of the rules held by the process answering the scrape (every receiver process watches
    the same file, so they agree within a second): version in force, rule count, a refused edit."""

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily("cvat_hooks_rules_info", "The rules in force (always 1): their version "
                                 "(first 12 hex digits of the file's SHA-256) and file.",
                                 labels=["version", "source"])
        info.add_metric([str(self.status.get("version") or ""), str(self.status.get("source") or "")], 1)
        count = GaugeMetricFamily("cvat_hooks_rules_loaded", "Rules in force.")
        count.add_metric([], float(self.status.get("rule_count") or 0))
        failed = GaugeMetricFamily("cvat_hooks_rules_reload_failed",
                                   "1 while the rules file on disk was refused (the last good rules "
                                   "stay in force), else 0.")
        failed.add_metric([], 1.0 if self.status.get("reload_failed") else 0.0)
        yield from (info, count, failed)


def render(redis: Redis, queues: Iterable[str], *, rules: Mapping[str, Any] | None = None) -> bytes:
    """The text exposition of every cvat-hooks metric (with ``rules``: the rules gauges, from
    :meth:`receiver.rules.store.RuleStore.status`)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedisCollector(redis, queues))  # type: ignore[arg-type]
    if rules is not None:
        registry.register(RulesCollector(rules))  # type: ignore[arg-type]
    return generate_latest(registry)
