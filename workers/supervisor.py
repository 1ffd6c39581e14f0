"""``cvat-hooks worker``'s default setup: each queue group in-process in a child of its own (RQ's
``SimpleWorker``), and RQ's scheduler in one more, under a parent that restarts a child when it dies
and hands the jobs it had taken back to RQ at once.

Why: RQ's forking worker spends a fork and its monitoring on every job (bench/dispatch.py: several
times the CPU of a no-op run in-process), which light actions (label checks, notifications, job
updates: a few HTTP calls) cannot afford. A long action forked per job costs little time, but the
work-horse's copy of its parent's pages shows in the memory the worker is charged for (bench/:
+67 MB RSS for any export); in-process, an export costs what it buffers. Each long-running queue
(``core.contract.OWN_PROCESS_QUEUES``: exports, auto-annotation) keeps a child of its own, so a
long action cannot hold up label checks, and one that crashes or is killed for its memory takes
nothing else with it.

What a crashing action takes down (segfault, ``os._exit``, the OOM killer), and how it is recovered:

- an action runs in a child of its queue (``light`` for ``cvat-hooks-actions``:
  ``CVAT_HOOKS_LIGHT_PROCESSES``, two by default; one for each long-running queue), one at a time in each child: a
  crash ends that child and the one action it was running, nothing else (jobs still queued are in
  Redis; the other children go on). The parent sees it exit at once (``waitpid``) and hands what
  that child had taken to RQ right away (``workers.rq_gaps.hand_over``): a started job to RQ's own
  abandoned-job handling (our failure callback writes ``AbandonedJobError`` to the delivery log,
  then RQ retries the job after the rule's retry delay, or moves it to the failed registry), one
  not yet started back to its queue. Then it forks a new child, which inherits the parent's imports
  and starts in milliseconds. (RQ alone would retry the job only once it deems it abandoned, when
  its registration runs out: up to 75 s later);
- the parent runs no job code; if it is killed with the children (the container), RQ's maintenance
  in any live worker (or the restarted one) retries their jobs once RQ deems them abandoned: about
  75 s after the kill (``workers.worker.JOB_MONITORING_SECONDS`` + 60). Killed alone, it takes
  its children with it (:func:`stop_with_parent`): each stops as on SIGTERM, after the action it is
  running, so none serves on unsupervised.

A child also ends on its own, after the action that brings it to its recycling limits (memory, or a
number of jobs: ``WorkerSettings.recycle``), with exit code :data:`RECYCLED`; the parent starts a
fresh one at once.

RQ's scheduler (delayed retries, the periodic reconcile) runs in a child of its own rather than in
each worker. RQ's ends on a Redis error (rq/rq#2189), and RQ's workers restart theirs only at their
next maintenance round (30 s here), which left delayed retries waiting 7-38 s after a Redis
failover; this child runs ``workers.rq_gaps.WorkerScheduler``, as fork and simple workers do, which
waits for Redis instead and goes on within a second of its answer, under the same name, so it
refreshes its own lock rather than waiting for it to expire.

A child that dies while Redis does not answer (it cannot dequeue, nor record anything) is restarted
once Redis answers again; the parent waits for it rather than restarting the child every second.

A job a child had taken off its queue but not registered when it died (a window of one round trip,
in which no action code runs) is put back on its queue by a live worker's maintenance
(``workers.rq_gaps.requeue_stuck``, a minute or two later) rather than here: the parent cannot tell
it from a job another worker just took.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from core.contract import OWN_PROCESS_QUEUES, QUEUE_PREFIX, QUEUES
from core.settings import WorkerSettings

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

RECYCLED = 75
"""A child's exit code when it stopped at its recycling limits (``WorkerSettings.recycle``) to be
replaced at once (EX_TEMPFAIL, which cvat-hooks uses for nothing else)."""

PR_SET_PDEATHSIG = 1
"""Linux's ``prctl`` option: the signal the kernel sends a process when its parent dies."""

RESTART_PAUSE = 1.0
"""Seconds to wait before restarting a child that died within that long of its start (a crash loop),
so the parent does not fork as fast as it can."""
REDIS_WAIT_MAX = 2.0
"""Longest pause between two pings while the parent waits for an unreachable Redis (a ping is cheap;
children, the scheduler first, restart within this long of Redis answering again)."""


@dataclass
class Child:
    """One worker process of the setup (an in-process :class:`workers.worker.InProcessWorker`): which
    queues it serves, and its current incarnation."""

    role: str
    queues: tuple[str, ...]
    pid: int = 0
    name: str = ""
    started: float = 0.0


def plan(queues: Sequence[str], light_processes: int) -> list[Child]:
    """The children for ``queues``: each long-running queue (exports, auto-annotation) in one of its
    own, every other queue in ``light_processes`` others, all in-process."""
    light = tuple(q for q in queues if q not in OWN_PROCESS_QUEUES)
    children = [Child("light", light) for _ in range(light_processes)] if light else []
    return children + [Child(q.removeprefix(f"{QUEUE_PREFIX}-"), (q,)) for q in queues if q in OWN_PROCESS_QUEUES]


def recover(redis: Redis, worker_name: str, queues: Sequence[str]) -> list[str]:
    """Hand the jobs a dead in-process worker had taken back to RQ now (``workers.rq_gaps.hand_over``):
    it ran them in its own process, which is gone, so they are certainly not running. Those it had
    started go through RQ's abandoned-job handling (our failure callback, then ``job.retry`` or the
    failed registry), those it had not yet started back on their queue. Returns the job ids handed
    to RQ."""
    from core.queueing import queue
    from workers.rq_gaps import hand_over
    from workers.worker import UNSTARTED, note_requeued

    handed: list[str] = []
    for name in queues:
        q = queue(name, redis)
        put_back, started = hand_over(q, worker_name)
        note_requeued(q, put_back, UNSTARTED)
        handed += started
    for job_id in handed:
        log.warning("worker: job %s was running in worker %s, which died; handed to RQ's retry", job_id,
                    worker_name)
    return handed


SCHEDULER = "scheduler"
"""The role of the child that runs RQ's scheduler (delayed retries, the periodic reconcile)."""


def run_scheduler(settings: WorkerSettings, queues: Sequence[str], name: str) -> int:
    """The scheduler child: RQ's scheduler loop, waiting out Redis failures
    (``workers.rq_gaps.WorkerScheduler``), until stopped (0)."""
    from core.queueing import SERIALIZER
    from core.redis_conn import connect
    from workers.rq_gaps import WorkerScheduler

    # Held while the scheduler runs: RQ's scheduler makes its connections from this one's settings,
    # which for Sentinel refer back to this connection's pool.
    redis = connect(settings.redis_url)
    WorkerScheduler(queues, redis, name=name, serializer=SERIALIZER).work()
    return 0


class Supervisor:
    """Forks the children of :func:`plan`, restarts them when they die, stops them when asked."""

    def __init__(self, settings: WorkerSettings, children: list[Child], *, burst: bool,
                 run_child: Callable[[Child], int]) -> None:
        self.settings = settings
        self.children = children
        self.burst = burst
        self.run_child = run_child
        self.stopping = False
        self._redis: Redis | None = None
        self.redis_down_since: float | None = None
        """When the parent found Redis not answering (None: it answers, as far as it knows)."""

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            from core.redis_conn import connect

            self._redis = connect(self.settings.redis_url)
        return self._redis

    def spawn(self, child: Child) -> None:
        """Fork ``child``: its own process group (a terminal's Ctrl-C reaches the parent only, which
        passes it on once; RQ would take a second signal as a cold shutdown). The scheduler keeps
        its name across restarts (its lock is held under it)."""
        unique = "" if child.role == SCHEDULER else f".{uuid.uuid4().hex[:8]}"
        child.name = f"{socket.gethostname()}.{os.getpid()}.{child.role}{unique}"
        child.started = time.monotonic()
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # a stop must not reach the child's copy of our handler
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.setpgrp()
                for sig in stops:
                    signal.signal(sig, signal.SIG_DFL)
                stop_with_parent(parent)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
                code = self.run_child(child)
            except SystemExit as exc:  # RQ's cold shutdown
                code = exc.code if isinstance(exc.code, int) else 0
            except BaseException:
                log.exception("worker %s: stopped on an error", child.name)
            finally:
                logging.shutdown()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        child.pid = pid
        log.info("worker: started %s worker %s (pid %d) for %s", child.role, child.name, pid, ", ".join(child.queues))

    def forward(self, signum: int, frame: object) -> None:
        """SIGTERM or SIGINT: pass it to every child once per signal (RQ: warm, then cold shutdown)."""
        self.stopping = True
        for child in self.children:
            if child.pid:
                try:
                    os.kill(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        """Until every child has stopped (asked to, or done in burst mode); 0 if all of them ended well."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.forward)
        for child in self.children:
            self.spawn(child)
        failed = False
        while any(c.pid for c in self.children):
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            found = next((c for c in self.children if c.pid == pid), None)
            if found is None:
                continue  # an orphan reparented to us (we may be PID 1 in a container): reaped
            child, found.pid = found, 0
            code = os.waitstatus_to_exitcode(status)
            self._bury(child, pid, code)
            # A burst is one pass (what a crash left is retried by RQ), but a recycled child's queue is not done.
            if self.stopping or (self.burst and code != RECYCLED):
                # Asked to stop, a child that had not yet installed RQ's handlers ends by SIGTERM's
                # default action: stopped as asked, not failed.
                stopped = self.stopping and code == -signal.SIGTERM
                failed = failed or (code not in (0, RECYCLED) and not stopped)
                continue
            if code == RECYCLED:
                log.info("worker %s (%s) stopped at its recycling limits; starting a fresh one", child.name,
                         child.role)
            else:
                log.error("worker %s (%s) died (exit %s); restarting it", child.name, child.role, code)
                if time.monotonic() - child.started < RESTART_PAUSE:
                    self._pause(RESTART_PAUSE)
                self._wait_for_redis()
            if not self.stopping:
                self.spawn(child)
        return 1 if failed else 0

    def _wait_for_redis(self) -> None:
        """Hold a restart while Redis does not answer: a child started now would die at once (it
        cannot register or dequeue), a crash loop logging a death a second for as long as Redis is
        down. Said once per outage; pings back off to :data:`REDIS_WAIT_MAX` seconds apart."""
        pause = RESTART_PAUSE
        while not self.stopping:
            try:
                self.redis.ping()
            except RedisError as exc:
                if self.redis_down_since is None:
                    self.redis_down_since = time.monotonic()
                    log.warning("worker: Redis does not answer (%s); children restart once it does",
                                type(exc).__name__)
                self._pause(pause)
                pause = min(pause * 2, REDIS_WAIT_MAX)
                continue
            if self.redis_down_since is not None:
                log.info("worker: Redis answers again after %.0f s; restarting children",
                         time.monotonic() - self.redis_down_since)
                self.redis_down_since = None
            return

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake for a stop (the signal handler sets ``stopping``)."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _bury(self, child: Child, pid: int, code: int) -> None:
        """After a child ended: unless it exited 0 or ran the scheduler, hand the jobs it had taken
        (in-process: certainly not running any more) to RQ (first: a retry must not wait for the
        rest; after a recycle this finds nothing), then stop what it left in its process group.
        Never raises: the parent must go on supervising."""
        if code != 0 and child.role != SCHEDULER:
            try:
                recover(self.redis, child.name, child.queues)
            except Exception as exc:
                log.error("worker %s: could not hand its jobs to RQ's retry (RQ will, once it deems them "
                          "abandoned): %s", child.name, exc)
        stop_group(pid)


def stop_with_parent(parent: int) -> bool:
    """Have the kernel send this child SIGTERM, the stop its parent would pass on, when ``parent``
    dies (``PR_SET_PDEATHSIG``): a parent killed alone (SIGKILL, the OOM killer) must not leave
    children serving on with nobody to restart them, hand their jobs to RQ or stop them. A parent
    already gone before the call gets the same stop at once. Where the kernel has no such call
    (not Linux), nothing happens: ``False``."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def stop_group(pgid: int, timeout: float = 2.0) -> None:
    """SIGTERM what is left of a dead child's process group, and wait a little for it to go."""
    if pgid <= 0:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except OSError:
            return
        time.sleep(0.02)


def run(settings: WorkerSettings, *, burst: bool = False, queues: Sequence[str] = QUEUES,
        at_start: Callable[[Redis], object] | None = None) -> int:
    """The default ``cvat-hooks worker``: a supervising parent of :func:`plan`'s children and, unless
    ``burst`` (each child then enqueues the due delayed jobs once, as RQ's burst mode does), of the
    scheduler's."""
    from workers import worker

    worker.preload()  # once, here: every child (and every restarted one) starts with it
    codes = {worker.Ended.STOPPED: 0, worker.Ended.RECYCLED: RECYCLED, worker.Ended.FAILED: 1}

    def run_child(child: Child) -> int:
        if child.role == SCHEDULER:
            return run_scheduler(settings, child.queues, child.name)
        built = worker.build_worker(settings, queues=child.queues, kind="simple", name=child.name,
                                    recycle=settings.recycle)
        return codes[worker.work(built, burst=burst, with_scheduler=burst)]

    children = plan(queues, settings.light_processes)
    if not burst:
        children.append(Child(SCHEDULER, tuple(queues)))
    supervisor = Supervisor(settings, children, burst=burst, run_child=run_child)
    supervisor.redis  # noqa: B018 (a bad Redis URL is the user's error, said once here, not by each child)
    if at_start is not None and not burst:
        at_start(supervisor.redis)
    return supervisor.run()
