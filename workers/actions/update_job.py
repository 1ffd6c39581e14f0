"""``update_job``: set a job's stage, state and/or assignee, round-robin over a list of reviewers.

Parameters (at least one of stage, state, assignee)::

    stage: annotation | validation | acceptance
    state: new | in progress | rejected | completed
    assignee: alice            # a username; a list of usernames for round-robin; null to unassign
    job: "{job_id}"            # default: the event's job

Round-robin: each run takes the next name of the list from a Redis counter (``INCR`` on
``cvat-hooks:rr:<rule>:<hash of the list>``), so every rule and list keeps its own turn and editing
the list starts a new one. The choice is remembered per (delivery, rule, action index, run): a retry
of the same job assigns the same reviewer instead of advancing the turn again.

The job is read first; when it already has every requested value nothing is sent and the result
says ``unchanged``. Otherwise every requested field is sent together, not only the differing ones:
CVAT resets a job's state to ``new`` when its stage changes without a state, so sending the stage
alone could undo a state the rule also asked for.

Result: ``{"job_id", "stage"?, "state"?, "assignee"?, "assignee_id"?, "changed": [...]}``, plus
``"unchanged": true`` when no PATCH was needed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from core.errors import PermanentError
from core.keys import ROUND_ROBIN_KEY
from workers.actions import JOB_STAGES, JOB_STATES
from workers.actions._params import (
    as_id,
    call_key,
    event_id,
    has_placeholder,
    text,
    unknown_params,
)
from workers.context import ActionContext
from workers.gateway import Resource

PARAMS = ("stage", "state", "assignee", "job")
CHOICE_TTL = 30 * 86400
"""Seconds a round-robin choice is remembered for retries of its call (as long as delivery records)."""


def validate(params: Mapping[str, Any]) -> list[str]:
    """Stage and state among CVAT's values, assignee a name / list of names / null, job an id."""
    problems = unknown_params(params, PARAMS)
    if not any(name in params for name in ("stage", "state", "assignee")):
        problems.append("set at least one of stage, state, assignee")
    if "stage" in params and params["stage"] not in JOB_STAGES:
        problems.append(f"stage: {params['stage']!r} is not one of {', '.join(JOB_STAGES)}")
    if "state" in params and params["state"] not in JOB_STATES:
        problems.append(f"state: {params['state']!r} is not one of {', '.join(JOB_STATES)}")
    if "assignee" in params:
        assignee = params["assignee"]
        if isinstance(assignee, list):
            if not assignee or not all(isinstance(a, str) and a.strip() for a in assignee):
                problems.append("assignee: a round-robin list must hold at least one username")
            elif len(set(assignee)) != len(assignee):
                problems.append("assignee: the round-robin list names someone twice")
        elif assignee is not None and (not isinstance(assignee, str) or not assignee.strip()):
            problems.append("assignee must be a username, a list of usernames, or null to unassign")
    if "job" in params:
        job = params["job"]
        ok = (isinstance(job, int) and not isinstance(job, bool) and job > 0) or (
            isinstance(job, str) and (job.strip().isdigit() or has_placeholder(job)))
        if not ok:
            problems.append(f"job must be a job id or a placeholder such as '{{job_id}}', not {job!r}")
    return problems


def round_robin_key(rule_id: str, names: list[str]) -> str:
    """The Redis counter of one rule's list (a new list, a new turn)."""
    digest = hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
    return ROUND_ROBIN_KEY.format(rule_id=rule_id, digest=digest)


def pick_assignee(ctx: ActionContext, names: list[str]) -> str:
    """The next name of the list, the same one for every retry of this call."""
    memo = call_key("rr-choice", ctx.call)
    chosen = text(ctx.redis.get(memo))
    if chosen is not None:
        return chosen
    turn = int(ctx.redis.incr(round_robin_key(ctx.call.rule_id, names)))
    candidate = names[(turn - 1) % len(names)]
    # NX: should two runs of one call race, both end up with the first one's choice.
    if not ctx.redis.set(memo, candidate, nx=True, ex=CHOICE_TTL):
        candidate = text(ctx.redis.get(memo)) or candidate
    return candidate


def _current_assignee_id(job: Mapping[str, Any]) -> int | None:
    assignee = job.get("assignee")
    if isinstance(assignee, Mapping):
        return assignee.get("id")
    return assignee if isinstance(assignee, int) else None


def run(ctx: ActionContext) -> dict[str, Any]:
    """Apply the requested stage/state/assignee to the job; see the module docstring."""
    params = ctx.params
    problems = validate(params)
    if problems:
        raise PermanentError("; ".join(problems))
    if "job" in params:
        job_id = as_id(params["job"], "job")
    else:
        found = event_id(ctx.event, "job_id")
        if found is None:
            raise PermanentError(f"event {ctx.event.get('event')!r} names no job: set the action's job")
        job_id = found

    result: dict[str, Any] = {"job_id": job_id}
    wanted: dict[str, Any] = {name: params[name] for name in ("stage", "state") if name in params}
    result.update(wanted)
    if "assignee" in params:
        assignee = params["assignee"]
        if isinstance(assignee, list):
            assignee = pick_assignee(ctx, assignee)
            ctx.note(f"round-robin picked {assignee}", assignee=assignee)
        wanted["assignee"] = None if assignee is None else ctx.gateway.find_user_id(assignee)
        result.update(assignee=assignee, assignee_id=wanted["assignee"])

    job = ctx.gateway.get_resource(Resource.JOB, job_id)
    current = {"stage": job.get("stage"), "state": job.get("state"), "assignee": _current_assignee_id(job)}
    changed = sorted(name for name, value in wanted.items() if current[name] != value)
    result["changed"] = changed
    if not changed:
        ctx.note(f"job {job_id} already has the requested values")
        return {**result, "unchanged": True}
    ctx.gateway.update_job(job_id, wanted)
    ctx.note(f"job {job_id} updated", changed=changed)
    return result
