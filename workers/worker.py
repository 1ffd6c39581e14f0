"""Start an RQ worker on cvat-hooks' queues: RQ's own worker classes, with RQ's scheduler.

The classes add only what ``workers.rq_gaps`` says RQ lacks (a job taken but never started is put
back on its queue before RQ's maintenance would drop it; a SimpleWorker's job stays registered for
about a minute, renewed; a scheduler that waits out a Redis failure and takes missing locks within
seconds) and a stop after a job at the recycling limits. Everything of one action's
attempt is in the job function (``workers.jobs.run_action``) and RQ's failure callback.
"""

from __future__ import annotations

import enum
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from rq import SimpleWorker, Worker
from rq.exceptions import StopRequested
from rq.scheduler import RQScheduler
from rq.worker import BaseWorker

from core.contract import JOB_FUNCTION, QUEUES, ActionCall
from core.queueing import SERIALIZER, queue
from core.redis_conn import connect
from core.settings import Recycle, WorkerSettings, process_settings
from workers import rq_gaps
from workers.jobs import on_work_horse_killed, runtime

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline
    from rq.job import Job
    from rq.queue import Queue

log = logging.getLogger(__name__)

JOB_MONITORING_SECONDS = 15
"""A running job stays registered this long + 60 s, renewed this often: a job whose whole worker was
killed is retried by RQ's maintenance about 75 s after the kill (RQ's default: 90 s for a forking
worker, the job's whole time limit + 60 s for a SimpleWorker)."""

CONNECTION_WAIT_MAX = 2.0
"""Longest pause between two tries of a worker that lost Redis (RQ's default: 60 s, doubling from
1 s): after a Redis failover, jobs run again within seconds."""


class Ended(enum.Enum):
    """Why :func:`work` returned."""

    STOPPED = "stopped"
    """Asked to (SIGTERM, SIGINT), or done (burst)."""
    RECYCLED = "recycled"
    """At its recycling limits, to be replaced by a fresh process."""
    FAILED = "failed"
    """RQ's loop ended on an error (e.g. Redis gone while a job ended)."""


def note_requeued(q: Queue, job_ids: list[str], why: str) -> None:
    """Say in the delivery log (and the worker's log) that these jobs of ``q`` were put back on it."""
    for job_id in job_ids:
        log.warning("worker: job %s was %s; queued again", job_id, why)
        try:
            job = q.fetch_job(job_id)
            if job is None or job.func_name != JOB_FUNCTION:
                continue
            call = ActionCall.from_json(job.args[0])
            runtime().deliveries.action_note(call.delivery_id, call.job_id, f"{why}; queued again")
        except Exception as exc:  # the job is back on its queue; the note is only for the reader
            log.warning("worker: could not note the requeue of job %s: %s", job_id, exc)


UNSTARTED = "taken by a worker that stopped before starting it"


class Maintained:
    """What both worker classes add to RQ's: gap 1 of ``workers.rq_gaps`` before RQ's maintenance,
    a record of a stop request, and a stop after a job at the recycling limits."""

    queues: list[Queue]
    name: str
    connection: Redis
    recycle: Recycle | None = None
    recycled: str | None = None
    """Why it stopped at its recycling limits, once it has."""
    stop_requested = False
    jobs_done = 0
    scheduler: RQScheduler | None
    our_scheduler: rq_gaps.WorkerScheduler | None = None
    """The scheduler :func:`run` gives the worker in place of RQ's own (gap 4 of ``workers.rq_gaps``)."""

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        """RQ's start of a worker (registered, subscribed), then, when it has one, its scheduler
        started in a process of its own, as RQ's is: RQ stops it with the worker, and its
        maintenance starts it again should it end."""
        super().bootstrap(*args, **kwargs)  # type: ignore[misc]
        if self.our_scheduler is not None:
            self.scheduler = self.our_scheduler
            self.scheduler.start()

    def clean_registries(self) -> None:
        for q in self.queues:
            try:
                with rq_gaps.maintenance_lock(q) as locked:
                    if locked:
                        note_requeued(q, rq_gaps.rescue_expired(q), UNSTARTED)
                        note_requeued(q, rq_gaps.requeue_stuck(q), UNSTARTED)
            except StopRequested:
                raise  # RQ's SIGTERM handler raises it wherever an idle worker is: it must reach RQ's loop
            except Exception as exc:  # maintenance must go on: RQ's own cleanup follows
                log.warning("worker: looking for unstarted jobs on %s failed: %s", q.name, exc)
        super().clean_registries()  # type: ignore[misc]

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's heartbeat, its three commands sent in one round trip when RQ gives it no pipeline.

        RQ sends a heartbeat alone three times for every job (after the dequeue, after the job, and
        before the next blocking dequeue: "heartbeat() is called 7 times just to run a 3 second
        job", rq/rq#945), each as three round trips: nine of the 25 round trips a light child made
        per notification, each costing CPU in the child and in Redis. The one after the dequeue
        also sits between an event's enqueue and its action's start (bench/README.md, latency).
        ``tests/test_worker_round_trips.py`` fails when RQ batches them itself; then this goes."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)  # type: ignore[misc]
            return
        with self.connection.pipeline(transaction=False) as batched:
            super().heartbeat(timeout, pipeline=batched)  # type: ignore[misc]
            batched.execute()

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)  # type: ignore[misc]

    def execute_job(self, job: Job, queue: Queue) -> None:
        super().execute_job(job, queue)  # type: ignore[misc]
        self.jobs_done += 1
        if self.recycle is not None:
            self.recycled = self.recycle.due(self.jobs_done, rss_bytes())
            if self.recycled:
                log.info("worker %s: recycling: %s", self.name, self.recycled)
                raise StopRequested()  # RQ's own: its loop ends as on a warm shutdown


class ForkWorker(Maintained, Worker):
    """RQ's forking worker."""

    max_connection_wait_time = CONNECTION_WAIT_MAX
    log_result_lifespan = False  # RQ's "result is kept for ..." line after every job


class InProcessWorker(Maintained, rq_gaps.RenewedRegistration, SimpleWorker):
    """RQ's SimpleWorker, its running job registered for about a minute at a time (gap 3)."""

    max_connection_wait_time = CONNECTION_WAIT_MAX
    log_result_lifespan = False  # RQ's "result is kept for ..." line after every job


WORKER_CLASSES: dict[str, type[BaseWorker]] = {"fork": ForkWorker, "simple": InProcessWorker}
"""``fork`` runs each job in a child process (a crashing action takes down only that child, and RQ
retries it); ``simple`` runs jobs in the worker itself (far less CPU per job, but a crash takes the
worker down: RQ's maintenance then retries the job from another worker, once it deems it abandoned).
``cvat-hooks worker``'s default, ``split``, runs a ``simple`` worker per queue group, each in a child
of a supervising parent (``workers.supervisor``, which says what a crash takes down)."""


def preload(settings: WorkerSettings | None = None) -> None:
    """Import what actions use before forking, so each work-horse (or split child) starts with it in
    shared pages instead of importing cvat-sdk and boto3 itself (bench/: export overhead 0.47 s ->
    0.14 s, and less memory per export). The S3 client is made too when ``settings`` (by default the
    process's, ``core.settings.process_settings``) hold ``AWS_*`` variables: without them no
    credential lookup is started."""
    import importlib

    from workers.actions import REGISTRY

    for spec in REGISTRY.values():
        spec.load()
    for module in ("workers.cvat_client", "workers.storage", "boto3", "botocore.session"):
        try:
            importlib.import_module(module)
        except ImportError as exc:  # an optional piece missing must not stop the worker
            log.warning("worker: could not preload %s: %s", module, exc)
    aws_environment = (settings or process_settings()).aws_environment
    if aws_environment:
        from workers import storage

        storage.warm_up(aws_environment)
    gc.collect()
    gc.freeze()  # what is loaded stays in pages shared with the work-horses: their collections skip it


def build_worker(settings: WorkerSettings, *, queues: Sequence[str] = QUEUES, kind: str = "fork",
                 name: str | None = None, recycle: Recycle | None = None) -> BaseWorker:
    """A worker serving ``queues`` in order (light actions before exports); it stops at ``recycle``'s
    limits."""
    redis = connect(settings.redis_url)
    cls = WORKER_CLASSES[kind]
    # An idle worker runs maintenance only when its blocking dequeue returns, after worker_ttl - 15
    # seconds: the TTL is derived from the interval so that happens on time (RQ: 405 s and 10 min).
    worker = cls([queue(q, redis) for q in queues], connection=redis, serializer=SERIALIZER, name=name,
                 work_horse_killed_handler=on_work_horse_killed, job_monitoring_interval=JOB_MONITORING_SECONDS,
                 maintenance_interval=settings.maintenance_seconds, worker_ttl=settings.maintenance_seconds + 15)
    worker.recycle = recycle  # type: ignore[attr-defined]
    return worker


def work(worker: BaseWorker, *, burst: bool, with_scheduler: bool) -> Ended:
    """Run RQ's loop once; why it ended."""
    log.info("worker %s: serving %s", worker.name, ", ".join(worker.queue_names()))
    try:
        worker.work(burst=burst, with_scheduler=with_scheduler, logging_level="INFO")
    except RedisError as exc:  # RQ's start or teardown met Redis gone
        if burst:
            raise
        if getattr(worker, "stop_requested", False):  # asked to stop (SIGTERM): never start another
            log.warning("worker %s: stopping as asked (%s: %s)", worker.name, type(exc).__name__, exc)
            return Ended.STOPPED
        log.error("worker %s: stopped on %s: %s", worker.name, type(exc).__name__, exc)
        return Ended.FAILED
    if getattr(worker, "recycled", None):
        return Ended.RECYCLED
    if burst or getattr(worker, "stop_requested", False):
        return Ended.STOPPED
    return Ended.FAILED


def run(settings: WorkerSettings, *, burst: bool = False, queues: Sequence[str] = QUEUES, kind: str = "fork",
        name: str | None = None, at_start: Callable[[Redis], object] | None = None) -> None:
    """``cvat-hooks worker --class fork|simple``: one worker, with a scheduler (gap 4 of
    ``workers.rq_gaps``), until stopped (or, with ``burst``, until the queues are empty: RQ's
    scheduler then moves what is due once).

    ``at_start`` is called with the worker's Redis before it works, unless ``burst``: the command
    line schedules the periodic reconcile there, so a one-off burst worker leaves no periodic job
    behind. RQ's loop quits on an unexpected error (e.g. Redis going away while a job ends): a new
    worker is started then, rather than this process exiting 0, which a supervisor restarting on
    failure would not restart (issue 6).
    """
    if kind == "fork":
        preload(settings)
    worker = build_worker(settings, queues=queues, kind=kind, name=name)
    if at_start is not None and not burst:
        at_start(worker.connection)
    # One scheduler for every worker this runs, so its name, and the locks it holds, stay the same.
    scheduler = None if burst else rq_gaps.WorkerScheduler(worker.queue_names(), worker.connection,
                                                           serializer=SERIALIZER)
    restarts = 0
    while True:
        worker.our_scheduler = scheduler  # type: ignore[attr-defined]
        if work(worker, burst=burst, with_scheduler=burst) is not Ended.FAILED:
            break
        log.error("worker %s: starting a new worker in 1 s", worker.name)
        restarts += 1
        worker = rebuilt(settings, queues=queues, kind=kind, name=f"{name}.{restarts}" if name else None)


def rebuilt(settings: WorkerSettings, **options: Any) -> BaseWorker:
    """:func:`build_worker`'s worker, a second from now or once Redis answers again: RQ's worker
    talks to Redis as it is made, and Redis being away is what usually ended the last one."""
    tries = 0
    while True:
        time.sleep(1)
        try:
            return build_worker(settings, **options)
        except RedisError as exc:
            if tries % 30 == 0:  # a line now, then one every half minute
                log.warning("worker: Redis does not answer (%s: %s); trying every second", type(exc).__name__, exc)
            tries += 1


def rss_bytes() -> int:
    """This process's resident memory now (Linux), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
