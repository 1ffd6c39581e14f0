"""The delivery log: what happened to each delivery, from receipt to each action's last attempt.

Written by the receiver (inside the same Redis transaction that enqueues the jobs) and by the
workers (one entry per step, written *before* an error is re-raised so a crash cannot hide it).
Read by ``cvat-hooks deliveries`` and the admin API. Every record expires after the retention.

Keys (named in :mod:`core.keys`; ``P`` = ``cvat-hooks``):
- ``P:delivery:<id>``: hash; ``record`` = the receipt JSON, ``action:<job_id>`` = one action's state,
  ``started:<job_id>`` = the attempt of it that is running, if one is (see :func:`running`);
- ``P:delivery:<id>:timeline``: list of JSON steps, oldest first;
- ``P:deliveries``: sorted set of delivery ids by receipt time, for listing.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from core import json_text
from core.keys import DELIVERIES_KEY as INDEX_KEY
from core.keys import DELIVERY_KEY, DELIVERY_TIMELINE_KEY
from core.redaction import Redactor

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline

    from core.receipts import Batch

log = logging.getLogger(__name__)

DUPLICATES_FIELD = "duplicates"
LAST_DUPLICATE_FIELD = "last_duplicate_at"
"""Fields of the record's hash beside ``record``, merged into it when read (see ``_build``)."""


STARTED_PREFIX = "started:"
"""Field prefix of a running attempt: written blind when it starts (no read of the action's state
first, so the start can ride in the worker's own transaction), removed by the write of its end."""


def record_key(delivery_id: str) -> str:
    return DELIVERY_KEY.format(delivery_id)


def timeline_key(delivery_id: str) -> str:
    return DELIVERY_TIMELINE_KEY.format(delivery_id)


class Outcome(StrEnum):
    """What the receiver did with a delivery."""

    QUEUED = "queued"
    NO_MATCH = "no_match"
    PING = "ping"


class ActionStatus(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"
    """Gave up: a permanent error, or transient errors until the retries ran out."""


class DeliveryStatus(StrEnum):
    """A delivery's overall state, derived from its actions when read (never stored)."""

    PING = "ping"
    NO_MATCH = "no_match"
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


_DONE = {ActionStatus.SUCCEEDED, ActionStatus.SKIPPED, ActionStatus.FAILED}


def now() -> float:
    return time.time()


RECORD_FIELD = "record"
"""A delivery record's JSON, as it is."""
PACKED_RECORD_FIELD = "record.z"
"""A delivery record's JSON compressed with zlib: the payload is most of a record, and CVAT's JSON
(repeated keys and URLs) shrinks to about a fifth, for the whole retention (``CVAT_HOOKS_RETENTION_DAYS``)."""
PACK_OVER = 512
"""Bytes of JSON above which a record is stored compressed (below, zlib saves too little to matter)."""


def _packed(text: str) -> tuple[str, str | bytes]:
    """The hash field and value that keep a record's JSON: compressed when that pays."""
    data = text.encode("utf-8")
    if len(data) <= PACK_OVER:
        return RECORD_FIELD, text
    return PACKED_RECORD_FIELD, zlib.compress(data, 6)


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


@dataclass
class Delivery:
    """One delivery as read back: the receipt, each action's state and the timeline."""

    record: dict[str, Any]
    actions: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.record["delivery_id"]

    def latest_actions(self) -> list[dict[str, Any]]:
        """The latest run of each action (a replay supersedes the run it repeats)."""
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        for action in self.actions.values():
            key = (action["rule_id"], int(action["index"]))
            if key not in latest or int(action.get("run", 0)) > int(latest[key].get("run", 0)):
                latest[key] = action
        return list(latest.values())

    @property
    def status(self) -> DeliveryStatus:
        outcome = self.record.get("outcome")
        if outcome == Outcome.PING:
            return DeliveryStatus.PING
        if not self.actions:
            return DeliveryStatus.NO_MATCH if outcome == Outcome.NO_MATCH else DeliveryStatus.PENDING
        statuses = {ActionStatus(a["status"]) for a in self.latest_actions()}
        if not statuses <= _DONE:
            return DeliveryStatus.PENDING
        return DeliveryStatus.FAILED if ActionStatus.FAILED in statuses else DeliveryStatus.SUCCEEDED

    @property
    def essentials(self) -> dict[str, Any]:
        """The event essentials its actions were queued with (``Event.essentials()``). The record
        keeps the resource object once, in the payload (records written before kept it twice)."""
        essentials = dict(self.record.get("essentials") or {})
        if "object" not in essentials:
            resource, payload = essentials.get("resource"), self.record.get("payload") or {}
            obj = payload.get(resource) if resource else None
            essentials["object"] = obj if isinstance(obj, dict) else None
        return essentials

    @property
    def rule_ids(self) -> list[str]:
        return [m["rule_id"] for m in self.record.get("matched", [])]

    def summary(self) -> dict[str, Any]:
        """The one-line view used by lists."""
        return {
            "delivery_id": self.id,
            "received_at": self.record.get("received_at"),
            "event": self.record.get("event"),
            "status": self.status.value,
            "rules": self.rule_ids,
            "actions": {a["job_id"]: a["status"] for a in self.actions.values()},
            "duplicates": int(self.record.get("duplicates", 0)),
        }

    def to_json(self, *, shown: Callable[[str, Mapping[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """The whole delivery as shown (CLI, admin API), each action's parameters as ``shown`` (the
        action registry's ``public_params``) gives them: the record keeps them whole, for a replay."""
        actions = [{**a, "params": shown(str(a.get("action")), a.get("params") or {})}
                   if isinstance(a.get("params"), dict) else a for a in self.actions.values()]
        return {**self.record, "status": self.status.value, "actions": actions, "timeline": self.timeline}


class DeliveryLog:
    """Reads and writes delivery records in Redis."""

    def __init__(self, redis: Redis, *, retention_seconds: int, redactor: Redactor | None = None) -> None:
        self.redis = redis
        self.retention = retention_seconds
        self.redact = redactor or Redactor()

    # -- receiver side -------------------------------------------------------------------------

    def add_received(self, pipe: Pipeline | Batch, record: dict[str, Any], actions: Iterable[dict[str, Any]],
                     at: float) -> None:
        """Queue the writes of a new delivery on ``pipe``: a MULTI pipeline, or the receiver's
        :class:`~core.receipts.Batch` applied in one (either way they land with its jobs)."""
        did = record["delivery_id"]
        key = record_key(did)
        at_iso = iso(at)
        record = {**record, "received_at": at_iso, "received_ts": at}
        # Any: redis-py's Mapping is invariant.
        fields: dict[Any, str | bytes] = dict([_packed(self.redact.dumps(record))])
        for action in actions:
            state = {**action, "status": ActionStatus.QUEUED.value, "attempts": 0, "queued_at": at_iso}
            fields[f"action:{action['job_id']}"] = self.redact.dumps(state)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.retention)
        step = {"t": at_iso, "step": "received", "message": self._receipt_message(record)}
        pipe.rpush(timeline_key(did), self.redact.dumps(step))
        pipe.expire(timeline_key(did), self.retention)
        pipe.zadd(INDEX_KEY, {did: at})
        pipe.zremrangebyscore(INDEX_KEY, "-inf", at - self.retention)

    def expire(self, pipe: Pipeline | Batch, delivery_id: str, seconds: int) -> None:
        """Shorten a record's life (deliveries that matched nothing are only kept for debugging)."""
        pipe.expire(record_key(delivery_id), seconds)
        pipe.expire(timeline_key(delivery_id), seconds)

    @staticmethod
    def _receipt_message(record: dict[str, Any]) -> str:
        matched = record.get("matched") or []
        if record.get("outcome") == Outcome.PING:
            return "ping received"
        if not matched:
            return f"{record.get('event')}: no rule matched"
        jobs = sum(len(m.get("jobs", [])) for m in matched)
        return f"{record.get('event')}: matched {len(matched)} rule(s), queued {jobs} job(s)"

    def add_duplicate(self, batch: Batch, delivery_id: str, at: float) -> None:
        """Note on ``batch`` that the same event arrived again (CVAT retry, redelivery, reconcile).

        The count is a field of its own, incremented in Redis, so copies arriving at once at
        several receivers all count (issue 6). Nothing is written for a record already expired.
        """
        key = record_key(delivery_id)
        at_iso = iso(at)
        step = {"t": at_iso, "step": "duplicate", "message": "same event received again; nothing queued"}
        with batch.if_exists(key):
            batch.hincrby(key, DUPLICATES_FIELD, 1)
            batch.hset(key, LAST_DUPLICATE_FIELD, at_iso)
            batch.rpush(timeline_key(delivery_id), json_text.dumps(step))

    # -- worker side ---------------------------------------------------------------------------

    def _update_action(self, delivery_id: str, job_id: str, changes: dict[str, Any],
                       step: dict[str, Any]) -> None:
        """Read an action's state, apply ``changes`` and add ``step``: two round trips (see :class:`Attempt`
        for the worker's hot path, which reads once per attempt)."""
        raw, started = self.redis.hmget(record_key(delivery_id), [f"action:{job_id}", STARTED_PREFIX + job_id])
        state = running(json.loads(raw) if raw else {"job_id": job_id}, started)
        state.update(changes)
        pipe = self.redis.pipeline(transaction=True)
        self._queue_action_write(pipe, delivery_id, job_id, state, step)
        pipe.execute()

    def _queue_action_write(self, pipe: Pipeline, delivery_id: str, job_id: str, state: dict[str, Any],
                            step: dict[str, Any]) -> int:
        """Queue on ``pipe`` the writes of one step of an action: its whole state (which ends any
        running attempt's own field) and a timeline entry, both kept for the retention from now.
        Returns how many commands were queued."""
        key = record_key(delivery_id)
        pipe.hset(key, f"action:{job_id}", self.redact.dumps(state))
        pipe.hdel(key, STARTED_PREFIX + job_id)
        return 2 + self._queue_step(pipe, delivery_id, job_id, step)

    def _queue_step(self, pipe: Pipeline, delivery_id: str, job_id: str, step: dict[str, Any], *,
                    keep: bool = True) -> int:
        """Queue a timeline entry of ``job_id`` and, with ``keep``, keep the record for the retention
        from now. Returns how many commands were queued."""
        step = {"t": iso(now()), "job_id": job_id, **step}
        pipe.rpush(timeline_key(delivery_id), self.redact.dumps(step))
        if not keep:
            return 1
        pipe.expire(record_key(delivery_id), self.retention)
        pipe.expire(timeline_key(delivery_id), self.retention)
        return 3

    def attempt(self, delivery_id: str, job_id: str, attempt: int) -> Attempt:
        """The recorder of one attempt of an action, as its worker runs it (see :class:`Attempt`)."""
        return Attempt(self, delivery_id, job_id, attempt)

    def action_queued(self, delivery_id: str, action: dict[str, Any], *, reason: str) -> None:
        """A new run of an action was queued outside the receiver (a replay)."""
        self._update_action(delivery_id, action["job_id"],
                            {**action, "status": ActionStatus.QUEUED.value, "attempts": 0,
                             "queued_at": iso(now()), "result": None, "error": None},
                            {"step": "queued", "message": reason})

    def action_note(self, delivery_id: str, job_id: str, message: str, **data: Any) -> None:
        """A step inside an attempt (``export started``, ``downloaded 12 MB``...)."""
        pipe = self.redis.pipeline(transaction=False)
        self._queue_step(pipe, delivery_id, job_id, {"step": "note", "message": message, **data}, keep=False)
        pipe.expire(timeline_key(delivery_id), self.retention)
        pipe.execute()

    def action_failed(self, delivery_id: str, job_id: str, *, attempt: int, started: float | None,
                      error_class: str, message: str, kind: str, next_retry_at: float | None,
                      result: dict[str, Any] | None = None) -> None:
        """A failed attempt: retried at ``next_retry_at``, or given up when that is ``None``."""
        self._update_action(delivery_id, job_id, *_failed(attempt, started, error_class, message, kind,
                                                          next_retry_at, result))

    # -- reading -------------------------------------------------------------------------------

    def get(self, delivery_id: str) -> Delivery | None:
        """One delivery with its actions and timeline, or ``None`` (unknown or expired)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(record_key(delivery_id))
        pipe.lrange(timeline_key(delivery_id), 0, -1)
        fields, steps = pipe.execute()
        return self._build(fields, steps)

    @staticmethod
    def _build(fields: dict[Any, Any], steps: list[Any] | None) -> Delivery | None:
        if not fields:
            return None
        decoded = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        raw = decoded.pop(RECORD_FIELD, None)
        packed = decoded.pop(PACKED_RECORD_FIELD, None)
        if packed is not None:
            raw = zlib.decompress(packed)
        if raw is None:
            return None
        actions = {}
        for key, value in decoded.items():
            if key.startswith("action:"):
                job_id = key.removeprefix("action:")
                actions[job_id] = running(json.loads(value), decoded.get(STARTED_PREFIX + job_id))
        record = json.loads(raw)
        if DUPLICATES_FIELD in decoded:
            record[DUPLICATES_FIELD] = int(decoded[DUPLICATES_FIELD])
            record[LAST_DUPLICATE_FIELD] = _text(decoded.get(LAST_DUPLICATE_FIELD))
        return Delivery(record, actions, [json.loads(s) for s in steps or []])

    def find(self, prefix: str) -> Delivery | None:
        """A delivery by its id or a unique prefix of it (as users copy them from lists)."""
        found = self.get(prefix)
        if found or len(prefix) < 6:
            return found
        candidates = [d for d in self._ids(since=None, until=None, limit=5000) if d.startswith(prefix)]
        return self.get(candidates[0]) if len(candidates) == 1 else None

    def _ids(self, *, since: float | None, until: float | None, limit: int) -> list[str]:
        raw = self.redis.zrevrangebyscore(INDEX_KEY, until if until is not None else "+inf",
                                          since if since is not None else "-inf", start=0, num=limit)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]

    def list(self, *, limit: int = 50, event: str | None = None, rule: str | None = None,
             status: str | None = None, since: float | None = None, until: float | None = None,
             scan: int = 2000) -> list[Delivery]:
        """Recent deliveries, newest first, filtered; looks at most ``scan`` recent ids."""
        from fnmatch import fnmatchcase

        ids = self._ids(since=since, until=until, limit=scan)
        found: list[Delivery] = []
        for start in range(0, len(ids), 200):
            chunk = ids[start:start + 200]
            pipe = self.redis.pipeline(transaction=False)
            for did in chunk:
                pipe.hgetall(record_key(did))
            for fields in pipe.execute():
                delivery = self._build(fields, None)
                if delivery is None:
                    continue
                if event and not fnmatchcase(delivery.record.get("event", ""), event):
                    continue
                if rule and rule not in delivery.rule_ids:
                    continue
                if status and delivery.status.value != status:
                    continue
                found.append(delivery)
                if len(found) >= limit:
                    return found
        return found


def running(state: dict[str, Any], started: bytes | str | None) -> dict[str, Any]:
    """An action's state, with the attempt that is running, if one is (its ``started:`` field)."""
    return {**state, **json.loads(started)} if started else state


def _started(attempt: int, start: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state changes, timeline step) of an attempt that starts."""
    return ({"status": ActionStatus.STARTED.value, "attempts": attempt, "started_at": iso(start)},
            {"step": "started", "message": f"attempt {attempt} started", "attempt": attempt})


def _succeeded(attempt: int, started: float, result: dict[str, Any],
               skipped: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state changes, timeline step) of an attempt that succeeded or skipped."""
    duration = round(now() - started, 3)
    status = ActionStatus.SKIPPED if skipped else ActionStatus.SUCCEEDED
    return ({"status": status.value, "attempts": attempt, "result": result, "error": None,
             "finished_at": iso(now()), "duration": duration},
            {"step": status.value, "attempt": attempt, "duration": duration,
             "message": f"attempt {attempt} {status.value} in {duration:.3f}s", "result": result})


def _failed(attempt: int, started: float | None, error_class: str, message: str, kind: str,
            next_retry_at: float | None, result: dict[str, Any] | None,
            traceback: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state changes, timeline step) of a failed attempt, retried or given up; the step keeps the
    traceback, if any (the worker's log has one line per failure)."""
    duration = round(now() - started, 3) if started else None
    gave_up = next_retry_at is None
    status = ActionStatus.FAILED if gave_up else ActionStatus.RETRYING
    error = {"class": error_class, "message": message, "kind": kind, "attempt": attempt}
    changes: dict[str, Any] = {"status": status.value, "attempts": attempt, "error": error, "duration": duration,
                               "next_retry_at": iso(next_retry_at)}
    if result is not None:
        changes["result"] = result
    if gave_up:
        changes["finished_at"] = iso(now())
    tail = "gave up" if gave_up else f"retry at {iso(next_retry_at)}"
    step = {"step": "failed" if gave_up else "retrying", "attempt": attempt, "error": error,
            "next_retry_at": iso(next_retry_at),
            "message": f"attempt {attempt} failed ({kind}): {error_class}: {message}; {tail}"}
    if traceback:
        step["traceback"] = traceback
    return changes, step


Writes = Callable[["Pipeline"], int]
"""Queues writes on a pipeline sent by the caller; returns how many of them are the delivery log's."""
Extra = Callable[["Pipeline"], object]
"""More writes for the same transaction (the metrics)."""


class Attempt:
    """One attempt of one action, recorded by the job running it, in two round trips.

    The start is written blind (its own ``started:`` field and a timeline step) with a read of the
    action's state in the same round trip; the end is written from that copy, in one transaction
    that also carries whatever the caller adds (``also``: the metrics). That is safe because while
    an attempt runs its worker is the only writer of that action's state (a replay is a job of its
    own; the receiver only touches the record's other fields). Before, each step read the state
    again and metrics took a round trip of their own (bench/: 6 -> 2).
    """

    def __init__(self, deliveries: DeliveryLog, delivery_id: str, job_id: str, number: int) -> None:
        self.deliveries = deliveries
        self.delivery_id = delivery_id
        self.job_id = job_id
        self.number = number
        self.started = now()
        self._state: dict[str, Any] = {"job_id": job_id}

    def start(self) -> float:
        """Record the start, in one round trip that also reads the action's state (no transaction:
        only this attempt writes its own field); returns the start time."""
        self.started = now()
        key = record_key(self.delivery_id)
        changes, step = _started(self.number, self.started)
        with self.deliveries.redis.pipeline(transaction=False) as pipe:
            pipe.hget(key, f"action:{self.job_id}")
            pipe.hset(key, STARTED_PREFIX + self.job_id, json_text.dumps(changes))
            # The end of the attempt keeps the record for the retention from then: not needed here.
            self.deliveries._queue_step(pipe, self.delivery_id, self.job_id, step, keep=False)
            raw = pipe.execute()[0]
        self._state = {**(json.loads(raw) if raw else self._state), **changes}
        return self.started

    def note(self, message: str, **data: Any) -> None:
        """A step inside the attempt (the timeline only)."""
        self.deliveries.action_note(self.delivery_id, self.job_id, message, **data)

    def succeeded(self, result: dict[str, Any], *, skipped: bool = False, also: Extra | None = None) -> None:
        """Record success (or a skip), with ``also``'s writes in the same transaction."""
        self._commit(self._writes(*_succeeded(self.number, self.started, result, skipped), also=also))

    def failed(self, *, error_class: str, message: str, kind: str, next_retry_at: float | None,
               result: dict[str, Any] | None = None, traceback: str | None = None,
               also: Extra | None = None) -> None:
        """Record a failure (retried at ``next_retry_at``, or given up), with ``also``'s writes, before
        the error goes on to RQ."""
        self._commit(self._writes(*_failed(self.number, self.started, error_class, message, kind, next_retry_at,
                                           result, traceback), also=also))

    def _writes(self, changes: dict[str, Any], step: dict[str, Any], also: Extra | None = None) -> Writes:
        """The writes of one step, then ``also``'s (an error queuing those is logged, never raised:
        metrics must not fail an attempt)."""
        self._state.update(changes)
        state = dict(self._state)

        def queue(pipe: Pipeline) -> int:
            ours = self.deliveries._queue_action_write(pipe, self.delivery_id, self.job_id, state, step)
            if also is not None:
                try:
                    also(pipe)
                except Exception as exc:
                    log.warning("delivery %s: could not add to the write of %s: %s", self.delivery_id,
                                self.job_id, exc)
            return ours

        return queue

    def _commit(self, writes: Writes) -> None:
        """Send ``writes`` in one transaction; only the delivery log's own commands may raise."""
        with self.deliveries.redis.pipeline(transaction=True) as pipe:
            ours = writes(pipe)
            results = pipe.execute(raise_on_error=False)
        for result in results[:ours]:
            if isinstance(result, Exception):
                raise result
        for result in results[ours:]:
            if isinstance(result, Exception):
                log.warning("delivery %s: a write beside %s's step failed: %s", self.delivery_id, self.job_id,
                            result)
