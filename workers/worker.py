"""Start an RQ worker on cvat-hooks' queues, with RQ's scheduler (needed for delayed retries)."""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.exceptions import StopRequested
from rq.job import JobStatus
from rq.registry import StartedJobRegistry
from rq.worker import BaseWorker

from workers.contract import QUEUES, ActionCall
from workers.inprocess import BatchedSimpleWorker
from workers.jobs import begin_attempt, on_work_horse_killed, runtime
from workers.queueing import SERIALIZER, queue
from workers.redis_conn import connect
from workers.settings import Recycle, WorkerSettings

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

RESCUE_AHEAD_SECONDS = 15


def rescue_unstarted(queue_: Queue) -> list[str]:
    """Make RQ's maintenance retry the jobs a dead worker took but never marked started.

    A worker pops a job off its queue (on several queues RQ uses BLPOP, not its intermediate
    queue), adds it to the StartedJobRegistry, and only then does the job get the status
    ``started``. A worker (or Redis) killed in between leaves a registry entry for a job still
    ``queued`` but on no queue; RQ 3.0's cleanup of expired entries only retries ``started`` jobs
    and drops that one silently: an acknowledged delivery lost (found by bench/soak.py, issue 6).
    Such jobs are marked ``started`` here, just before RQ's cleanup runs, so it treats them as the
    abandoned jobs they are (retry or failed registry, and our failure callback records it).
    Returns the job ids rescued.
    """
    registry = StartedJobRegistry(queue=queue_)
    rescued = []
    # A little ahead of now: RQ's cleanup, just after, reads its own clock, and an entry expiring
    # in between would be dropped. A live worker's entry is never this close to expiry while its job
    # is still ``queued`` (it registers for 75 s or more and marks the job started within ms).
    for job_id in registry.get_expired_job_ids(timestamp=time.time() + RESCUE_AHEAD_SECONDS):
        job = queue_.fetch_job(job_id)
        if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
            continue
        if queue_.connection.lpos(queue_.key, job_id) is not None:
            continue  # queued again since (a replay or requeue): it will run from there
        job.set_status(JobStatus.STARTED)
        rescued.append(job_id)
        log.warning("worker: job %s was taken by a worker that stopped before starting it; retrying it", job_id)
    return rescued


_REQUEUE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""
"""KEYS: intermediate queue, queue, first-seen key; ARGV: job id. Moves the job back to the front of
its queue unless another worker's maintenance did it first."""


def requeue_stuck(queue_: Queue) -> list[str]:
    """Put back on its queue a job that a one-queue worker took and died holding, before starting it.

    Such a worker pops with LMOVE into RQ's intermediate queue, then registers the job as started
    (and takes it off the intermediate queue, with any first-seen stamp RQ's maintenance gave it, so
    no stamp outlives its pass) in one transaction. A job that stays there past RQ's minute (that
    stamp) without being in the StartedJobRegistry never ran. RQ's cleanup would treat it as a
    failed run: spend a retry and wait out its backoff, or with no retries left fail it unrun, while
    our delivery log still said ``queued``. It is queued again instead, at the front, without
    spending a retry, and the delivery log says why. Returns the job ids put back.
    """
    stuck = queue_.intermediate_queue
    requeue = queue_.connection.register_script(_REQUEUE)
    started = set(StartedJobRegistry(queue=queue_).get_job_ids(cleanup=False))
    put_back = []
    for job_id in stuck.get_job_ids():
        if job_id in started or not stuck.should_be_cleaned_up(job_id):
            continue
        job = queue_.fetch_job(job_id)
        if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
            continue  # RQ's cleanup deals with those
        if not requeue(keys=[stuck.key, queue_.key, stuck.get_first_seen_key(job_id)], args=[job_id]):
            continue
        put_back.append(job_id)
        log.warning("worker: job %s was taken by a worker that stopped before starting it; queued again", job_id)
        try:
            call = ActionCall.from_json(job.args[0])
            runtime().deliveries.action_note(
                call.delivery_id, call.job_id,
                "taken by a worker that stopped before starting it; queued again")
        except Exception as exc:  # the job is back on its queue; the note is only for the reader
            log.warning("worker: could not note the requeue of job %s: %s", job_id, exc)
    return put_back


class _Rescuing:
    """RQ's maintenance, preceded by :func:`rescue_unstarted` and :func:`requeue_stuck` on each queue."""

    def clean_registries(self) -> None:
        for queue_ in self.queues:  # type: ignore[attr-defined]
            for rescue in (rescue_unstarted, requeue_stuck):
                try:
                    rescue(queue_)
                except StopRequested:
                    # RQ's SIGTERM handler raises this wherever the worker is when it is idle: it must
                    # reach RQ's loop, or the worker goes on until it is cold-stopped a minute later.
                    raise
                except Exception as exc:  # maintenance must go on: RQ's own cleanup follows
                    log.warning("worker: %s on %s failed: %s", rescue.__name__, queue_.name, exc)
        super().clean_registries()  # type: ignore[misc]


class ForkWorker(_Rescuing, Worker):
    """RQ's forking worker with :func:`rescue_unstarted`."""


class InProcessWorker(_Rescuing, BatchedSimpleWorker):
    """RQ's SimpleWorker, its bookkeeping batched (``workers.inprocess``), with :func:`rescue_unstarted`;
    an action's start in the delivery log rides in the worker's start transaction."""

    start_hook = staticmethod(begin_attempt)


WORKER_CLASSES: dict[str, type[BaseWorker]] = {"fork": ForkWorker, "simple": InProcessWorker}
"""``fork`` runs each job in a child process (a crashing action takes down only that child, and RQ
retries it); ``simple`` runs jobs in the worker itself (about 7x less CPU per job, but a crash takes
the worker down: RQ's abandoned-job cleanup then retries the job from another worker, once it deems
it abandoned). ``cvat-hooks worker``'s default, ``split``, runs a ``simple`` worker per queue, each
in a child of a supervising parent (``workers.supervisor``, which says what a crash takes down)."""


def preload() -> None:
    """Import what actions use before forking, so each work-horse starts with it in shared pages
    instead of importing cvat-sdk and boto3 itself (bench/: export overhead 0.47 s -> 0.14 s,
    and less memory per export)."""
    import importlib

    from workers.actions import REGISTRY

    for spec in REGISTRY.values():
        spec.load()
    for module in ("workers.cvat_client", "workers.storage", "boto3", "botocore.session"):
        try:
            importlib.import_module(module)
        except ImportError as exc:  # an optional piece missing must not stop the worker
            log.warning("worker: could not preload %s: %s", module, exc)
    if any(name.startswith("AWS_") for name in os.environ):  # S3 configured: no credential lookups otherwise
        from workers import storage

        storage.warm_up()
    gc.collect()
    gc.freeze()  # what is loaded stays in pages shared with the work-horses: their collections skip it


def build_worker(settings: WorkerSettings, *, queues: Sequence[str] = QUEUES, kind: str = "fork",
                 name: str | None = None, recycle: Recycle | None = None) -> BaseWorker:
    """A worker serving ``queues`` in order (light actions before exports); an in-process one stops
    at ``recycle``'s limits."""
    redis = connect(settings.redis_url)
    cls = WORKER_CLASSES[kind]
    # An idle worker runs maintenance only when its blocking dequeue returns, after worker_ttl - 15
    # seconds: the TTL is derived from the interval so that happens on time (RQ: 405 s and 10 min).
    worker = cls([queue(q, redis) for q in queues], connection=redis, serializer=SERIALIZER, name=name,
                 work_horse_killed_handler=on_work_horse_killed,
                 maintenance_interval=settings.maintenance_seconds, worker_ttl=settings.maintenance_seconds + 15)
    if isinstance(worker, InProcessWorker):
        worker.recycle = recycle
    return worker


class Recycled(Exception):
    """The worker stopped to be replaced by a fresh process (``WorkerSettings.recycle``)."""


def run(settings: WorkerSettings, *, burst: bool = False, queues: Sequence[str] = QUEUES, kind: str = "fork",
        name: str | None = None, at_start: Callable[[Redis], object] | None = None,
        recycle: Recycle | None = None) -> bool:
    """Work until stopped (or, with ``burst``, until the queues are empty).

    ``at_start`` is called with the worker's Redis before it works, unless ``burst``: the command
    line schedules the periodic reconcile there (``receiver.reconcile.schedule_periodic``), so a
    one-off burst worker leaves no periodic job behind. With ``recycle`` (an in-process worker under
    ``workers.supervisor``, which starts a fresh one), it raises :class:`Recycled` once it has
    stopped at those limits.
    """
    if kind == "fork":
        preload()
    worker = build_worker(settings, queues=queues, kind=kind, name=name, recycle=recycle)
    restarts = 0  # a successor's name says whose it is (``workers.supervisor.recover`` finds its jobs)
    if at_start is not None and not burst:
        at_start(worker.connection)
    while True:
        log.info("worker %s: serving %s (%s)", worker.name, ", ".join(queues), kind)
        try:
            worked = worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
        except RedisError as exc:  # RQ's start or teardown met Redis gone
            if burst:
                raise
            worked, why = False, f"{type(exc).__name__}: {exc}"
        else:
            why = "an unexpected error (see above)"
        if recycled := getattr(worker, "recycled", None):
            raise Recycled(recycled)
        if burst or getattr(worker, "_shutdown_requested_date", True) is not None:
            return worked  # done, or asked to stop (SIGTERM, SIGINT)
        # RQ's loop quits on an unexpected error, e.g. Redis going away while a work-horse runs (its
        # job is then retried as abandoned): start a new worker rather than leave this process idle,
        # or exit 0, which a supervisor restarting on failure would not restart (issue 6).
        log.error("worker %s: stopped on %s; starting a new worker in 1 s", worker.name, why)
        time.sleep(1)
        restarts += 1
        worker = build_worker(settings, queues=queues, kind=kind, name=f"{name}.{restarts}" if name else None,
                              recycle=recycle)
