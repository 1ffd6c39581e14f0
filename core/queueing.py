"""Putting action calls on RQ queues: one place for the serializer, retry, timeouts and callbacks.

Jobs are serialized as JSON (:class:`JobSerializer`, the JSON of RQ's ``JSONSerializer``), so a
queued job is readable by anything and survives an upgrade of our code; the receiver, the replay
command and the workers all go through :func:`queue` so they agree on it.
"""

from __future__ import annotations

import json
import random
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rq import Callback, Queue, Retry

from core import json_text
from core.contract import FAILURE_CALLBACK, JOB_FUNCTION, ActionCall, job_timeout

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline


class JobSerializer:
    """RQ's ``JSONSerializer``, written by orjson (``core.json_text``): the same JSON, read by
    ``json.loads`` as before, so jobs queued by either are read by both."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return json_text.dumps(obj)

    @staticmethod
    def loads(data: bytes | str) -> Any:
        return json.loads(data)


SERIALIZER = JobSerializer
RESULT_TTL = 500
"""Seconds RQ keeps a finished job and its result: RQ's own default. The delivery log keeps the
outcome for the retention, and nothing of ours reads RQ's copy. Kept for 7 days, RQ's copy was
most of Redis' memory per delivery: about 6.7 KB per action (a 1.9 KB job hash and a 4.8 KB
result stream), where the delivery's record and timeline take about 2-6 KB."""


_QUEUES: weakref.WeakKeyDictionary[Redis, dict[str, Queue]] = weakref.WeakKeyDictionary()


def queue(name: str, connection: Redis) -> Queue:
    """The RQ queue called ``name``, with our serializer: one object per connection, because RQ's
    constructor checks the serializer against a runtime Protocol, slow enough to show per delivery."""
    by_name = _QUEUES.setdefault(connection, {})
    if name not in by_name:
        by_name[name] = Queue(name, connection=connection, serializer=SERIALIZER, default_timeout=job_timeout(name))
    return by_name[name]


def retry_of(call: ActionCall, rng: random.Random | None = None) -> Retry | None:
    """RQ's retry for a call's policy, jitter drawn now (RQ has no jitter of its own)."""
    if call.retry.attempts == 0:
        return None
    return Retry(max=call.retry.attempts, interval=call.retry.delays(rng))


def enqueue(calls: Iterable[ActionCall], connection: Redis, pipeline: Pipeline,
            *, failure_ttl: int, result_ttl: int = RESULT_TTL) -> list[str]:
    """Queue one job per call on ``pipeline`` (a MULTI pipeline executed by the caller, with its other
    writes: the receiver's delivery record lands with its jobs)."""
    by_queue: dict[str, list[ActionCall]] = {}
    for call in calls:
        by_queue.setdefault(call.queue, []).append(call)
    job_ids: list[str] = []
    for name, group in by_queue.items():
        q = queue(name, connection)
        datas = [
            Queue.prepare_data(
                JOB_FUNCTION,
                args=(call.to_json(),),
                job_id=call.job_id,
                retry=retry_of(call),
                on_failure=Callback(FAILURE_CALLBACK),
                timeout=job_timeout(name),
                result_ttl=result_ttl,
                failure_ttl=failure_ttl,
                description=f"{call.action} for rule {call.rule_id}, delivery {call.delivery_id[:12]}",
            )
            for call in group
        ]
        q.enqueue_many(datas, pipeline=pipeline)
        job_ids += [call.job_id for call in group]
    return job_ids
