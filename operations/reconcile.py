"""``cvat-hooks reconcile``: ask CVAT to redeliver what the receiver never recorded.

CVAT before mid-2026 never retries a failed delivery, newer CVAT gives up after about four days,
and the receiver can be down or unreachable. CVAT keeps every delivery attempt
(``GET /api/webhooks/{id}/deliveries``, each with the payload it sent in ``request``) and can send
one again (``POST .../deliveries/{id}/redelivery``). So for every webhook of this deployment (the ones
its ``register`` remembered in its Redis, ``operations.webhook_registry``; another deployment's on the same
CVAT, or a cvat-hooks webhook this deployment never registered, are left alone and listed in the run):

* read its deliveries back to a horizon (``--since``, 4 days by default, never further back than the
  receiver remembers delivery ids: ``CVAT_HOOKS_DEDUPE_DAYS``);
* compute each payload's delivery id as the receiver does (``core.events.delivery_id_of``) and
  look for the receiver's ``cvat-hooks:seen:<id>`` key;
* redeliver the payloads the receiver has no key for, whatever status CVAT recorded (a failure, or a
  2xx from something that was not this receiver). A failed delivery the receiver *did* record was
  processed (CVAT gave up waiting for the answer, or a proxy failed after it): it is only counted.

Redelivery is safe because the receiver dedupes on the payload. Limits keep it cheap and bounded:
one redelivery per payload per run; at most ``max_tries`` per payload overall (remembered in Redis,
as long as the delivery id); one run at a time (a Redis lock). The periodic run (the workers'
scheduler, every ``CVAT_HOOKS_RECONCILE_MINUTES``) only reads deliveries newer than what the last
clean run of that webhook saw (minus an overlap), so when nothing is missing it costs one page per
webhook. Each run is recorded in ``cvat-hooks:reconcile:runs`` (newest first), shown by ``doctor``.
A remembered webhook that CVAT answers 404 for (deleted) is forgotten, and so is one another deployment
has since adopted (its description names that deployment).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from redis.exceptions import LockError, RedisError

from core.contract import LIGHT_QUEUE
from core.delivery_log import iso
from core.errors import ActionError
from core.events import delivery_id_of
from core.keys import RECONCILE_JOB_ID as JOB_ID
from core.keys import RECONCILE_LOCK_KEY as LOCK_KEY
from core.keys import RECONCILE_RUNS_KEY as RUNS_KEY
from core.keys import RECONCILE_SCHEDULE_LOCK_KEY as SCHEDULE_LOCK
from core.keys import RECONCILE_TRIES_KEY as TRIES_KEY
from core.keys import RECONCILE_WATERMARK_KEY as WATERMARK_KEY
from core.keys import SEEN_KEY
from core.queueing import SERIALIZER, queue
from core.redaction import Redactor
from operations import webhook_registry as registry
from operations.cvat_webhooks import (
    Webhook,
    WebhookGateway,
    deliveries_since,
    is_not_found,
    is_success,
    parse_time,
    visible_webhooks,
)
from receiver.settings import Settings

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

DEFAULT_SINCE = 4 * 86400
"""Seconds back a reconcile looks by default: about as long as the newest CVAT retries a delivery."""
MAX_TRIES = 3
"""Redeliveries of one payload, over all runs, before reconcile gives up on it."""
OVERLAP = 600
"""Seconds before the last clean run's newest delivery that a periodic run reads again (CVAT writes
delivery records from several workers, not quite in order)."""
RUNS_KEPT = 100
LISTED = 200
"""Entries of each list kept in a run's record (the counts are always complete)."""
LOCK_SECONDS = 1800
"""Longest a run may hold the lock (and the periodic job's timeout)."""
JOB_FUNCTION = "operations.reconcile.scheduled_run"
"""What the periodic job calls, by name: a job scheduled under another name (an older release's
module) is replaced when a worker starts."""
FIRST_RUN_DELAY = 60
"""Seconds after a worker starts before the first periodic run (at most one period)."""
REPEATS = 10**9
"""RQ repeats of the periodic job: for ever, in practice."""


class ReconcileBusy(RuntimeError):
    """Another reconcile holds the lock."""


@dataclass
class Report:
    """What one run found and did."""

    trigger: str
    dry_run: bool
    since: float
    started: float = field(default_factory=time.time)
    webhooks: list[int] = field(default_factory=list)
    checked: int = 0
    """Deliveries read (pings left out)."""
    recorded_failures: int = 0
    """Events whose latest delivery CVAT saw fail but the receiver recorded anyway: nothing to do."""
    redelivered: list[dict[str, Any]] = field(default_factory=list)
    """Redeliveries asked for (with ``dry_run``: that would have been)."""
    gave_up: list[dict[str, Any]] = field(default_factory=list)
    """Missing payloads already redelivered ``max_tries`` times."""
    errors: list[str] = field(default_factory=list)
    left_alone: list[dict[str, Any]] = field(default_factory=list)
    """cvat-hooks webhooks that are not this deployment's (another deployment's, or never adopted)."""
    forgotten: list[dict[str, Any]] = field(default_factory=list)
    """Remembered webhooks this run forgot (deleted in CVAT, or adopted by another deployment)."""
    finished: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"at": iso(self.started), "ts": self.started, "trigger": self.trigger, "dry_run": self.dry_run,
                "since": iso(self.since), "duration": round((self.finished or time.time()) - self.started, 3),
                "webhooks": self.webhooks, "checked": self.checked,
                "recorded_failures": self.recorded_failures,
                "redelivered_count": len(self.redelivered), "redelivered": self.redelivered[:LISTED],
                "gave_up_count": len(self.gave_up), "gave_up": self.gave_up[:LISTED],
                "left_alone": self.left_alone[:LISTED], "forgotten": self.forgotten[:LISTED],
                "errors": self.errors[:LISTED]}

    def lines(self) -> list[str]:
        """What ``cvat-hooks reconcile`` prints."""
        verb = "would redeliver" if self.dry_run else "redelivered"
        out = [f"checked {self.checked} deliveries of {len(self.webhooks)} webhook(s) of this deployment since "
               f"{iso(self.since)}: {verb} {len(self.redelivered)}, gave up on {len(self.gave_up)}, "
               f"{self.recorded_failures} failed at CVAT but recorded by the receiver"]
        for item in self.redelivered:
            out.append(f"  {verb} webhook {item['webhook_id']} delivery {item['cvat_delivery_id']} "
                       f"({item['event']}, CVAT status {item['status_code']}, {item['created_date']})")
        for item in self.gave_up:
            out.append(f"  gave up on webhook {item['webhook_id']} delivery {item['cvat_delivery_id']} "
                       f"({item['event']}): already redelivered {item['tries']} times")
        for item in self.left_alone:
            out.append(f"  left alone webhook {item['webhook_id']} ({item['where']}): {item['why']}")
        if self.left_alone and not self.webhooks and not self.forgotten:
            out.append("  this deployment's Redis remembers no webhook (never registered, or the Redis was reset): "
                       "`cvat-hooks register` with a webhook's scope and URL adopts it")
        forgot = "would forget" if self.dry_run else "forgot"
        for item in self.forgotten:
            out.append(f"  {forgot} webhook {item['webhook_id']} ({item['where']}): {item['why']}")
        out += [f"  error: {e}" for e in self.errors]
        return out


def reconcile(gateway: WebhookGateway, redis: Redis, *, since_seconds: float = DEFAULT_SINCE,
              dedupe_seconds: int, retention_seconds: int, dry_run: bool = False, max_tries: int = MAX_TRIES,
              trigger: str = "cli", incremental: bool = False, redactor: Redactor | None = None) -> Report:
    """One run over every cvat-hooks webhook visible to the gateway; recorded, then returned.

    ``incremental`` (the periodic run) starts each webhook where its last clean run stopped.
    Raises ``ReconcileBusy`` if another run is in progress.
    """
    lock = redis.lock(LOCK_KEY, timeout=LOCK_SECONDS, blocking=False)
    if not lock.acquire():
        raise ReconcileBusy("another reconcile is running")
    try:
        horizon = time.time() - min(since_seconds, dedupe_seconds)
        run = _Run(gateway, redis, Report(trigger=trigger, dry_run=dry_run, since=horizon),
                   dry_run=dry_run, max_tries=max_tries, dedupe_seconds=dedupe_seconds,
                   redactor=redactor or Redactor())
        run.all(incremental=incremental)
        run.report.finished = time.time()
        record(redis, run.report, retention_seconds)
        return run.report
    finally:
        try:
            lock.release()
        except LockError:
            log.warning("reconcile: the lock expired before the run ended")


class _Run:
    """The state of one run (kept apart so ``reconcile`` reads as the story above)."""

    def __init__(self, gateway: WebhookGateway, redis: Redis, report: Report, *, dry_run: bool,
                 max_tries: int, dedupe_seconds: int, redactor: Redactor) -> None:
        self.gateway, self.redis, self.report = gateway, redis, report
        self.dry_run, self.max_tries, self.dedupe_seconds = dry_run, max_tries, dedupe_seconds
        self.redactor = redactor
        self.done: set[str] = set()

    def error(self, what: str, exc: Exception) -> None:
        message = self.redactor.text(f"{what}: {exc}")
        log.warning("reconcile: %s", message)
        self.report.errors.append(message)

    def all(self, *, incremental: bool) -> None:
        """Every webhook this deployment remembers; the other cvat-hooks ones are only reported."""
        known = registry.load(self.redis)
        try:
            visible = {w.id: w for w in visible_webhooks(self.gateway)}
        except ActionError as exc:
            self.error("listing webhooks", exc)
            return
        for hook in visible.values():
            owner = known.ownership(hook)
            if owner in (registry.Ownership.OTHER, registry.Ownership.UNADOPTED):
                self.report.left_alone.append({"webhook_id": hook.id, "where": hook.where, "owner": owner.value,
                                               "why": owner.label(hook)})
        for remembered in sorted(known.webhooks.values(), key=lambda r: r.id):
            listed = visible.get(remembered.id)
            if listed is not None and known.ownership(listed) is not registry.Ownership.THIS:
                self.forget(listed, f"now {known.ownership(listed).label(listed)}")
                continue
            # Not listed: deleted (forgotten on CVAT's 404), or not listed to these credentials.
            self.report.webhooks.append(remembered.id)
            self.webhook(listed or remembered.as_webhook(), incremental=incremental)

    def forget(self, hook: Webhook, why: str) -> None:
        """Stop treating ``hook`` as this deployment's (not in a dry run: only reported then)."""
        log.info("reconcile: webhook %s (%s) forgotten: %s", hook.id, hook.where, why)
        self.report.forgotten.append({"webhook_id": hook.id, "where": hook.where, "why": why})
        if not self.dry_run:
            registry.forget(self.redis, [hook.id])

    def webhook(self, hook: Webhook, *, incremental: bool) -> None:
        """Check one webhook's deliveries; move its watermark when everything went through."""
        since = self.report.since
        watermark_key = WATERMARK_KEY.format(hook.id)
        if incremental:
            mark = self.redis.get(watermark_key)
            if mark is not None:
                since = max(since, float(mark) - OVERLAP)
        errors = len(self.report.errors)
        newest: float | None = None
        batch: list[tuple[dict[str, Any], str]] = []
        try:
            for delivery in deliveries_since(self.gateway, hook.id, datetime.fromtimestamp(since, UTC)):
                created = parse_time(delivery.get("created_date"))
                if created is not None and (newest is None or created.timestamp() > newest):
                    newest = created.timestamp()
                payload = delivery.get("request")
                if delivery.get("event") == "ping" or not isinstance(payload, dict) or not payload:
                    continue
                self.report.checked += 1
                batch.append((delivery, delivery_id_of(payload)))
                if len(batch) >= 100:
                    self.handle(hook, batch)
                    batch = []
            self.handle(hook, batch)
        except ActionError as exc:
            if is_not_found(exc):
                self.report.webhooks.remove(hook.id)
                self.forget(hook, "deleted in CVAT")
                return
            self.error(f"webhook {hook.id}", exc)
        if newest is not None and not self.dry_run and len(self.report.errors) == errors:
            self.redis.set(watermark_key, newest, ex=self.dedupe_seconds)

    def handle(self, hook: Webhook, batch: Sequence[tuple[dict[str, Any], str]]) -> None:
        """Decide, for a page of deliveries, which to redeliver (two Redis round trips per page)."""
        if not batch:
            return
        pipe = self.redis.pipeline(transaction=False)
        for _, did in batch:
            pipe.exists(SEEN_KEY.format(did))
            pipe.get(TRIES_KEY.format(did))
        answers = pipe.execute()
        for i, (delivery, did) in enumerate(batch):
            seen, tries = answers[2 * i], int(answers[2 * i + 1] or 0)
            if did in self.done:
                continue
            self.done.add(did)
            status = delivery.get("status_code")
            if seen:
                if not is_success(status):
                    self.report.recorded_failures += 1
                continue
            item = {"webhook_id": hook.id, "cvat_delivery_id": delivery.get("id"),
                    "event": delivery.get("event"), "status_code": status,
                    "created_date": delivery.get("created_date"), "delivery_id": did, "tries": tries}
            if tries >= self.max_tries:
                self.report.gave_up.append(item)
                continue
            if not self.dry_run:
                try:
                    self.gateway.redeliver(hook.id, int(delivery["id"]))
                except ActionError as exc:
                    self.error(f"webhook {hook.id} delivery {delivery.get('id')}", exc)
                    continue
                with self.redis.pipeline(transaction=True) as counting:
                    counting.incr(TRIES_KEY.format(did))
                    counting.expire(TRIES_KEY.format(did), self.dedupe_seconds)
                    counting.execute()
            log.info("reconcile: webhook %s delivery %s (%s, CVAT status %s) %s as delivery %s", hook.id,
                     delivery.get("id"), delivery.get("event"), status,
                     "would be redelivered" if self.dry_run else "redelivered", did)
            self.report.redelivered.append(item)


def record(redis: Redis, report: Report, retention_seconds: int) -> None:
    """Keep the run's summary (newest first, the last ``RUNS_KEPT`` runs)."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.lpush(RUNS_KEY, json.dumps(report.to_json()))
        pipe.ltrim(RUNS_KEY, 0, RUNS_KEPT - 1)
        pipe.expire(RUNS_KEY, retention_seconds)
        pipe.execute()


def recent_runs(redis: Redis, count: int = 10) -> list[dict[str, Any]]:
    """The last runs, newest first."""
    return [json.loads(raw) for raw in redis.lrange(RUNS_KEY, 0, count - 1)]


# -- the periodic run ---------------------------------------------------------------------------


def scheduled_run() -> dict[str, Any]:
    """The periodic job, run by an RQ worker. Never raises: RQ repeats a job only after a success."""
    from rq import get_current_job

    from core.redis_conn import connect
    from receiver.settings import process_settings
    from workers.cvat_client import CvatClient

    settings = process_settings()
    if not settings.workers.cvat.configured:
        return {"skipped": "CVAT is not configured"}
    job = get_current_job()
    redis = job.connection if job is not None else connect(settings.redis_url)
    redactor = Redactor(settings.sensitive_values())
    try:
        with CvatClient(settings.workers.cvat) as gateway:
            report = reconcile(gateway, redis, dedupe_seconds=settings.dedupe_seconds,
                               retention_seconds=settings.workers.retention_seconds, trigger="periodic",
                               incremental=True, redactor=redactor)
    except ReconcileBusy:
        return {"skipped": "another reconcile is running"}
    except Exception as exc:  # noqa: BLE001 - see the docstring
        message = redactor.text(f"{type(exc).__name__}: {exc}")
        log.error("reconcile: periodic run failed: %s", message)
        failed = Report(trigger="periodic", dry_run=False, since=time.time() - DEFAULT_SINCE,
                        errors=[message])
        failed.finished = time.time()
        try:
            record(redis, failed, settings.workers.retention_seconds)
        except RedisError:
            pass
        return {"error": message}
    summary = report.to_json()
    done = {k: summary[k] for k in ("at", "checked", "redelivered_count", "gave_up_count", "errors")}
    return {**done, "learned": _learn_states(settings, redis, redactor)}


def _learn_states(settings: Settings, redis: Redis, redactor: Redactor) -> dict[str, Any]:
    """After the reconcile, on the same schedule: learn what CVAT has now (``operations.state_sync``)."""
    from core.state import StateStore
    from operations.state_sync import learn_states
    from workers.cvat_client import CvatClient

    try:
        with CvatClient(settings.workers.cvat) as gateway:
            return learn_states(gateway, StateStore(redis, settings.state_seconds, redactor=redactor))
    except Exception as exc:  # noqa: BLE001 - the periodic job never raises (see scheduled_run)
        message = redactor.text(f"{type(exc).__name__}: {exc}")
        log.error("state: learning CVAT's current state failed: %s", message)
        return {"error": message}


def ensure_scheduled(redis: Redis, minutes: float, *, first_delay: float = FIRST_RUN_DELAY) -> str:
    """Make sure exactly one periodic reconcile job exists, repeating every ``minutes`` (0: none).

    Every worker calls this when it starts. The job has a fixed id and this runs under a Redis
    lock, so several workers find one job instead of adding theirs. RQ's ``Repeat`` schedules the
    next run when a run succeeds; a run that died (a killed worker) ends the chain, and the next
    worker start schedules it again. Returns what it did: scheduled, kept, removed or disabled.
    """
    from rq.exceptions import NoSuchJobError
    from rq.job import Job, JobStatus
    from rq.repeat import Repeat

    interval = max(1, round(minutes * 60)) if minutes > 0 else 0
    with redis.lock(SCHEDULE_LOCK, timeout=30, blocking_timeout=30):
        try:
            job: Job | None = Job.fetch(JOB_ID, connection=redis, serializer=SERIALIZER)
        except NoSuchJobError:
            job = None
        status = job.get_status(refresh=False) if job is not None else None
        if job is not None and status == JobStatus.STARTED:
            return "kept"  # running now; it repeats (or is fixed at the next start) on its own
        if not interval:
            if job is None:
                return "disabled"
            job.delete()
            return "removed"
        alive = (JobStatus.SCHEDULED, JobStatus.QUEUED, JobStatus.DEFERRED)
        if job is not None and status in alive and job.repeat_intervals == [interval] and job.func_name == JOB_FUNCTION:
            return "kept"
        if job is not None:
            job.delete()
        queue(LIGHT_QUEUE, redis).enqueue_in(
            timedelta(seconds=min(first_delay, interval)), JOB_FUNCTION, job_id=JOB_ID,
            repeat=Repeat(times=REPEATS, interval=interval), job_timeout=LOCK_SECONDS,
            result_ttl=max(interval * 3, 600), failure_ttl=7 * 86400,
            description=f"cvat-hooks reconcile, every {interval} s")
        return "scheduled"


def schedule_periodic(settings: Settings, redis: Redis) -> None:
    """The worker's start hook: schedule the periodic reconcile when CVAT is configured. Logs and
    never raises (a worker must start even if this fails)."""
    if not settings.workers.cvat.configured:
        log.info("reconcile: CVAT is not configured (CVAT_URL, CVAT_ACCESS_TOKEN); no periodic run")
        return
    try:
        outcome = ensure_scheduled(redis, settings.reconcile_minutes)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.error("reconcile: could not schedule the periodic run: %s: %s", type(exc).__name__, exc)
        return
    log.info("reconcile: periodic run %s (every %g min)", outcome, settings.reconcile_minutes)
