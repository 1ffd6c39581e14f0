"""Per-minute figures of the last day, for the admin UI's charts: deliveries, failures, queue depth.

Cheap on purpose (issue 18, item 9):
- deliveries cost no write at all: they are counted from the delivery index (``ZCOUNT`` of its
  receipt times, :data:`core.delivery_log.INDEX_KEY`);
- failures are one ``HINCRBY`` (plus its ``EXPIRE``) per action run given up, written by
  :func:`core.metrics.inc` beside the counter it already increments, in the same transaction;
- queue depth is sampled once a minute by each receiver process (:func:`sample_depth`), and the
  first sample of a minute wins (``HSETNX``), so more processes cost no more than a write each.

One Redis hash per hour (``cvat-hooks:history:<unix hour>``), fields ``f:<minute>`` and
``d:<minute>``, expiring after :data:`KEEP_SECONDS`.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.keys import HISTORY_KEY as KEY

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

    from core.receipts import Batch

log = logging.getLogger(__name__)

KEEP_SECONDS = 26 * 3600
"""Seconds an hour's figures are kept: the day chart plus the hour being written."""
SAMPLE_SECONDS = 60.0
"""Seconds between two queue-depth samples of a process."""


def count_failure(target: Redis | Pipeline | Batch, at: float | None = None) -> None:
    """Count one action run given up, in minute ``at`` (on the caller's pipeline: no round trip)."""
    minute = int((at if at is not None else time.time()) // 60)
    key = f"{KEY}{minute // 60}"
    target.hincrby(key, f"f:{minute}", 1)
    target.expire(key, KEEP_SECONDS)


def sample_depth(redis: Redis, depth: int, at: float | None = None) -> None:
    """Keep ``depth`` (jobs waiting, all queues) as this minute's sample, unless one is kept already."""
    minute = int((at if at is not None else time.time()) // 60)
    key = f"{KEY}{minute // 60}"
    with redis.pipeline(transaction=False) as pipe:
        pipe.hsetnx(key, f"d:{minute}", depth)
        pipe.expire(key, KEEP_SECONDS)
        pipe.execute()


@dataclass(frozen=True)
class Bucket:
    """One bar of a chart: ``start`` (unix time) and its figures."""

    start: float
    deliveries: int
    failures: int
    depth: int | None
    """The largest queue depth sampled in the bucket (``None``: no sample)."""


def buckets(redis: Redis, index_key: str, *, span: int, step: int, now: float | None = None) -> list[Bucket]:
    """The last ``span`` seconds in buckets of ``step`` seconds (both whole minutes), oldest first."""
    now = now if now is not None else time.time()
    end_minute = int(now // 60) + 1
    first_minute = end_minute - span // 60
    per = step // 60
    hours = range(first_minute // 60, (end_minute - 1) // 60 + 1)
    pipe = redis.pipeline(transaction=False)
    for hour in hours:
        pipe.hgetall(f"{KEY}{hour}")
    starts = [(first_minute + i * per) * 60 for i in range(span // step)]
    for start in starts:
        pipe.zcount(index_key, start, f"({start + step}")
    results = pipe.execute()
    fields: dict[str, int] = {}
    for raw in results[:len(hours)]:
        for k, v in raw.items():
            fields[k.decode() if isinstance(k, bytes) else k] = int(v)
    out = []
    for start, delivered in zip(starts, results[len(hours):], strict=True):
        minutes = range(int(start // 60), int(start // 60) + per)
        depths = [fields[f"d:{m}"] for m in minutes if f"d:{m}" in fields]
        out.append(Bucket(start, int(delivered), sum(fields.get(f"f:{m}", 0) for m in minutes),
                          max(depths) if depths else None))
    return out


def start_sampler(owner: Any, redis_of: Callable[[Any], Redis], depth_of: Callable[[Redis], int],
                  interval: float = SAMPLE_SECONDS) -> threading.Thread:
    """Sample the queue depth every ``interval`` seconds in a daemon thread while ``owner`` lives
    (held weakly: an app nobody uses any more is collected and its thread ends)."""
    ref = weakref.ref(owner)

    def loop() -> None:
        while True:
            current = ref()
            if current is None:
                return
            try:
                redis = redis_of(current)
                sample_depth(redis, depth_of(redis))
            except Exception as exc:  # Redis down: no sample this minute, the chart shows a gap
                log.debug("history: no queue depth sample: %s", exc)
            del current
            time.sleep(interval)

    thread = threading.Thread(target=loop, name="history-sampler", daemon=True)
    thread.start()
    return thread
