"""What the admin API and the UI both read: delivery filters, queue stats, throughput, rules.

One place for the parsing of ``?event=&rule=&status=&since=&until=&limit=`` and for the figures,
so the JSON API and the web page can never disagree about what a filter or a count means.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from core import metrics
from core.contract import QUEUES
from core.delivery_log import INDEX_KEY, Delivery, DeliveryLog, DeliveryStatus

if TYPE_CHECKING:
    from collections.abc import Mapping

    from redis import Redis

    from core.redaction import Redactor
    from receiver.rules.model import RuleSet

DEFAULT_LIMIT = 50
"""Deliveries listed when no ``limit`` is given."""
MAX_LIMIT = 500
"""Most deliveries one list answer holds (each is a Redis read; the log keeps thousands)."""
STATUSES: tuple[str, ...] = tuple(s.value for s in DeliveryStatus)
"""Every value the ``status`` filter accepts."""

_DURATION = re.compile(r"^(\d{1,7})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class BadFilter(ValueError):
    """A query parameter that cannot be understood; the message says which and what is allowed."""


def parse_when(name: str, value: str | None, *, now: float | None = None) -> float | None:
    """A time filter as a unix time: ISO date/time (naive means UTC), or a duration back (``2h``)."""
    if not value:
        return None
    found = _DURATION.match(value.strip())
    if found:
        return (now if now is not None else time.time()) - int(found[1]) * _UNITS[found[2]]
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadFilter(f"{name}: use an ISO date/time or a duration such as 30m, 2h, 7d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@dataclass(frozen=True)
class Filters:
    """The filters of a delivery list, as given (strings) so a form can show them back."""

    event: str = ""
    rule: str = ""
    status: str = ""
    since: str = ""
    until: str = ""
    limit: int = DEFAULT_LIMIT
    job: int | None = None
    """Only deliveries about this CVAT job (the event's ``job_id``)."""
    task: int | None = None
    project: int | None = None
    page: int = 1
    """1-based page of ``limit`` deliveries (the list scans at most :data:`MAX_SCAN` recent ones)."""

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> Filters:
        """Read and validate query parameters; raises :class:`BadFilter` with a helpful message."""
        status = (args.get("status") or "").strip()
        if status and status not in STATUSES:
            raise BadFilter(f"status: one of {', '.join(STATUSES)}")
        raw_limit = (args.get("limit") or "").strip()
        try:
            limit = int(raw_limit) if raw_limit else DEFAULT_LIMIT
        except ValueError:
            raise BadFilter(f"limit: a whole number from 1 to {MAX_LIMIT}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise BadFilter(f"limit: a whole number from 1 to {MAX_LIMIT}")
        text = {name: (args.get(name) or "").strip()[:200] for name in ("event", "rule", "since", "until")}
        page = _whole(args, "page", 1, MAX_SCAN) or 1
        filters = cls(status=status, limit=limit, page=page, event=text["event"], rule=text["rule"],
                      since=text["since"], until=text["until"], job=_whole(args, "job", 1, 2**62),
                      task=_whole(args, "task", 1, 2**62), project=_whole(args, "project", 1, 2**62))
        filters.window()  # validate the times now, so the caller answers 400 before any read
        return filters

    def window(self) -> tuple[float | None, float | None]:
        """``(since, until)`` as unix times."""
        return parse_when("since", self.since), parse_when("until", self.until)

    def to_json(self) -> dict[str, Any]:
        """The filters that were given, echoed in the list answer."""
        return {k: v for k, v in asdict(self).items() if v not in ("", None)}

    def apply(self, log: DeliveryLog) -> list[Delivery]:
        """The matching deliveries of this page, newest first."""
        return self.page_of(log)[0]

    def page_of(self, log: DeliveryLog) -> tuple[list[Delivery], bool]:
        """This page's deliveries, newest first, and whether another page follows."""
        since, until = self.window()
        wanted = {f"{name}_id": value for name in ID_FILTERS if (value := getattr(self, name)) is not None}
        end = self.page * self.limit + 1
        found = log.list(limit=MAX_SCAN if wanted else end, event=self.event or None, rule=self.rule or None,
                         status=self.status or None, since=since, until=until, scan=MAX_SCAN)
        if wanted:
            found = [d for d in found
                     if all((d.record.get("ids") or {}).get(k) == v for k, v in wanted.items())][:end]
        start = (self.page - 1) * self.limit
        return found[start:start + self.limit], len(found) > start + self.limit

    def query(self, **changes: Any) -> dict[str, Any]:
        """These filters as query parameters (for links: other pages, the bulk replay), with ``changes``."""
        params = {k: v for k, v in asdict(self).items() if v not in ("", None)}
        if params.get("limit") == DEFAULT_LIMIT:
            del params["limit"]
        params.pop("page", None)
        params.update({k: v for k, v in changes.items() if v is not None})
        return params

    @property
    def narrowed(self) -> bool:
        """Whether any filter narrows the list (a bulk replay is only offered for a chosen set)."""
        return any((self.event, self.rule, self.status, self.since, self.until,
                    *(getattr(self, n) is not None for n in ID_FILTERS)))


ID_FILTERS = ("job", "task", "project")
"""Query parameters that select deliveries by the CVAT ids their event implies."""
MAX_SCAN = 2000
"""Most recent deliveries a list (with its pages) looks at."""


def _whole(args: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    """A whole-number query parameter in ``[low, high]``, ``None`` when absent; :class:`BadFilter` else."""
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadFilter(f"{name}: a whole number from {low} to {high}")
    return int(raw)


def valid_delivery_id(value: str) -> bool:
    """Ids are hex digests; anything else cannot name a delivery and is not looked up at all."""
    return bool(_DELIVERY_ID.match(value))


def throughput(redis: Redis, *, now: float | None = None) -> dict[str, int]:
    """Deliveries received in the last minute and hour, from the delivery index (scores = unix time)."""
    now = now if now is not None else time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.zcount(INDEX_KEY, now - 60, "+inf")
    pipe.zcount(INDEX_KEY, now - 3600, "+inf")
    minute, hour = pipe.execute()
    return {"last_minute": int(minute), "last_hour": int(hour)}


def counters(redis: Redis) -> dict[str, dict[str, int]]:
    """Totals since the metrics began: deliveries by outcome, action runs by outcome, rejections by reason."""
    totals: dict[str, dict[str, int]] = {"deliveries": {}, "actions": {}, "rejected": {}}
    # Field format ``name|label1|label2`` (core.metrics); the outcome or reason is the last label.
    wanted = {"cvat_hooks_deliveries_total": "deliveries", "cvat_hooks_action_runs_total": "actions",
              "cvat_hooks_rejected_total": "rejected"}
    for key, value in redis.hgetall(metrics.COUNTERS_KEY).items():
        parts = (key.decode() if isinstance(key, bytes) else key).split("|")
        if parts[0] not in wanted or len(parts) < 2:
            continue
        group, label = wanted[parts[0]], parts[-1] or "unknown"
        totals[group][label] = totals[group].get(label, 0) + int(value)
    return totals


def queue_stats(redis: Redis) -> dict[str, dict[str, int]]:
    """Per queue: jobs waiting, running, waiting for a retry, and given up (RQ's failed registry), as
    ``doctor`` and ``/metrics`` count them (:mod:`core.queue_stats`)."""
    from core.queue_stats import queue_stats as read

    return {name: counts.to_json() for name, counts in read(redis, QUEUES).items()}


def stats(redis: Redis) -> dict[str, Any]:
    """Everything ``GET /api/stats`` and the UI header show."""
    from core.queue_stats import worker_count

    queues = queue_stats(redis)
    return {
        "queues": queues,
        "failed_jobs": sum(q["failed"] for q in queues.values()),
        "workers": worker_count(redis),
        "throughput": throughput(redis),
        **counters(redis),
    }


def rules_json(rules: RuleSet, redactor: Redactor) -> dict[str, Any]:
    """The loaded rules as JSON (parameters redacted: a rule may carry a URL with credentials)."""
    from workers.actions import public_params

    return redactor.data({
        "source": rules.source,
        "digest": rules.digest,
        "warnings": [str(w) for w in rules.warnings],
        "rules": [
            {"id": r.id, "description": r.description, "on": list(r.on), "line": r.line,
             "retry": r.retry.to_json(),
             "actions": [{"index": a.index, "action": a.action, "line": a.line,
                          "params": public_params(a.action, _plain(a.params))}
                         for a in r.actions]}
            for r in rules.rules
        ],
    })


def _plain(value: Any) -> Any:
    """YAML mappings and tuples as JSON-ready dicts and lists."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


OPS_LIMIT = 100
"""Most jobs listed per queue and registry on the queues page."""


def _job_row(job: Any, when: Any = None) -> dict[str, Any]:
    """What the queues page shows of one RQ job: id, what it runs, its delivery, its last error line."""
    call = job.args[0] if job.args and isinstance(job.args[0], dict) else {}
    lines: list[str] = []
    try:
        result = job.latest_result()
        lines = (getattr(result, "exc_string", "") or "").strip().splitlines()
    except Exception:  # an old job without results: no error line to show
        lines = []
    return {"id": job.id, "description": job.description or "", "delivery_id": call.get("delivery_id"),
            "action": call.get("action"), "rule_id": call.get("rule_id"), "error": lines[-1] if lines else "",
            "when": when.strftime("%Y-%m-%d %H:%M:%S") if hasattr(when, "strftime") else ""}


def operations(redis: Redis) -> dict[str, Any]:
    """Queues, workers, scheduled retries and dead letters (RQ's failed registry), for the queues page."""
    from rq import Worker
    from rq.job import Job
    from rq.registry import FailedJobRegistry, ScheduledJobRegistry

    from core.queueing import queue

    scheduled: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for name in QUEUES:
        q = queue(name, redis)
        later = ScheduledJobRegistry(queue=q)
        ids = later.get_job_ids(0, OPS_LIMIT - 1, cleanup=False)
        for job in Job.fetch_many(ids, connection=redis, serializer=q.serializer):
            if job is not None:
                scheduled.append({**_job_row(job, later.get_scheduled_time(job)), "queue": name})
        dead = FailedJobRegistry(queue=q)
        ids = dead.get_job_ids(0, OPS_LIMIT - 1, desc=True, cleanup=False)
        for job in Job.fetch_many(ids, connection=redis, serializer=q.serializer):
            if job is not None:
                failed.append({**_job_row(job, job.ended_at), "queue": name})
    workers = [{"name": w.name, "state": str(w.get_state()), "queues": ", ".join(w.queue_names()),
                "job": w.get_current_job_id() or "",
                "heartbeat": w.last_heartbeat.strftime("%Y-%m-%d %H:%M:%S") if w.last_heartbeat else ""}
               for w in Worker.all(connection=redis)]
    return {"queues": queue_stats(redis), "workers": workers, "scheduled": scheduled, "failed": failed}


class NotRequeued(ValueError):
    """The job is not a dead letter of ours (already requeued, expired, or never failed)."""


def requeue(redis: Redis, job_id: str) -> str:
    """Put a dead letter back on its queue with RQ's own requeue; the queue's name."""
    from rq.exceptions import InvalidJobOperation, NoSuchJobError
    from rq.registry import FailedJobRegistry

    from core.queueing import queue

    for name in QUEUES:
        registry = FailedJobRegistry(queue=queue(name, redis))
        if job_id in registry:
            try:
                registry.requeue(job_id)
            except (InvalidJobOperation, NoSuchJobError) as exc:
                raise NotRequeued(f"job {job_id} could not be requeued: {exc}") from exc
            return name
    raise NotRequeued(f"job {job_id} is not among the failed jobs (already requeued, or expired)")
