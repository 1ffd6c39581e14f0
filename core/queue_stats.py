"""How many jobs each queue holds, and in which state: one reading for ``doctor``, ``/metrics`` and
the admin UI and API, so the three can never disagree about the same Redis.

A read must change nothing. RQ's ``registry.count`` runs the registry's cleanup first, and the
StartedJobRegistry's cleanup fails the jobs whose run expired: a scrape or a page view would then
beat the workers' maintenance (:func:`workers.rq_gaps.rescue_expired`) to a job a dead worker had
taken (rq/rq#2015), and drop dead letters whose failure TTL ran out, so a count would depend on who
looked first. Every count here is ``get_job_count(cleanup=False)``.

RQ offers no public way to send these counts on one pipeline (``get_job_count`` takes none), so
each is its own small read (``LLEN``/``ZCARD``): a few round trips per queue, not one snapshot.
The deferred registry is not counted: nothing of ours enqueues with ``depends_on``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from core.contract import QUEUES
from core.queueing import queue

if TYPE_CHECKING:
    from redis import Redis


@dataclass(frozen=True)
class QueueStats:
    """The jobs of one queue, by state."""

    queued: int
    """Waiting on the queue for a worker."""
    running: int
    """In RQ's started registry: taken by a worker (possibly a dead one, until maintenance rescues it)."""
    scheduled: int
    """Waiting in RQ's scheduled registry for a delayed retry."""
    failed: int
    """Given up: RQ's failed registry, the dead letters."""

    def to_json(self) -> dict[str, int]:
        """The admin API's shape: ``{"queued", "running", "scheduled", "failed"}``."""
        return asdict(self)


def queue_stats(redis: Redis, names: Iterable[str] = QUEUES) -> dict[str, QueueStats]:
    """Each queue of ``names`` (every queue of ours by default) with its counts, read without running
    any of RQ's cleanup."""
    found: dict[str, QueueStats] = {}
    for name in names:
        q = queue(name, redis)
        found[name] = QueueStats(
            queued=q.count,
            running=q.started_job_registry.get_job_count(cleanup=False),
            scheduled=q.scheduled_job_registry.get_job_count(cleanup=False),
            failed=q.failed_job_registry.get_job_count(cleanup=False),
        )
    return found


def worker_count(redis: Redis) -> int:
    """The RQ workers alive now. ``Worker.all`` skips a worker whose record expired (it died without
    saying so); ``Worker.count`` reads RQ's set of names and would count it until RQ's cleanup."""
    from rq import Worker

    return len(Worker.all(connection=redis))
