"""The single RQ entry point: run one action of one delivery, and record every attempt.

Each attempt is written to the delivery log *before* an error is re-raised, so what a user reads
is never behind what happened. Whether RQ retries is decided here, from ``workers.errors.classify``:
a permanent error sets the job's remaining retries to zero before RQ sees the exception.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import TYPE_CHECKING, Any

from redis import Redis
from rq import get_current_job
from rq.job import Job

from workers import metrics
from workers.actions import runner
from workers.context import ActionContext
from workers.contract import JOB_FUNCTION, ActionCall
from workers.delivery_log import Attempt, DeliveryLog
from workers.errors import ErrorKind, PermanentError, UnknownAction, classify
from workers.gateway import CvatGateway
from workers.inprocess import begun, defer
from workers.redaction import Redactor
from workers.redis_conn import connect
from workers.settings import WorkerSettings

if TYPE_CHECKING:
    from redis.client import Pipeline

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What every job of a worker process shares (built on first use, never at import time)."""

    settings: WorkerSettings
    redis: Redis
    deliveries: DeliveryLog
    redactor: Redactor

    def gateway(self) -> CvatGateway:
        """A CVAT client for one job (made lazily: most light actions never need one)."""
        from workers.cvat_client import make_gateway

        if not self.settings.cvat.configured:
            raise PermanentError("CVAT is not configured: set CVAT_URL and CVAT_ACCESS_TOKEN "
                                 "(or CVAT_USERNAME and CVAT_PASSWORD) for the worker")
        return make_gateway(self.settings.cvat)


@cache
def runtime() -> Runtime:
    """The process's runtime, from the environment."""
    settings = WorkerSettings.from_env()
    redis = connect(settings.redis_url)
    redactor = Redactor(settings.secrets())
    return Runtime(settings, redis, DeliveryLog(redis, retention_seconds=settings.retention_seconds,
                                                redactor=redactor), redactor)


def attempt_of(job: Job | None, call: ActionCall) -> int:
    """1 for the first run, n for the n-th (RQ counts retries down in ``retries_left``)."""
    if job is None or job.retries_left is None:
        return 1
    return call.retry.attempts - job.retries_left + 1


def run_action(data: dict[str, Any]) -> dict[str, Any]:
    """Run one action (the RQ job function named in ``workers.contract.JOB_FUNCTION``).

    Two Redis round trips of its own (bench/dispatch.py): the start written with a read of the
    action's state, then the end and the metrics, each in one transaction
    (``workers.delivery_log.Attempt``). The in-process worker sends both with its own transactions
    (:func:`begin_attempt`, ``workers.inprocess.defer``).
    """
    call = ActionCall.from_json(data)
    rt = runtime()
    job = get_current_job()
    attempt = begun()
    if not isinstance(attempt, Attempt) or attempt.job_id != call.job_id:  # not started by the worker
        attempt = rt.deliveries.attempt(call.delivery_id, call.job_id, attempt_of(job, call))
        attempt.start()
    ctx = ActionContext(call=call, settings=rt.settings, redis=rt.redis, gateway_factory=rt.gateway,
                        note=attempt.note)
    try:
        skipped = unmet_job_requirement(ctx)
        if skipped is not None:
            result, is_skip = skipped, True
        else:
            try:
                run = runner(call.action)
            except KeyError:
                raise UnknownAction(f"no such action {call.action!r} in this worker") from None
            result = run(ctx)
            is_skip = bool(result.get("skipped")) if isinstance(result, dict) else False
    except Exception as exc:
        record_failure(rt, call, job, attempt, exc)
        raise
    finally:
        close = getattr(ctx._gateway, "close", None)
        if close is not None:
            close()
    outcome = "skipped" if is_skip else "succeeded"
    attempt.succeeded(result, skipped=is_skip, also=partial(count_attempt, call.action, outcome, attempt),
                      defer=defer)
    log.info("delivery %s: %s of rule %s %s (attempt %d)", call.delivery_id, call.action, call.rule_id,
             outcome, attempt.number)
    return result


def begin_attempt(job: Job, pipe: Pipeline) -> Callable[[list[Any]], Attempt] | None:
    """The in-process worker's start hook (``workers.inprocess.StartHook``): the start of an action
    job's attempt queued on the worker's start transaction, so it costs no round trip of its own.
    None for any other job (the periodic reconcile)."""
    if job.func_name != JOB_FUNCTION:
        return None
    call = ActionCall.from_json(job.args[0])
    return runtime().deliveries.attempt(call.delivery_id, call.job_id, attempt_of(job, call)).queue_start(pipe)


def unmet_job_requirement(ctx: ActionContext) -> dict[str, Any] | None:
    """``require_all_jobs``: a skip result when some job of the task is not there yet, else None."""
    wanted = ctx.params.get("require_all_jobs")
    if not wanted:
        return None
    task_id = ctx.event.get("task_id")
    if task_id is None:
        raise PermanentError("require_all_jobs needs an event that names a task")
    jobs = ctx.gateway.list_jobs(int(task_id))
    waiting = [j.get("id") for j in jobs if any(j.get(k) != v for k, v in wanted.items())]
    if not jobs or waiting:
        return {"skipped": "not every job of the task is " + ", ".join(f"{k} {v}" for k, v in wanted.items()),
                "task_id": task_id, "waiting_jobs": waiting, "jobs": len(jobs)}
    ctx.note(f"all {len(jobs)} job(s) of task {task_id} are " + ", ".join(map(str, wanted.values())))
    return None


def record_failure(rt: Runtime, call: ActionCall, job: Job | None, attempt: Attempt,
                   exc: BaseException) -> None:
    """Write the failed attempt, and stop RQ from retrying what cannot succeed."""
    kind = classify(exc)
    will_retry = kind is ErrorKind.TRANSIENT and job is not None and bool(job.retries_left)
    next_at = time.time() + job.get_retry_interval() if will_retry and job is not None else None
    if job is not None and not will_retry:
        job.retries_left = 0
    message = rt.redactor.text(str(exc) or type(exc).__name__)
    outcome = "retrying" if will_retry else "failed"
    attempt.failed(error_class=type(exc).__name__, message=message, kind=kind.value, next_retry_at=next_at,
                   result=getattr(exc, "result", None), also=partial(count_attempt, call.action, outcome, attempt))
    log.warning("delivery %s: %s of rule %s failed (attempt %d, %s): %s%s", call.delivery_id, call.action,
                call.rule_id, attempt.number, kind.value, message, "; will retry" if will_retry else "; gave up")


def count_attempt(action: str, outcome: str, attempt: Attempt, pipe: Pipeline) -> None:
    """Queue the metrics of one attempt on ``pipe`` (the transaction that records its end; a metrics
    error there is logged, never raised: see ``Attempt``)."""
    metrics.inc(pipe, "cvat_hooks_action_runs_total", action=action, outcome=outcome)
    if outcome == "retrying":
        metrics.inc(pipe, "cvat_hooks_action_retries_total", action=action)
    metrics.observe(pipe, "cvat_hooks_action_duration_seconds", time.time() - attempt.started, action=action)


def on_job_failure(job: Job, connection: Redis, exc_type: type, exc: BaseException, tb: Any) -> None:
    """RQ's failure callback: records failures that happened outside ``run_action`` (abandoned jobs
    whose worker died, timeouts). Failures inside it were already recorded there."""
    if exc_type.__name__ not in ("AbandonedJobError",):
        return
    try:
        call = ActionCall.from_json(job.args[0])
        rt = runtime()
        will_retry = bool(job.retries_left)
        rt.deliveries.action_failed(
            call.delivery_id, call.job_id, attempt=attempt_of(job, call), started=None,
            error_class=exc_type.__name__, message="the worker running this action stopped before it finished",
            kind=ErrorKind.TRANSIENT.value,
            next_retry_at=time.time() + job.get_retry_interval() if will_retry else None)
    except Exception:  # a callback must never break RQ's bookkeeping
        log.exception("job %s: could not record its abandonment", job.id)


def on_work_horse_killed(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """A forked work-horse died (killed, out of memory) mid-action: say so in the delivery log.
    RQ then retries the job if it has retries left, or moves it to the failed registry."""
    try:
        call = ActionCall.from_json(job.args[0])
        rt = runtime()
        will_retry = bool(job.retries_left)
        rt.deliveries.action_failed(
            call.delivery_id, call.job_id, attempt=attempt_of(job, call), started=None,
            error_class="WorkHorseKilled", message=f"the process running this action died (wait status {ret_val})",
            kind=ErrorKind.TRANSIENT.value,
            next_retry_at=time.time() + job.get_retry_interval() if will_retry else None)
    except Exception:
        log.exception("job %s: could not record the death of its work-horse", job.id)
