"""An in-process RQ worker whose per-job bookkeeping is RQ's own, sent in two transactions.

RQ 3.0's ``SimpleWorker`` makes about 20 Redis round trips per job (bench/dispatch.py: 4.5 ms of a
no-op job's 6 ms of worker CPU): the worker's heartbeat (``HSET`` + 2 ``EXPIRE``) sent on its own
three times a job, the worker's state written on every change, one transaction to register the
execution and another to mark the job started, a separate job heartbeat when it ends, a ``WATCH``
and a read of the job's dependents before the success transaction.

:class:`BatchedSimpleWorker` keeps RQ's data model and calls RQ's own writers (``Execution.create``,
``Job.prepare_for_execution``, ``Job._handle_success``, ``cleanup_execution``), only batched:

- start: one transaction registers the execution (StartedJobRegistry), marks the job started,
  takes it off the intermediate queue and sets the worker busy (no window in which a job is
  registered but still ``queued``: see ``workers.worker.rescue_unstarted``), with whatever the
  worker's :attr:`~BatchedSimpleWorker.start_hook` adds (the delivery log's start of the attempt);
- success: one transaction saves the result, the finished registry, the worker's counters, drops
  the execution and sets the worker idle, with a heartbeat;
- heartbeats and ``rq suspend`` checks outside those at most every :data:`BEAT_SECONDS`.

Anything unusual takes RQ's own path unchanged: a failure (and its callback), a job returning
``Retry``, a success callback, repeats, a rate limit, or dependents (cvat-hooks' jobs have none of
these: ``workers.queueing.enqueue``; dependents are checked anyway, in the start transaction).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property
from typing import TYPE_CHECKING, Any

from rq import SimpleWorker
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import JobStatus, Retry
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import WorkerStatus

if TYPE_CHECKING:
    from redis.client import Pipeline
    from rq.job import Job
    from rq.queue import Queue

    from workers.settings import Recycle

log = logging.getLogger(__name__)

_deferred: ContextVar[list[Callable[[Pipeline], object]] | None] = ContextVar("cvat_hooks_deferred", default=None)
_begun: ContextVar[object | None] = ContextVar("cvat_hooks_begun", default=None)

StartHook = Callable[["Job", "Pipeline"], "Callable[[list[Any]], object] | None"]
"""Queues a job's own start writes on the worker's start transaction; returns what to call with
that transaction's results (None: nothing for this job). What that returns is the job's to take
(:func:`begun`)."""

JOB_BEAT_SECONDS = 15
"""While a job runs, :class:`Renewals` renews its registration (and the worker's) this often, for this + 60 s.
RQ's SimpleWorker registers a job for its whole time limit + 60 s instead, so when the whole worker
is killed (container stopped, node lost) RQ would deem the job abandoned only then; here, about a
minute and a quarter after the kill."""

RENEWAL_TICK_SECONDS = 1.0
"""How often :class:`Renewals` looks whether the running job is due (a renewal is at most this late)."""

BEAT_SECONDS = 5.0
"""Seconds between two worker heartbeats (or ``rq suspend`` checks) outside a job's transactions.
The worker's key lives ``worker_ttl + 60`` seconds (105 s here), so this only saves round trips."""


def defer(writes: Callable[[Pipeline], object]) -> bool:
    """Have the worker running this job send ``writes`` in the transaction that marks it finished
    (the delivery log's success: one round trip less per job, and the log says ``succeeded`` exactly
    when RQ says ``finished``). False when no batching worker runs the job: the caller sends them."""
    pending = _deferred.get()
    if pending is None:
        return False
    pending.append(writes)
    return True


def begun() -> object | None:
    """What the worker's start hook made of the running job's start (None: no batching worker, or
    the hook failed; the job then records its start itself)."""
    return _begun.get()


class BatchedSimpleWorker(SimpleWorker):
    """RQ's SimpleWorker with a job's start and its success each written in one transaction."""

    start_hook: StartHook | None = None
    recycle: Recycle | None = None
    """Limits after which the worker stops after a job, for its supervisor to replace it."""
    recycled: str | None = None
    """Why it stopped for that, once it has."""
    jobs_done = 0
    _beaten_at = float("-inf")
    _suspension_checked_at = float("-inf")

    @cached_property
    def renewals(self) -> Renewals:
        return Renewals(self)

    def teardown(self) -> None:
        self.renewals.stop()
        super().teardown()

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        """RQ's heartbeat; a plain one (default TTL, no pipeline) is skipped if one was sent lately."""
        if timeout is None and pipeline is None and time.monotonic() - self._beaten_at < BEAT_SECONDS:
            return
        super().heartbeat(timeout, pipeline)
        # A heartbeat with a job's long TTL must be followed by a plain one as soon as the job ends.
        self._beaten_at = time.monotonic() if timeout is None else float("-inf")

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        """RQ's set_state, without a round trip when the state does not change."""
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        """``rq suspend`` is checked at most every :data:`BEAT_SECONDS` (RQ: before every job)."""
        if time.monotonic() - self._suspension_checked_at < BEAT_SECONDS:
            return
        self._suspension_checked_at = time.monotonic()
        super().check_for_suspension(burst)

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run ``job`` here; then, if :attr:`recycle`'s limits are reached, stop (RQ's own stop
        exception: its loop ends as on a warm shutdown, with its teardown)."""
        self._execute(job, queue)
        self.jobs_done += 1
        if self.recycle is not None:
            self.recycled = self.recycle.due(self.jobs_done, rss_bytes())
            if self.recycled:
                self.log.info("Worker %s: recycling: %s", self.name, self.recycled)
                raise StopRequested()

    def _execute(self, job: Job, queue: Queue) -> None:
        """Run ``job`` here; RQ's own path for anything but a plain job that succeeds."""
        if job.success_callback is not None or job.repeats_left or job.has_rate_limit:
            super().execute_job(job, queue)
            return
        execution, has_dependents, begun_ = self._start(job, queue)
        pending: list[Callable[[Pipeline], object]] = []
        try:
            timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
            token, token_begun = _deferred.set(pending), _begun.set(begun_)
            try:
                with self.renewals.running(job, execution), \
                        self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id):
                    value = job.perform()
            finally:
                _deferred.reset(token)
                _begun.reset(token_begun)
            if has_dependents or isinstance(value, Retry):
                self._send(pending)
                self._finalize_success(job, queue, execution, value)
                self.set_state(WorkerStatus.IDLE)
            else:
                self._succeed(job, queue, execution, value, pending)
        except:  # noqa: E722 (as RQ's perform_job: whatever the job raised is the job's failure)
            self._finalize_failure(job, queue, execution, sys.exc_info())
            self.set_state(WorkerStatus.IDLE)

    def _start(self, job: Job, queue: Queue) -> tuple[Execution, bool, object | None]:
        """RQ's ``prepare_execution`` and ``prepare_job_execution`` in one transaction, with the start
        hook's writes; also whether the job has dependents (then its success takes RQ's path, which
        enqueues them), and what the hook made of its results."""
        ttl = _beat_ttl()  # renewed by self.renewals while the job runs
        with self.connection.pipeline() as pipe:
            finish = self._hook(job, pipe)
            hooked = len(pipe)
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
            self.executions[execution.id] = execution
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.heartbeat(ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)  # sets last_heartbeat (RQ: a job.heartbeat too)
            pipe.persist(job.key)
            if len(self.queues) == 1:  # RQ dequeued it through its intermediate queue (LMOVE)
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                # RQ's maintenance may have stamped it "first seen" in that instant; a stamp left
                # behind would make the same job look stuck for a minute when it passes again (a
                # retry keeps its id), and be put back while a worker is starting it.
                pipe.delete(queue.intermediate_queue.get_first_seen_key(job.id))
            pipe.exists(job.dependents_key)
            results = pipe.execute(raise_on_error=False)
        for result in results[hooked:]:  # RQ's own: as RQ would, raise (the hook's are the hook's)
            if isinstance(result, Exception):
                raise result
        began: object | None = None
        if finish is not None:
            try:
                began = finish(results)
            except Exception as exc:  # the job records its start itself
                log.warning("worker %s: job %s: its start writes failed: %s", self.name, job.id, exc)
        self.procline(f"Processing {job.func_name} from {job.origin} since {time.time()}")
        return execution, bool(results[-1]), began

    def _hook(self, job: Job, pipe: Pipeline) -> Callable[[list[Any]], object] | None:
        """The start hook's writes queued on ``pipe``, or None (no hook, or it failed: logged)."""
        if self.start_hook is None:
            return None
        try:
            return self.start_hook(job, pipe)
        except Exception as exc:
            log.warning("worker %s: job %s: could not prepare its start writes: %s", self.name, job.id, exc)
            return None

    def _send(self, pending: list[Callable[[Pipeline], object]]) -> None:
        """Send deferred writes in a transaction of their own (before RQ's own success path)."""
        if pending:
            with self.connection.pipeline() as pipe:
                for writes in pending:
                    writes(pipe)
                pipe.execute()

    def _succeed(self, job: Job, queue: Queue, execution: Execution, value: Any,
                 pending: list[Callable[[Pipeline], object]]) -> None:
        """RQ's ``handle_job_success`` for a job without dependents, the job's deferred writes, and the
        worker going idle, in one transaction. A command that fails in it is logged, not raised: the
        rest has been applied (Redis does not roll back), so the job must not be failed and retried."""
        job.ended_at = now()
        job._result = value
        job._status = JobStatus.FINISHED
        result_ttl = job.get_result_ttl(self.default_result_ttl)
        with self.connection.pipeline() as pipe:
            self.increment_successful_job_count(pipeline=pipe)
            self.increment_total_working_time(job.ended_at - job.started_at, pipe)  # type: ignore[operator]
            if result_ttl != 0:
                job._handle_success(result_ttl, pipeline=pipe, worker_name=self.name, execution_id=execution.id,
                                    execution_started_at=execution.created_at, execution_ended_at=job.ended_at)
            job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            self.heartbeat(pipeline=pipe)
            for writes in pending:
                writes(pipe)
            results = pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                log.warning("worker %s: job %s finished, but one of its writes failed: %s", self.name, job.id,
                            result)
        job.send_webhooks(JobStatus.FINISHED)
        self.log.debug("Worker %s: %s: Job OK (%s)", self.name, job.origin, job.id)


class Renewals:
    """Renews the running job's registration (and the worker's) every :data:`JOB_BEAT_SECONDS`.

    One thread per worker, which looks every :data:`RENEWAL_TICK_SECONDS` whether a renewal is due:
    a thread started and joined per job cost about 0.4 ms of CPU, a tenth of a no-op job's
    (bench/README.md). The lock makes a job's end wait for a renewal in flight, so none is sent for
    a job that has ended (RQ's ``ZADD XX`` would not re-register it, but the execution's hash would
    be written again).
    """

    def __init__(self, worker: BatchedSimpleWorker) -> None:
        self._worker = worker
        self._lock = threading.Lock()
        self._running: tuple[Job, Execution] | None = None
        self._due = 0.0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def running(self, job: Job, execution: Execution) -> Iterator[None]:
        """While inside, ``job`` is renewed."""
        if self._thread is None or not self._thread.is_alive():
            self._stopped.clear()
            self._thread = threading.Thread(target=self._loop, name=f"renewals-{self._worker.name}", daemon=True)
            self._thread.start()
        with self._lock:
            self._running, self._due = (job, execution), time.monotonic() + JOB_BEAT_SECONDS
        try:
            yield
        finally:
            with self._lock:
                self._running = None

    def stop(self) -> None:
        """End the thread (the worker is done)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stopped.wait(min(RENEWAL_TICK_SECONDS, JOB_BEAT_SECONDS / 2)):
            with self._lock:
                if self._running is None or time.monotonic() < self._due:
                    continue
                job, execution = self._running
                self._due = time.monotonic() + JOB_BEAT_SECONDS
                try:
                    with self._worker.connection.pipeline() as pipe:
                        self._worker.heartbeat(_beat_ttl(), pipeline=pipe)
                        execution.heartbeat(job.started_job_registry, _beat_ttl(), pipe)
                        pipe.execute()
                except Exception as exc:  # Redis away for a moment: the next beat may reach it
                    log.warning("worker %s: could not renew job %s: %s", self._worker.name, job.id, exc)


def rss_bytes() -> int:
    """This process's resident memory now (Linux), or its peak where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _beat_ttl() -> int:
    """Seconds a renewal keeps a running job registered (Redis wants whole seconds)."""
    return math.ceil(JOB_BEAT_SECONDS) + 60
