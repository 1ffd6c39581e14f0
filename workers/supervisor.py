"""``cvat-hooks worker``'s default setup: light actions and exports each in-process in a child of
their own, under a parent that restarts either child when it dies and hands the jobs it had started
back to RQ.

Why: RQ's forking worker spends a fork and its monitoring on every job (bench/dispatch.py: 28 ms of
CPU for a no-op, against 4 ms in-process), which light actions (label checks, notifications, job
updates: a few HTTP calls) cannot afford. An export forked per job costs little time, but the
work-horse's copy of its parent's pages shows in the memory the worker is charged for (bench/:
+67 MB RSS for any export, 5 MB or 500 MB); in-process, an export costs what it buffers. Exports
keep a child of their own, so a long one cannot hold up label checks, and one that crashes or is
killed for its memory takes nothing else with it.

What a crashing action takes down (segfault, ``os._exit``, the OOM killer), and how it is recovered:

- an action runs in a child of its queue (``light`` for ``cvat-hooks-actions``: one, or
  ``CVAT_HOOKS_LIGHT_PROCESSES``; ``exports`` for ``cvat-hooks-exports``), one at a time in each
  child: a crash ends that child and the one action it was running, nothing else (jobs still queued
  are in Redis; the other children go on). The parent sees it exit at once (``waitpid``), passes
  the jobs that child had started (its RQ execution index) to RQ's own
  abandoned-job handling right away (``StartedJobRegistry.cleanup``: our failure callback writes
  ``AbandonedJobError`` to the delivery log, then RQ retries the job after the rule's retry delay,
  or moves it to the failed registry), and forks a new child, which inherits the parent's imports
  and starts in milliseconds. (RQ alone would retry it only once it deems it abandoned, when the
  job's registration runs out: up to 75 s later);
- the parent runs no job code; if it is killed with the children (the container), RQ's maintenance
  in any live worker (or the restarted one) retries their jobs once RQ deems them abandoned: about
  75 s after the kill (``workers.inprocess.JOB_BEAT_SECONDS``).

A child also ends on its own, after the action that brings it to its recycling limits (memory, or a
number of jobs: ``WorkerSettings.recycle``), with exit code :data:`RECYCLED`; the parent starts a
fresh one at once. It still looks for jobs to hand over, and finds none, since none was running
(unless an action itself exited with that code).

A child that dies while Redis does not answer (it cannot dequeue, nor record anything) is restarted
once Redis answers again; the parent waits for it rather than restarting the child every second.

A job a child had taken off its queue but not yet started when it died (a window of one round trip,
in which no action code runs) is put back on its queue by a live worker's maintenance
(``workers.worker.requeue_stuck``, a minute or two later) rather than here: the parent cannot tell
it from a job another worker just took.
"""

from __future__ import annotations

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

from workers.contract import EXPORT_QUEUE, QUEUES
from workers.settings import WorkerSettings

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

RECYCLED = 75
"""A child's exit code when it stopped at its recycling limits (``WorkerSettings.recycle``) to be
replaced at once (EX_TEMPFAIL, which cvat-hooks uses for nothing else)."""

RESTART_PAUSE = 1.0
"""Seconds to wait before restarting a child that died within that long of its start (a crash loop),
so the parent does not fork as fast as it can."""
REDIS_WAIT_MAX = 15.0
"""Longest pause between two pings while the parent waits for an unreachable Redis."""


@dataclass
class Child:
    """One worker process of the setup (an in-process :class:`workers.worker.InProcessWorker`): which
    queues it serves, and its current incarnation."""

    role: str
    queues: tuple[str, ...]
    pid: int = 0
    name: str = ""
    started: float = 0.0


def plan(queues: Sequence[str], light_processes: int = 1) -> list[Child]:
    """The children for ``queues``: exports in one, every other queue in ``light_processes`` others,
    all in-process."""
    light = tuple(q for q in queues if q != EXPORT_QUEUE)
    heavy = tuple(q for q in queues if q == EXPORT_QUEUE)
    children = [Child("light", light) for _ in range(light_processes)] if light else []
    return children + ([Child("exports", heavy)] if heavy else [])


def recover(redis: Redis, worker_name: str, queues: Sequence[str]) -> list[str]:
    """Hand the jobs a dead in-process worker had started to RQ's abandoned-job handling now.

    The worker ran its jobs in its own process, which is gone: they are certainly not running. Their
    StartedJobRegistry entries (those whose RQ execution names ``worker_name``, or a successor of it
    that :func:`workers.worker.run` started in the same process: ``<name>.<n>``) are marked expired,
    then RQ's own cleanup treats them as it treats any abandoned job: our failure callback, then
    ``job.retry`` or the failed registry. Returns the job ids handed over.
    """
    from rq.registry import StartedJobRegistry

    from workers.queueing import queue
    from workers.worker import rescue_unstarted

    handed: list[str] = []
    for name in queues:
        q = queue(name, redis)
        registry = StartedJobRegistry(queue=q)
        entries = [e.decode() if isinstance(e, bytes) else str(e) for e in redis.zrange(registry.key, 0, -1)]
        with redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.hget(f"rq:execution:{entry}", "worker_name")
            owners = [(o or b"").decode() for o in pipe.execute()]
        mine = [e for e, owner in zip(entries, owners, strict=True)
                if owner == worker_name or owner.startswith(worker_name + ".")]
        if not mine:
            continue
        redis.zadd(registry.key, {e: 0 for e in mine}, xx=True)
        rescue_unstarted(q)
        registry.cleanup()
        handed += [e.split(":", 1)[0] for e in mine]
    for job_id in handed:
        log.warning("worker: job %s was running in worker %s, which died; handed to RQ's retry", job_id,
                    worker_name)
    return handed


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

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            from workers.redis_conn import connect

            self._redis = connect(self.settings.redis_url)
        return self._redis

    def spawn(self, child: Child) -> None:
        """Fork ``child``: its own process group (a terminal's Ctrl-C reaches the parent only, which
        passes it on once; RQ would take a second signal as a cold shutdown)."""
        child.name = f"{socket.gethostname()}.{os.getpid()}.{child.role}.{uuid.uuid4().hex[:8]}"
        child.started = time.monotonic()
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # a stop must not reach the child's copy of our handler
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.setpgrp()
                for sig in stops:
                    signal.signal(sig, signal.SIG_DFL)
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
        down. Said once; pings back off to :data:`REDIS_WAIT_MAX` seconds apart."""
        pause, since = RESTART_PAUSE, time.monotonic()
        while not self.stopping:
            try:
                self.redis.ping()
            except RedisError as exc:
                if pause == RESTART_PAUSE:
                    log.warning("worker: Redis does not answer (%s); children restart once it does",
                                type(exc).__name__)
                self._pause(pause)
                pause = min(pause * 2, REDIS_WAIT_MAX)
                continue
            if pause > RESTART_PAUSE:
                log.info("worker: Redis answers again after %.0f s; restarting children", time.monotonic() - since)
            return

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake for a stop (the signal handler sets ``stopping``)."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _bury(self, child: Child, pid: int, code: int) -> None:
        """After a child ended: stop what it left in its process group (RQ's scheduler process, which
        holds the scheduler lock the next child needs), and unless it exited 0, hand the jobs it had
        started (in-process: certainly not running any more) to RQ's retry (first: a retry must not
        wait for the rest). Never raises: the parent must go on supervising."""
        if code != 0:  # after a real recycle this finds nothing; an action's own exit 75 is still caught
            try:
                recover(self.redis, child.name, child.queues)
            except Exception as exc:
                log.error("worker %s: could not hand its jobs to RQ's retry (RQ will, once it deems them "
                          "abandoned): %s", child.name, exc)
        stop_group(pid)


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
    """The default ``cvat-hooks worker``: a supervising parent of :func:`plan`'s children."""
    from workers import worker

    worker.preload()  # once, here: every child (and every restarted one) starts with it

    def run_child(child: Child) -> int:
        try:
            worker.run(settings, burst=burst, queues=child.queues, kind="simple", name=child.name,
                       recycle=settings.recycle)
        except worker.Recycled:
            return RECYCLED
        return 0

    children = plan(queues, settings.light_processes)
    supervisor = Supervisor(settings, children, burst=burst, run_child=run_child)
    supervisor.redis  # noqa: B018 (a bad Redis URL is the user's error, said once here, not by each child)
    if at_start is not None and not burst:
        at_start(supervisor.redis)
    return supervisor.run()
