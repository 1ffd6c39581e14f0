"""``cvat-hooks worker`` stops promptly on SIGTERM, as container runtimes and supervisors expect.

redis-py 8.2's ``PubSubWorkerThread.stop()`` joins the thread that RQ runs with ``sleep_time=60``: when
RQ's unsubscribe reply is read before the stop flag is set, the join waits out the 60 s (a race, seen
in about half the runs elsewhere, which is why pyproject caps redis-py below 8.2). This checks the
outcome users see, for every worker class.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from rq import Worker
from rq.scheduler import RQScheduler

from core.contract import QUEUES
from core.settings import DEFAULT_LIGHT_PROCESSES
from tests.conftest import ROOT, SECRET
from tests.procs import RedisProc, WorkerProc, alive, kill_pids, scheduler_pids, wait_for
from workers.supervisor import plan

STOP_SECONDS = 10.0
"""How long a worker may take to stop after SIGTERM."""


def worker_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    """A worker's environment on ``redis_url``, with the shipped rules copied into ``tmp_path``."""
    rules = tmp_path / "rules.yaml"
    shutil.copy(ROOT / "rules.yaml", rules)
    return {"CVAT_HOOKS_REDIS_URL": redis_url, "CVAT_HOOKS_SECRET": SECRET, "CVAT_HOOKS_RULES": str(rules),
            "CVAT_HOOKS_DATA_DIR": str(tmp_path / "data")}


@pytest.mark.parametrize("kind", ["split", "fork", "simple"])
def test_a_worker_stops_within_seconds_of_sigterm(kind: str, redis_server, redis, tmp_path: Path):
    """SIGTERM to an idle worker (``redis``: an empty database): it exits by itself, well before
    anyone would SIGKILL it, and none of its processes (its scheduler's included) outlives it."""
    worker = WorkerProc(worker_env(redis_server.url, tmp_path), tmp_path / "logs", kind=kind).start()
    assert wait_for(lambda: len(worker.tree()) > 1, timeout=10), "no scheduler process started"
    pids = worker.tree()
    left: list[int] = []
    try:
        started = time.monotonic()
        worker.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = worker.popen.wait(timeout=60)  # type: ignore[union-attr]
        took = time.monotonic() - started
        left = [pid for pid in pids if alive(pid)]
    finally:
        worker.stop(timeout=1)
        kill_pids([pid for pid in left if alive(pid)])
    assert left == [], f"{kind} worker left processes running"
    assert took < STOP_SECONDS, f"{kind} worker took {took:.1f} s to stop:\n{worker.log_text()[-2000:]}"
    # 0 after a warm shutdown; -SIGTERM when the signal came before RQ installed its handlers (the
    # default action: a prompt stop too). Anything else is a crash.
    assert code in (0, -signal.SIGTERM), (code, worker.log_text()[-2000:])



@pytest.mark.parametrize("kind", ["split", "fork", "simple"])
def test_a_worker_asked_to_stop_while_redis_is_away_stops(kind: str, tmp_path: Path):
    """SIGTERM while Redis does not answer: RQ's teardown then fails on Redis, and the worker must
    still stop (exit 0, nothing left running) rather than start a new worker that waits for Redis
    until someone SIGKILLs it, leaving that worker's scheduler behind."""
    redis = RedisProc(tmp_path / "redis", tmp_path / "logs").start()
    worker = WorkerProc(worker_env(redis.url, tmp_path), tmp_path / "logs", kind=kind).start()
    left: list[int] = []
    try:
        assert wait_for(lambda: len(worker.tree()) > 1, timeout=10), "no scheduler process started"
        redis.kill()
        time.sleep(1.5)  # the worker's and the scheduler's next calls meet Redis gone
        pids = worker.tree()
        worker.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = worker.popen.wait(timeout=60)  # type: ignore[union-attr]
        assert wait_for(lambda: not any(alive(pid) for pid in pids), timeout=STOP_SECONDS), \
            worker.log_text()[-3000:]
        left = [pid for pid in pids if alive(pid)]
    finally:
        worker.stop(timeout=1)
        kill_pids([pid for pid in left if alive(pid)])
        redis.kill()
    assert code == 0, (code, worker.log_text()[-3000:])
    assert "starting a new worker" not in worker.log_text(), worker.log_text()[-3000:]


@pytest.mark.parametrize("kind", ["split", "fork", "simple"])
def test_nothing_outlives_a_worker_whose_main_process_is_killed_alone(kind: str, redis_server, redis,
                                                                      tmp_path: Path):
    """The worker's main process SIGKILLed alone (what ``os._exit`` in a simple worker's action does,
    or the OOM killer to a split worker's parent): nothing it started may live on as an orphan. Its
    scheduler, which waits out Redis failures, stops within seconds and releases its locks for the
    next worker's scheduler; a split worker's children stop as on SIGTERM (RQ's warm shutdown: each
    unregisters itself), with nobody left to restart them or hand their jobs to RQ."""
    worker = WorkerProc(worker_env(redis_server.url, tmp_path), tmp_path / "logs", kind=kind).start()
    pids: list[int] = []
    try:
        assert wait_for(lambda: "Acquired scheduler lock" in worker.log_text(), timeout=20), worker.log_text()
        pids = worker.tree()
        main, started = pids[0], pids[1:]
        scheduler = scheduler_pids(worker.log_text()) if kind == "split" else started
        assert scheduler and set(scheduler) <= set(started), (scheduler, pids, worker.log_text()[-3000:])
        if kind == "split":
            # The shipped plan's children, and the scheduler's.
            assert len(started) == len(plan(QUEUES, DEFAULT_LIGHT_PROCESSES)) + 1, (started, worker.log_text()[-3000:])
        assert Worker.count(connection=redis) >= 1
        os.kill(main, signal.SIGKILL)
        worker.popen.wait(timeout=10)  # type: ignore[union-attr]
        assert wait_for(lambda: not any(alive(pid) for pid in started), timeout=STOP_SECONDS), \
            ([pid for pid in started if alive(pid)], worker.log_text()[-3000:])
        locks = [RQScheduler.get_locking_key(q) for q in QUEUES]
        assert wait_for(lambda: not redis.exists(*locks), timeout=5), worker.log_text()[-3000:]
        if kind == "split":
            assert Worker.count(connection=redis) == 0, worker.log_text()[-3000:]
        else:  # the main process was the RQ worker: its registration is left for RQ's cleanup
            assert "is gone; stopping" in worker.log_text(), worker.log_text()[-3000:]
    finally:
        kill_pids([pid for pid in pids if alive(pid)])
        worker.stop(timeout=1)


def test_a_child_whose_parent_died_before_it_asked_stops_at_once(tmp_path: Path):
    """``stop_with_parent`` called after the parent is already gone (the race the kernel's signal
    cannot cover) stops the child as that signal would have, instead of leaving it to serve on."""
    import subprocess
    import sys

    script = tmp_path / "orphan.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from workers.supervisor import stop_with_parent\n"
        "parent = os.getpid()\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "if os.fork():\n"
        "    os._exit(0)\n"
        "while os.getppid() == parent:\n"
        "    time.sleep(0.01)\n"
        "print(os.getpid(), flush=True)\n"
        "assert stop_with_parent(parent)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})\n"
        "time.sleep(30)\n"
        "print('served on', flush=True)\n")
    with subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.wait(timeout=10) == 0
        orphan = int(proc.stdout.readline())  # type: ignore[union-attr]
        try:
            assert wait_for(lambda: not alive(orphan), timeout=5)
        finally:
            kill_pids([orphan] if alive(orphan) else [])
        assert "served on" not in proc.stdout.read()  # type: ignore[union-attr]
