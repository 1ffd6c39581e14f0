"""What cvat-hooks needs of RQ that RQ's public API does not do: each the smallest thing, all here.

Everything else in the workers is RQ's own classes and hooks. Each gap below names the RQ issue that
would remove it, and ``tests/test_rq_gaps.py`` holds a test of RQ's own behaviour that fails when RQ
changes it (then the gap and that test go). Only RQ's public calls are used: no key is built here
by hand, and the one deleted directly (a job's first-seen stamp) is named by RQ's own
``IntermediateQueue.get_first_seen_key``.

1. **A job taken but never started.** A worker takes a job off its queue (``LMOVE`` into RQ's
   intermediate queue for one queue, ``BLPOP`` for several), registers it in the StartedJobRegistry,
   and only then marks it ``started``. Killed in between, it leaves a job that never ran, which RQ
   then fails or charges a retry for (``IntermediateQueue.cleanup`` calls ``handle_job_failure``:
   rq/rq#2061), or drops without a word once its registration expires
   (``StartedJobRegistry.cleanup`` skips a job that is not ``started``: rq/rq#2015). Such a job is
   put back at the front of its queue instead (:func:`requeue_unstarted`, :func:`requeue_stuck`),
   under RQ's maintenance lock, so only one worker does it: it runs once, without spending a retry.
   Its first-seen stamp goes with it (RQ's ``IntermediateQueue.remove`` leaves it for a day): kept,
   it would make the next cleanup fail the job at once, when the stamp is a minute old, if it finds
   the job between another worker's dequeue and registration.
2. **A dead in-process worker's jobs, at once.** A supervisor that saw its child die knows that the
   child's started jobs are not running. :func:`hand_over` makes their registrations expire now and
   runs RQ's own abandoned-job handling (our failure callback, then ``job.retry`` or the failed
   registry), instead of waiting until RQ deems them abandoned (rq/rq#2015: "after the job's
   execution timeout").
3. **A SimpleWorker's job registered for minutes, not its whole time limit.** RQ's ``SimpleWorker``
   registers a running job for its time limit + 60 s and never renews it (only the forking
   ``Worker`` heartbeats while its work-horse runs), so a job whose whole worker was killed would be
   retried an hour later for an export. :class:`RenewedRegistration` registers it for
   ``job_monitoring_interval`` + 60 s, as RQ's forking worker does, and renews it with RQ's own
   ``maintain_heartbeats`` from one thread per worker.
4. **A standby scheduler takes over within seconds.** RQ's scheduler retries to take a lock it does
   not hold every ``DEFAULT_SCHEDULER_FALLBACK_PERIOD`` (2 min); :class:`Scheduler` every few
   seconds. RQ's scheduler ends on a Redis error (rq/rq#2189), and RQ's worker starts it again
   only at its next maintenance round (30 s): :class:`WorkerScheduler`, which every worker class
   runs, waits for Redis instead, and with a stable name refreshes its own lock after a Redis
   failover instead of waiting 61 s for it to expire. It ends once its worker is gone, which RQ's
   did at its first Redis error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError
from rq.executions import Execution
from rq.job import JobStatus
from rq.scheduler import RQScheduler
from rq.worker import BaseWorker

if TYPE_CHECKING:
    from rq.job import Job
    from rq.queue import Queue

log = logging.getLogger(__name__)

LOOK_AHEAD_SECONDS = 15
""":func:`rescue_expired` also takes registrations that expire this soon: RQ's cleanup, which runs
right after with its own clock, would drop one that expired in between. A live worker's job is never
``queued`` this close to its registration's end (it marks the job started within milliseconds)."""

LOCK_WAIT_SECONDS = 10.0
"""How long :func:`hand_over` waits for RQ's maintenance lock of a queue another worker is cleaning."""

REACQUIRE_SECONDS = 5.0
"""How often a :class:`Scheduler` without every lock tries to take the missing ones."""

REDIS_RETRY_SECONDS = 1.0
"""How often a :class:`WorkerScheduler` that Redis failed tries again."""


@contextmanager
def maintenance_lock(queue: Queue, wait: float = 0.0) -> Iterator[bool]:
    """RQ's maintenance lock of ``queue`` while inside (whether it was had, within ``wait`` seconds):
    one worker at a time cleans a queue's registries, so two never retry the same job."""
    deadline = time.monotonic() + wait
    got = queue.acquire_maintenance_lock()
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
        got = queue.acquire_maintenance_lock()
    try:
        yield got
    finally:
        if got:
            queue.release_maintenance_lock()


def requeue_unstarted(queue: Queue, entries: Iterable[tuple[str, str]]) -> list[str]:
    """Put back at the front of ``queue`` each job of ``entries`` (StartedJobRegistry entries: job id,
    execution id) that is still ``queued``: registered by a worker that died before starting it.
    Its registration is removed first; only the caller that removed it puts the job back. Returns
    the job ids put back."""
    registry = queue.started_job_registry
    put_back = []
    for job_id, execution_id in entries:
        job = queue.fetch_job(job_id)
        if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
            continue
        with queue.connection.pipeline() as pipe:
            registry.remove_execution(Execution(execution_id, job_id, queue.connection), pipeline=pipe)
            [removed] = pipe.execute()
        if not removed:
            continue  # another caller took it
        out_of_intermediate(queue, job_id)
        queue.enqueue_job(job, at_front=True)
        put_back.append(job_id)
    return put_back


def rescue_expired(queue: Queue) -> list[str]:
    """Gap 1, from a registration that (nearly) expired: :func:`requeue_unstarted` on those entries.
    Call it holding ``queue``'s maintenance lock, before RQ's cleanup (which would drop them)."""
    registry = queue.started_job_registry
    expired = set(registry.get_expired_job_ids(timestamp=time.time() + LOOK_AHEAD_SECONDS))
    if not expired:
        return []
    entries = [(j, e) for j, e in registry.get_job_and_execution_ids(cleanup=False) if j in expired]
    return requeue_unstarted(queue, entries)


def requeue_stuck(queue: Queue) -> list[str]:
    """Gap 1, from RQ's intermediate queue: a job there for over RQ's minute (its first-seen stamp)
    and not registered was taken by a one-queue worker that died before registering it. It goes
    back to the front of its queue, where RQ's cleanup, which runs next, would have failed it or
    spent a retry on it. Call it holding ``queue``'s maintenance lock. Returns the job ids put back."""
    stuck = queue.intermediate_queue
    registered = set(queue.started_job_registry.get_job_ids(cleanup=False))
    put_back = []
    for job_id in stuck.get_job_ids():
        if job_id in registered or not stuck.should_be_cleaned_up(job_id):
            continue
        job = queue.fetch_job(job_id)
        if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
            continue  # RQ's cleanup deals with those
        out_of_intermediate(queue, job_id)
        queue.enqueue_job(job, at_front=True)
        put_back.append(job_id)
    return put_back


def out_of_intermediate(queue: Queue, job_id: str) -> None:
    """``job_id`` off RQ's intermediate queue, with its first-seen stamp (rq/rq#2061): a job put back
    on its queue passes through the intermediate queue again, and a stamp left from before would
    make the next cleanup fail it as stuck for a minute. RQ has no call that drops the stamp; its
    key is RQ's own (``get_first_seen_key``)."""
    stuck = queue.intermediate_queue
    stuck.remove(job_id)
    queue.connection.delete(stuck.get_first_seen_key(job_id))


def hand_over(queue: Queue, worker_name: str) -> tuple[list[str], list[str]]:
    """Gap 2: the jobs of ``queue`` that the dead worker ``worker_name`` had taken. Those it had not
    started go back on the queue (gap 1); those it had started expire now and go through RQ's own
    abandoned-job handling, under RQ's maintenance lock (two cleanups at once would retry a job
    twice). Returns (job ids put back, job ids handed to RQ)."""
    registry = queue.started_job_registry
    with maintenance_lock(queue, wait=LOCK_WAIT_SECONDS) as locked:
        if not locked:  # RQ's cleanup, running meanwhile, could retry the same job a second time
            log.warning("worker: %s is being cleaned for too long; RQ's maintenance retries the jobs of %s once "
                        "their registrations run out", queue.name, worker_name)
            return [], []
        mine: list[tuple[str, Execution]] = []
        for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
            try:
                execution = Execution.fetch(execution_id, job_id, queue.connection)
            except ValueError:  # ended meanwhile
                continue
            if execution.worker_name == worker_name:
                mine.append((job_id, execution))
        if not mine:
            return [], []
        put_back = requeue_unstarted(queue, [(j, e.id) for j, e in mine])
        started = [(j, e) for j, e in mine if j not in put_back]
        with queue.connection.pipeline() as pipe:
            for _, execution in started:
                execution.heartbeat(registry, 0, pipe)  # registered until now: expired
            pipe.execute()
        registry.cleanup()
    return put_back, [j for j, _ in started]


class RenewedRegistration:
    """Gap 3, mixed into a ``SimpleWorker``: a running job stays registered for
    ``job_monitoring_interval`` + 60 s, renewed every ``job_monitoring_interval`` by one thread per
    worker (a thread per job cost a tenth of a no-op job's CPU). A job's end waits for a renewal in
    flight, so none is sent for a job that has ended."""

    job_monitoring_interval: int
    connection: Any
    name: str

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """RQ's forking worker's registration time, not SimpleWorker's whole time limit + 60 s."""
        return BaseWorker.get_heartbeat_ttl(self, job, working_time)  # type: ignore[arg-type]

    def prepare_execution(self, job: Job) -> Execution:
        execution: Execution = super().prepare_execution(job)  # type: ignore[misc]
        self.renewals.watch(job, execution)
        return execution

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        self.renewals.watch(None, None)
        super().handle_execution_ended(job, queue, heartbeat_ttl)  # type: ignore[misc]

    def teardown(self) -> None:
        self.renewals.stop()
        super().teardown()  # type: ignore[misc]

    @property
    def renewals(self) -> Renewals:
        found = self.__dict__.get("renewals")
        if found is None:
            found = self.__dict__["renewals"] = Renewals(self)  # type: ignore[arg-type]
        return found


class Renewals:
    """The thread of :class:`RenewedRegistration`: looks every second whether the running job is due."""

    def __init__(self, worker: BaseWorker) -> None:
        self.worker = worker
        self.lock = threading.Lock()
        self.running: tuple[Job, Execution] | None = None
        self.due = 0.0
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def watch(self, job: Job | None, execution: Execution | None) -> None:
        """Renew ``job`` from now on (None: nothing runs any more)."""
        if job is not None and (self.thread is None or not self.thread.is_alive()):
            self.stopped.clear()
            self.thread = threading.Thread(target=self.loop, name=f"renewals-{self.worker.name}", daemon=True)
            self.thread.start()
        with self.lock:
            self.running = (job, execution) if job is not None and execution is not None else None
            self.due = time.monotonic() + self.worker.job_monitoring_interval

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def loop(self) -> None:
        while not self.stopped.wait(min(1.0, self.worker.job_monitoring_interval / 2)):
            with self.lock:
                if self.running is None or time.monotonic() < self.due:
                    continue
                job, execution = self.running
                self.due = time.monotonic() + self.worker.job_monitoring_interval
                try:
                    self.worker.maintain_heartbeats(job, execution)
                except Exception as exc:  # Redis away for a moment: the next renewal may reach it
                    log.warning("worker %s: could not renew job %s: %s", self.worker.name, job.id, exc)


class Scheduler(RQScheduler):
    """Gap 4: RQ's scheduler, which tries to take the locks it lacks every :data:`REACQUIRE_SECONDS`."""

    def __init__(self, queue_names: Iterable[str], connection: Any, **options: Any) -> None:
        names = list(queue_names)
        super().__init__(names, connection=connection, **options)
        self.wanted = set(names)

    @property
    def should_reacquire_locks(self) -> bool:
        if self.acquired_locks >= self.wanted:
            return False
        if self.lock_acquisition_time is None:
            return True
        return (datetime.now() - self.lock_acquisition_time).total_seconds() > REACQUIRE_SECONDS


class WorkerScheduler(Scheduler):
    """Gap 4 where a scheduler runs (a fork or simple worker's process of its own, the split worker's
    scheduler child): RQ's loop ends on a Redis error (rq/rq#2189) and RQ's worker starts it again
    only at its next maintenance round (30 s), so this one runs the loop again every
    :data:`REDIS_RETRY_SECONDS` until Redis answers, and keeps its name (and so its locks)
    throughout. Asked to stop while Redis is away, it ends: its locks expire on their own.

    It also ends once the process that started it is gone (a simple worker whose action called
    ``os._exit``, a worker SIGKILLed alone): nothing else would stop it, and waiting out Redis
    failures it would run for ever, an orphan holding the locks its worker's successor needs."""

    stopping = False
    parent: int | None = None
    """The PID of the process that started this one (the worker), taken when the loop starts."""

    def request_stop(self, signum: Any = None, frame: Any = None) -> None:
        self.stopping = True
        super().request_stop(signum, frame)

    def orphaned(self) -> bool:
        """Whether the worker that started this scheduler is gone (this process was reparented)."""
        return self.parent is not None and os.getppid() != self.parent

    def heartbeat(self) -> None:
        if self.orphaned() and not self.stopping:
            log.warning("scheduler %s: its worker (PID %s) is gone; stopping", self.name, self.parent)
            self.request_stop()
        super().heartbeat()

    def work(self) -> None:
        self.parent = os.getppid()
        logged = -60.0
        while True:
            try:
                super().work()
                return
            except RedisError as exc:
                if self.stopping or self.orphaned():
                    return
                if time.monotonic() - logged >= 30:  # a line when Redis goes, then one every half minute
                    logged = time.monotonic()
                    log.warning("scheduler %s: Redis failed it (%s: %s); trying again every %s s", self.name,
                                type(exc).__name__, exc, REDIS_RETRY_SECONDS)
                time.sleep(REDIS_RETRY_SECONDS)
