"""Re-run the actions of a recorded delivery, as new runs with job ids of their own."""

from __future__ import annotations

from workers.contract import ActionCall
from workers.delivery_log import ActionStatus, Delivery, DeliveryLog
from workers.queueing import enqueue
from workers.retry import RetryPolicy

_IN_FLIGHT = {ActionStatus.QUEUED, ActionStatus.STARTED, ActionStatus.RETRYING}


class NothingToReplay(Exception):
    """Every action is done (or still running) and ``force`` was not given."""


def replay(log: DeliveryLog, delivery: Delivery, *, force: bool = False) -> list[str]:
    """Queue a new run of each failed action (each finished one with ``force``); returns job ids.

    Actions still queued or running are never doubled. Without ``force``, a delivery whose actions
    all succeeded has nothing to replay: that is how a replay of a finished delivery stays one effect.
    """
    chosen = []
    for action in delivery.latest_actions():
        status = ActionStatus(action["status"])
        if status in _IN_FLIGHT:
            continue
        if status is ActionStatus.FAILED or force:
            chosen.append(action)
    if not chosen:
        raise NothingToReplay(f"delivery {delivery.id}: no failed action to replay"
                              + ("" if force else " (use --force to run succeeded ones again)"))
    essentials = delivery.essentials
    calls = [
        ActionCall(delivery_id=delivery.id, rule_id=a["rule_id"], index=int(a["index"]), action=a["action"],
                   params=a.get("params") or {}, event=essentials, retry=RetryPolicy.from_json(a.get("retry")),
                   run=int(a.get("run", 0)) + 1, queue=a["queue"])
        for a in chosen
    ]
    # Recorded before enqueuing, so a fast worker's "started" cannot be overwritten by "queued".
    for call in calls:
        log.action_queued(call.delivery_id, call.summary(),
                          reason=f"replay run {call.run} of {call.action} (rule {call.rule_id})")
    with log.redis.pipeline(transaction=True) as pipe:
        job_ids = enqueue(calls, log.redis, pipe, failure_ttl=log.retention)
        pipe.execute()
    return job_ids
