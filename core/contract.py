"""The job contract: what the receiver puts in one RQ job, and what a worker may rely on.

One matched action becomes one RQ job calling :data:`JOB_FUNCTION` with a single JSON-only
argument (:meth:`ActionCall.to_json`), so jobs survive a code upgrade between enqueue and run and
can be read by anything that speaks JSON. The job id is derived from the delivery, the rule and the
action's position, so enqueuing the same delivery twice cannot create two jobs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from core.retry import RetryPolicy

JOB_FUNCTION = "workers.jobs.run_action"
"""Dotted path of the single RQ entry point every action job calls."""

FAILURE_CALLBACK = "workers.jobs.on_job_failure"
"""Dotted path RQ calls when a job fails outside our code (a killed work-horse, an abandoned job)."""

QUEUE_PREFIX = "cvat-hooks"
LIGHT_QUEUE = f"{QUEUE_PREFIX}-actions"
"""Queue for short actions (label checks, notifications, job updates)."""
EXPORT_QUEUE = f"{QUEUE_PREFIX}-exports"
"""Queue for exports, kept apart so a long export cannot starve label checks."""
ANNOTATE_QUEUE = f"{QUEUE_PREFIX}-annotate"
"""Queue for auto-annotation: a model over every frame of a task takes minutes and a lot of memory."""
QUEUES: tuple[str, ...] = (LIGHT_QUEUE, EXPORT_QUEUE, ANNOTATE_QUEUE)
"""Every queue, in the order a worker serves them (light first)."""
OWN_PROCESS_QUEUES: tuple[str, ...] = (EXPORT_QUEUE, ANNOTATE_QUEUE)
"""Queues whose actions run long: each gets a worker process of its own, so they never hold up
light actions or each other."""

JOB_TIMEOUT = 3600
"""Seconds one run of an export may take before RQ kills it (a big export can take long)."""
JOB_TIMEOUTS: dict[str, int] = {LIGHT_QUEUE: 300, ANNOTATE_QUEUE: 4 * 3600}
"""Shorter limits per queue: a light action is a few HTTP calls, and one that hangs holds up the
light actions behind it."""


def job_timeout(queue: str) -> int:
    """Seconds a run of an action on ``queue`` may take."""
    return JOB_TIMEOUTS.get(queue, JOB_TIMEOUT)

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class ActionCall:
    """One action of one matched rule, for one delivery: the argument of every action job."""

    delivery_id: str
    rule_id: str
    index: int
    """Position of the action in the rule's ``do`` list."""
    action: str
    params: dict[str, Any]
    """Parameters with every ``{placeholder}`` already rendered by the receiver."""
    event: dict[str, Any]
    """The event essentials (:meth:`core.events.Event.essentials`): name, ids, dates, resource."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    run: int = 0
    """0 for the run the delivery caused, n for the n-th replay (which gets a job id of its own)."""
    queue: str = LIGHT_QUEUE

    @property
    def job_id(self) -> str:
        """Deterministic: delivery, rule, action position and replay number identify the job."""
        rule = _SAFE.sub("_", self.rule_id)
        suffix = f"-r{self.run}" if self.run else ""
        return f"cvh-{self.delivery_id[:32]}-{rule}-{self.index}{suffix}"

    def summary(self) -> dict[str, Any]:
        """What the delivery log keeps of this call (everything a replay needs, but the event)."""
        return {"job_id": self.job_id, "rule_id": self.rule_id, "index": self.index, "action": self.action,
                "queue": self.queue, "params": self.params, "retry": self.retry.to_json(), "run": self.run}

    def to_json(self) -> dict[str, Any]:
        """The JSON-only job argument."""
        return {
            "v": 1,
            "delivery_id": self.delivery_id,
            "rule_id": self.rule_id,
            "index": self.index,
            "action": self.action,
            "params": self.params,
            "event": self.event,
            "retry": self.retry.to_json(),
            "run": self.run,
            "queue": self.queue,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ActionCall:
        """Rebuild a call from a job argument."""
        return cls(
            delivery_id=data["delivery_id"],
            rule_id=data["rule_id"],
            index=int(data["index"]),
            action=data["action"],
            params=dict(data.get("params") or {}),
            event=dict(data.get("event") or {}),
            retry=RetryPolicy.from_json(data.get("retry")),
            run=int(data.get("run", 0)),
            queue=data.get("queue", LIGHT_QUEUE),
        )
