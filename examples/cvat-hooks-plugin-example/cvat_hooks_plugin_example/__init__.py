"""An example cvat-hooks plugin: ``jobs_overview`` counts a task's jobs by stage and state.

Installed (``pip install examples/cvat-hooks-plugin-example``), a rule names it by its entry point,
``action: jobs_overview``; merely importable (on ``PYTHONPATH``), as
``action: cvat_hooks_plugin_example:jobs_overview``. Either way the receiver checks its parameters
when ``rules.yaml`` loads, from the declaration below.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from workers.actions.plugins import Param, PermanentError, TransientError, action
from workers.context import ActionContext


@action(
    summary="count a task's jobs by stage and state (retried until the task has min_jobs jobs)",
    params={
        "task": Param(int, help="the task id (default: the event's task)"),
        "min_jobs": Param(int, default=1, help="fewer jobs than this is retried: CVAT may still be making them"),
    },
    causes=(),  # it only reads CVAT: nothing it does comes back as a webhook
)
def jobs_overview(ctx: ActionContext) -> dict[str, Any]:
    """The task's jobs, counted; a task without its jobs yet is a transient failure, so the rule's
    retry policy tries again (``create:task`` arrives before CVAT has made the jobs)."""
    task_id = ctx.params.get("task") or ctx.event.get("task_id")
    if not isinstance(task_id, int):
        raise PermanentError(f"event {ctx.event.get('event')!r} names no task: set the action's task")
    jobs = ctx.gateway.list_jobs(task_id)
    if len(jobs) < ctx.params["min_jobs"]:
        raise TransientError(f"task {task_id} has {len(jobs)} job(s), fewer than {ctx.params['min_jobs']}")
    ctx.note(f"task {task_id} has {len(jobs)} job(s)")
    return {"task_id": task_id, "jobs": len(jobs),
            "by_stage": dict(Counter(str(j.get("stage")) for j in jobs)),
            "by_state": dict(Counter(str(j.get("state")) for j in jobs)),
            "idempotency_key": ctx.call.job_id}
