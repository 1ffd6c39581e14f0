"""The single RQ entry point: run one action of one delivery, and record every attempt.

Each attempt is written to the delivery log *before* an error is re-raised, so what a user reads
is never behind what happened. Whether RQ retries is decided here, from ``core.errors.classify``:
a permanent error sets the job's remaining retries to zero before RQ sees the exception.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from functools import cache, partial
from typing import TYPE_CHECKING, Any

from redis import Redis
from rq import get_current_job
from rq.exceptions import AbandonedJobError
from rq.job import Job

from core import metrics
from core.contract import ActionCall
from core.delivery_log import Attempt, DeliveryLog
from core.errors import ErrorKind, PermanentError, UnknownAction, classify
from core.logs import RECORDED_NOTE
from core.redaction import Redactor
from core.redis_conn import connect
from core.settings import WorkerSettings, process_settings
from workers.actions import runner
from workers.context import ActionContext
from workers.gateway import CvatGateway

if TYPE_CHECKING:
    from redis.client import Pipeline

log = logging.getLogger(__name__)

TRACEBACK_CHARS = 4000
"""The end of a failed attempt's traceback kept in the delivery log (its innermost frames)."""


@dataclass
class Runtime:
    """What every job of a worker process shares (built on first use, never at import time)."""

    settings: WorkerSettings
    redis: Redis
    deliveries: DeliveryLog
    redactor: Redactor

    def gateway(self) -> CvatGateway:
        """The CVAT client this worker thread keeps across jobs (``workers.cvat_client.make_gateway``:
        one login and format list per process, not per job), asked for lazily: most light actions
        never need one."""
        from workers.cvat_client import make_gateway

        if not self.settings.cvat.configured:
            raise PermanentError("CVAT is not configured: set CVAT_URL and CVAT_ACCESS_TOKEN "
                                 "(or CVAT_USERNAME and CVAT_PASSWORD) for the worker")
        return make_gateway(self.settings.cvat)


@cache
def runtime() -> Runtime:
    """The process's runtime, built at its first job (a Redis connection made before a fork would be
    shared by the children) from the settings the worker's start parsed (``core.settings.process_settings``),
    so no job reads the environment again."""
    settings = process_settings()
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
    """Run one attempt of one action (the RQ job function named in ``core.contract.JOB_FUNCTION``).

    The attempt reads top to bottom: its start recorded in the delivery log, the action, its
    outcome recorded (a failure before it is re-raised, so the log is never behind what happened),
    and RQ's ``Retry`` (given at enqueue) doing the retries. Two Redis round trips of its own
    (bench/dispatch.py): the start with a read of the action's state, then the end with the metrics.
    """
    call = ActionCall.from_json(data)
    rt = runtime()
    job = get_current_job()
    attempt = rt.deliveries.attempt(call.delivery_id, call.job_id, attempt_of(job, call))
    attempt.start()
    ctx = ActionContext(call=call, settings=rt.settings, redis=rt.redis, gateway_factory=rt.gateway,
                        note=attempt.note)
    try:
        result = unmet_job_requirement(ctx)
        is_skip = result is not None
        if result is None:
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
        ctx.close()
    outcome = "skipped" if is_skip else "succeeded"
    attempt.succeeded(result, skipped=is_skip, also=partial(count_attempt, call.action, outcome, attempt))
    log.info("delivery %s: action %s of rule %s %s (attempt %d)", call.delivery_id, call.action, call.rule_id,
             outcome, attempt.number)
    return result


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
    """Write the failed attempt (with its traceback), stop RQ from retrying what cannot succeed, and
    log one line: the traceback is for the delivery log, not for the worker's log."""
    kind = classify(exc)
    will_retry = kind is ErrorKind.TRANSIENT and job is not None and bool(job.retries_left)
    delay = job.get_retry_interval() if will_retry and job is not None else None
    if job is not None and not will_retry:
        job.retries_left = 0  # RQ's Retry then fails the job instead of retrying it
    message = rt.redactor.text(str(exc) or type(exc).__name__)
    outcome = "retrying" if will_retry else "failed"
    attempt.failed(error_class=type(exc).__name__, message=message, kind=kind.value,
                   next_retry_at=time.time() + delay if delay is not None else None,
                   result=getattr(exc, "result", None), traceback=traceback_of(exc),
                   also=partial(count_attempt, call.action, outcome, attempt))
    exc.add_note(RECORDED_NOTE)
    log_failure(call, failure_kind(kind, delay), message)


def failure_kind(kind: ErrorKind, retry_in: float | None) -> str:
    """How a failed attempt ends, as the worker's log line says it."""
    if retry_in is not None:
        return f"will retry in {retry_in:g}s"
    return "permanent" if kind is ErrorKind.PERMANENT else "no retry left"


def log_failure(call: ActionCall, how: str, message: str) -> None:
    """The worker's one line about a failed attempt."""
    log.warning("delivery %s: action %s of rule %s failed (%s): %s", call.delivery_id, call.action,
                call.rule_id, how, message)


def traceback_of(exc: BaseException, limit: int = TRACEBACK_CHARS) -> str:
    """The end of ``exc``'s traceback (the delivery log keeps it for whoever debugs the action)."""
    text = "".join(traceback.format_exception(exc))
    return text[-limit:]


def count_attempt(action: str, outcome: str, attempt: Attempt, pipe: Pipeline) -> None:
    """Queue the metrics of one attempt on ``pipe`` (the transaction that records its end; a metrics
    error there is logged, never raised: see ``Attempt``)."""
    metrics.inc(pipe, "cvat_hooks_action_runs_total", action=action, outcome=outcome)
    if outcome == "retrying":
        metrics.inc(pipe, "cvat_hooks_action_retries_total", action=action)
    metrics.observe(pipe, "cvat_hooks_action_duration_seconds", time.time() - attempt.started, action=action)


def on_job_failure(job: Job, connection: Redis, exc_type: type, exc: BaseException, tb: Any) -> None:
    """RQ's failure callback: records the failures that happen outside ``run_action``, i.e. an
    abandoned job (its worker died). Failures inside it were recorded there."""
    if not issubclass(exc_type, AbandonedJobError):
        return
    record_outside(job, "AbandonedJobError", "the worker running this action stopped before it finished")


def on_work_horse_killed(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """A forked work-horse died (killed, out of memory) mid-action: say so in the delivery log.
    RQ then retries the job if it has retries left, or moves it to the failed registry."""
    record_outside(job, "WorkHorseKilled", f"the process running this action died (wait status {ret_val})")


def record_outside(job: Job, error_class: str, message: str) -> None:
    """Record a failed attempt that ended outside ``run_action`` (never raises: RQ's bookkeeping
    goes on after it)."""
    try:
        call = ActionCall.from_json(job.args[0])
        rt = runtime()
        delay = job.get_retry_interval() if job.retries_left else None
        rt.deliveries.action_failed(
            call.delivery_id, call.job_id, attempt=attempt_of(job, call), started=None,
            error_class=error_class, message=message, kind=ErrorKind.TRANSIENT.value,
            next_retry_at=time.time() + delay if delay is not None else None)
        log_failure(call, failure_kind(ErrorKind.TRANSIENT, delay), message)
    except Exception:
        log.exception("job %s: could not record its failure (%s)", job.id, error_class)
