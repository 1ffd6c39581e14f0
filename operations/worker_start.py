"""What ``cvat-hooks worker`` does once before it serves: schedule the periodic reconcile, and queue
one job that asks CVAT who the workers are and takes a first look at CVAT's current state.

Nothing here raises or waits on CVAT: a worker must start and run actions even when CVAT is slow or
down at that moment (the periodic job and the next start try again).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from core.contract import LIGHT_QUEUE
from core.keys import LEARN_STATES_JOB_ID as LEARN_JOB_ID
from core.queueing import SERIALIZER, queue
from core.redaction import Redactor
from operations.reconcile import schedule_periodic
from receiver.settings import Settings

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

LEARN_JOB_FUNCTION = "operations.worker_start.learn_now"
LEARN_TIMEOUT = 1800
"""Seconds a walk through every project, task and job may take."""


def at_start(settings: Settings, redis: Redis) -> None:
    """The worker command's start hook (``workers.worker.run`` calls it, not in burst mode)."""
    schedule_periodic(settings, redis)
    if not settings.workers.cvat.configured:
        return
    try:  # queued, not done here: a slow CVAT must not hold up the worker's start
        queue_learning(redis)
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        log.warning("worker start: could not queue learning CVAT's state: %s: %s", type(exc).__name__, exc)


def queue_learning(redis: Redis) -> bool:
    """Queue one run of :func:`learn_now` on the light queue unless one is already waiting or running."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job, JobStatus

    try:
        job = Job.fetch(LEARN_JOB_ID, connection=redis, serializer=SERIALIZER)
    except NoSuchJobError:
        job = None
    if job is not None and job.get_status(refresh=False) == JobStatus.STARTED:
        return False
    if job is not None and job.get_status(refresh=False) == JobStatus.QUEUED:
        if job.func_name == LEARN_JOB_FUNCTION:
            return False
        job.delete()  # queued by an older release under a name this one no longer imports
    queue(LIGHT_QUEUE, redis).enqueue(LEARN_JOB_FUNCTION, job_id=LEARN_JOB_ID, job_timeout=LEARN_TIMEOUT,
                                      result_ttl=86400, failure_ttl=7 * 86400,
                                      description="cvat-hooks: learn CVAT's current state")
    return True


def learn_now() -> dict[str, Any]:
    """The queued job: learn who the workers are in CVAT (``core.service_account``), then the
    state of every project, task and job the receiver never saw.

    Never raises: a CVAT that is down now is no failed action to list among the dead letters, and the
    periodic run tries again.
    """
    from rq import get_current_job

    from core.redis_conn import connect
    from core.service_account import learn
    from core.state import StateStore
    from operations.state_sync import learn_states
    from receiver.settings import process_settings
    from workers.cvat_client import CvatClient

    settings = process_settings()
    if not settings.workers.cvat.configured:
        return {"skipped": "CVAT is not configured"}
    job = get_current_job()
    redis = job.connection if job is not None else connect(settings.redis_url)
    try:
        with CvatClient(settings.workers.cvat) as gateway:
            learn(gateway, redis, configured=settings.workers.cvat.service_account)
            return learn_states(gateway, StateStore(redis, settings.state_seconds,
                                                    redactor=Redactor(settings.sensitive_values())))
    except Exception as exc:  # noqa: BLE001 - see the docstring
        message = Redactor(settings.sensitive_values()).text(f"{type(exc).__name__}: {exc}")
        log.warning("state: could not learn CVAT's current state at worker start: %s", message)
        return {"error": message}
