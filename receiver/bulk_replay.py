"""Replay many deliveries at once, after an outage (Hookdeck's bulk retry, Svix's "recover since").

``cvat-hooks deliveries replay --status failed --since 2h [--rule R] [--rematch] [--dry-run]`` and
the UI's filtered list use the same steps: :func:`replay_one` per delivery (a plain replay, or a
re-match with the current rules), counted in a :class:`Report`. The UI runs a bulk replay in a
thread of the receiver and keeps its progress in Redis (:class:`Progress`), so the progress page
works whichever gunicorn worker serves it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.delivery_log import Delivery, DeliveryLog
from core.keys import BULK_REPLAY_KEY as PROGRESS_KEY
from core.replay import NothingToReplay, replay
from receiver.rematch import rematch

if TYPE_CHECKING:
    from redis import Redis

    from receiver.rules import RuleSet

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 86400
"""Seconds a bulk replay's progress (a Redis hash under :data:`PROGRESS_KEY`: ``total``, ``done``,
``replayed``, ``skipped``, ``jobs``, ``finished`` (0/1), ``error``) stays readable."""
MAX_BULK = 2000
"""Most deliveries one bulk replay takes (the list scans as many recent ones)."""


@dataclass
class Report:
    """What a bulk replay did."""

    total: int = 0
    replayed: int = 0
    skipped: int = 0
    jobs: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    """Why each skipped delivery ran nothing, by delivery id."""


def replay_one(log: DeliveryLog, delivery: Delivery, *, rules: RuleSet | None = None, force: bool = False,
               service_account: str | None = None, dry_run: bool = False) -> list[str]:
    """Replay one delivery (re-matched when ``rules`` are given); the job ids it queued (or would).

    Raises :class:`NothingToReplay` with the reason when it would run nothing.
    """
    if rules is not None:
        return rematch(log, delivery, rules, force=force, service_account=service_account,
                       dry_run=dry_run).job_ids
    if dry_run:
        from core.replay import why_not

        refusal = why_not(delivery, force=force)
        if refusal is not None:
            raise NothingToReplay(delivery.id, refusal)
        return []
    return replay(log, delivery, force=force)


def replay_all(log: DeliveryLog, deliveries: Iterable[Delivery], *, rules: RuleSet | None = None,
               force: bool = False, service_account: str | None = None, dry_run: bool = False,
               step: Callable[[Delivery, list[str] | None], None] | None = None) -> Report:
    """Replay each delivery in turn; ``step(delivery, job ids or None if skipped)`` after each one."""
    report = Report()
    for delivery in deliveries:
        report.total += 1
        try:
            jobs: list[str] | None = replay_one(log, delivery, rules=rules, force=force,
                                                service_account=service_account, dry_run=dry_run)
        except NothingToReplay as exc:
            jobs = None
            report.skipped += 1
            report.reasons[delivery.id] = str(exc).removeprefix(f"delivery {delivery.id}: ")
        else:
            report.replayed += 1
            report.jobs += jobs or []
        if step is not None:
            step(delivery, jobs)
    return report


class Progress:
    """A bulk replay's progress in Redis, written by the thread running it, read by any page."""

    def __init__(self, redis: Redis, bulk_id: str) -> None:
        self.redis = redis
        self.id = bulk_id
        self.key = PROGRESS_KEY + bulk_id

    @classmethod
    def new(cls, redis: Redis, total: int, what: str) -> Progress:
        """A fresh progress record for ``total`` deliveries."""
        progress = cls(redis, secrets.token_hex(8))
        with redis.pipeline() as pipe:
            pipe.hset(progress.key, mapping={"total": total, "done": 0, "replayed": 0, "skipped": 0, "jobs": 0,
                                             "finished": 0, "what": what, "started": time.time()})
            pipe.expire(progress.key, PROGRESS_SECONDS)
            pipe.execute()
        return progress

    def step(self, delivery: Delivery, jobs: list[str] | None) -> None:
        """Count one delivery done."""
        with self.redis.pipeline() as pipe:
            pipe.hincrby(self.key, "done", 1)
            pipe.hincrby(self.key, "replayed" if jobs is not None else "skipped", 1)
            pipe.hincrby(self.key, "jobs", len(jobs or []))
            pipe.execute()

    def finish(self, error: str | None = None) -> None:
        """Mark it finished (with the error that stopped it, if one did)."""
        self.redis.hset(self.key, mapping={"finished": 1, "error": error or ""})

    def read(self) -> dict[str, Any] | None:
        """The progress as numbers (``None``: unknown or expired)."""
        raw = self.redis.hgetall(self.key)
        if not raw:
            return None
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()}
        out: dict[str, Any] = {k: int(data.get(k, 0)) for k in
                               ("total", "done", "replayed", "skipped", "jobs", "finished")}
        out["what"], out["error"] = data.get("what", ""), data.get("error") or None
        out["percent"] = int(100 * out["done"] / out["total"]) if out["total"] else 100
        return out


def start(deliveries_log: DeliveryLog, deliveries: list[Delivery], what: str, **options: Any) -> Progress:
    """Run :func:`replay_all` in a daemon thread, counting into a new :class:`Progress`."""
    progress = Progress.new(deliveries_log.redis, len(deliveries), what)

    def run() -> None:
        try:
            report = replay_all(deliveries_log, deliveries, step=progress.step, **options)
        except Exception as exc:  # Redis went away mid-way: say so on the progress page
            reason = f"{type(exc).__name__}: {exc}"
            log.error("bulk replay %s: stopped: %s", progress.id, reason)
            try:
                progress.finish(reason)
            except Exception as again:
                log.error("bulk replay %s: could not record that it stopped: %s", progress.id, again)
            return
        progress.finish()
        log.info("bulk replay %s (%s): %d replayed, %d skipped, %d job(s) queued", progress.id, what,
                 report.replayed, report.skipped, len(report.jobs))

    threading.Thread(target=run, name=f"bulk-replay-{progress.id}", daemon=True).start()
    return progress
