"""Re-run the actions of a recorded delivery, as new runs with job ids of their own.

A replay repeats what the delivery queued then (the parameters it was rendered with). Re-judging it
with the rules in force now (``--rematch``) needs the receiver's matching, so it lives in
:mod:`receiver.rematch` and only uses :func:`queue_runs` from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from core.contract import ActionCall
from core.delivery_log import ActionStatus, Delivery, DeliveryLog, Outcome
from core.queueing import enqueue
from core.retry import RetryPolicy

IN_FLIGHT = frozenset({ActionStatus.QUEUED, ActionStatus.STARTED, ActionStatus.RETRYING})
"""Action states a replay never doubles."""


class Remedy(StrEnum):
    """What would make a refused replay run something. Each front end words it in its own terms (the
    CLI's ``--force``, the UI's checkbox, the API's ``"force": true``)."""

    FORCE = "force"
    """Run the actions that already succeeded again."""
    REMATCH = "rematch"
    """Judge the delivery again with the rules in force now."""


@dataclass(frozen=True)
class Refusal:
    """Why a replay would run nothing, and what would make it run something (if anything would)."""

    reason: str
    remedy: Remedy | None = None


class NothingToReplay(Exception):
    """Nothing a replay could run; :attr:`refusal` says why and what would."""

    def __init__(self, delivery_id: str, refusal: Refusal) -> None:
        super().__init__(f"delivery {delivery_id}: {refusal.reason}")
        self.delivery_id = delivery_id
        self.refusal = refusal


def why_not(delivery: Delivery, *, force: bool = False) -> Refusal | None:
    """Why a plain replay of ``delivery`` would run nothing (``None``: it would run something).

    The UI offers its Replay button, and the CLI tries, only when this is ``None``.
    """
    if delivery.record.get("outcome") == Outcome.PING:
        return Refusal("it is a ping: no rule judges a ping and it has no action to run")
    latest = delivery.latest_actions()
    if not latest:
        return Refusal("it matched no rule, so there is no action to run again", Remedy.REMATCH)
    statuses = {ActionStatus(a["status"]) for a in latest}
    if statuses <= IN_FLIGHT:
        return Refusal("no failed action to replay: its actions are still queued or running")
    if not force and ActionStatus.FAILED not in statuses:
        return Refusal("no failed action to replay: its actions succeeded", Remedy.FORCE)
    return None


def replay(log: DeliveryLog, delivery: Delivery, *, force: bool = False) -> list[str]:
    """Queue a new run of each failed action (each finished one with ``force``); returns job ids.

    Actions still queued or running are never doubled. Without ``force``, a delivery whose actions
    all succeeded has nothing to replay: that is how a replay of a finished delivery stays one effect.
    """
    refusal = why_not(delivery, force=force)
    if refusal is not None:
        raise NothingToReplay(delivery.id, refusal)
    chosen = [a for a in delivery.latest_actions()
              if ActionStatus(a["status"]) not in IN_FLIGHT and (force or a["status"] == ActionStatus.FAILED)]
    essentials = delivery.essentials
    calls = [
        ActionCall(delivery_id=delivery.id, rule_id=a["rule_id"], index=int(a["index"]), action=a["action"],
                   params=a.get("params") or {}, event=essentials, retry=RetryPolicy.from_json(a.get("retry")),
                   run=int(a.get("run", 0)) + 1, queue=a["queue"])
        for a in chosen
    ]
    return queue_runs(log, calls, lambda call: f"replay run {call.run} of {call.action} (rule {call.rule_id})")


def next_run(delivery: Delivery, rule_id: str, index: int) -> int:
    """The run number a new run of action ``index`` of ``rule_id`` takes: one past every run
    recorded for it (0 when it never ran: its job id is then still unused)."""
    runs = [int(a.get("run", 0)) for a in delivery.actions.values()
            if a.get("rule_id") == rule_id and int(a.get("index", -1)) == index]
    return max(runs) + 1 if runs else 0


def queue_runs(log: DeliveryLog, calls: Iterable[ActionCall], reason: Any) -> list[str]:
    """Record each call as a queued run (``reason(call)`` is its timeline line), then enqueue them
    all in one transaction; returns the job ids."""
    calls = list(calls)
    # Recorded before enqueuing, so a fast worker's "started" cannot be overwritten by "queued".
    for call in calls:
        log.action_queued(call.delivery_id, call.summary(), reason=reason(call))
    with log.redis.pipeline(transaction=True) as pipe:
        job_ids = enqueue(calls, log.redis, pipe, failure_ttl=log.retention)
        pipe.execute()
    return job_ids
