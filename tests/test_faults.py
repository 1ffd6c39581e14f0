"""Faults with real processes: redis-server, ``cvat-hooks serve`` (gunicorn) and ``cvat-hooks worker``
processes SIGKILLed and restarted by PID (``tests.procs``), against the test CVAT server over HTTP.

What each test proves is the promise of issue 6 for one fault: every delivery acknowledged leads to
its actions exactly once in effect, and a failure that cannot be recovered automatically is visible
and can be replayed. ``test_journal.py`` (Redis down while deliveries arrive), ``test_end_to_end.py``
(503 retried, 404 permanent, duplicates exported once, replay) and ``test_reconcile.py`` already
cover what they cover; nothing here repeats them.

RQ decides that a job whose worker died is abandoned when its entry in the StartedJobRegistry
expires: the worker's heartbeat keeps it ``min(job timeout, job_monitoring_interval) + 60`` seconds
ahead (90 s with RQ's defaults; the ``+ 60`` is fixed in RQ 3.0). A dead scheduler's lock lasts
61 s. Rather than wait that long, the tests that kill a whole worker move those two clocks on
(:func:`age_dead_worker`): the registry entry's score and the lock's TTL, nothing else; everything
after that is RQ's own maintenance in the new worker process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.executions import Execution
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.scheduler import RQScheduler

from core.contract import EXPORT_QUEUE, LIGHT_QUEUE, QUEUES
from core.delivery_log import DeliveryLog
from core.events import delivery_id_of
from core.queueing import queue
from core.settings import DEFAULT_LIGHT_PROCESSES, WorkerSettings
from receiver.app import create_app
from receiver.settings import Settings
from tests.conftest import SECRET, capture, signed
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer, jsonb_order
from tests.cvat_server import exports as cvat_exports
from tests.procs import ReceiverProc, RedisProc, WorkerProc, children, clean_env, cli_argv, scheduler_pids, wait_for
from workers import rq_gaps
from workers.supervisor import plan

MAINTENANCE_SECONDS = 1
"""RQ maintenance interval of the workers here (30 s by default): how soon a running worker retries
a dead worker's abandoned job and takes over its scheduler."""

EXPORT_RULE = """
  - id: export-finished-jobs
    on: update:job
    if: {job.state: {became: completed}, job.stage: acceptance}
    do:
      - action: export
        resource: job
        format: CVAT for images 1.1
        to: exports/{project_id}/{task_id}/job-{job_id}.zip
    retry: {attempts: 2, backoff: [1]}
"""


@dataclass
class Stack:
    """One test's world: its Redis (AOF, fsync always), the test CVAT server, rules, and processes."""

    tmp: Path
    redis: RedisProc
    cvat: CvatTestServer
    rules: Path
    procs: list[Any] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    @property
    def env(self) -> dict[str, str]:
        """What every cvat-hooks process of this stack reads."""
        return {"CVAT_HOOKS_REDIS_URL": self.redis.url, "CVAT_HOOKS_SECRET": SECRET,
                "CVAT_HOOKS_RULES": str(self.rules), "CVAT_HOOKS_DATA_DIR": str(self.data_dir),
                "CVAT_URL": self.cvat.url, "CVAT_ACCESS_TOKEN": DEFAULT_TOKEN,
                "CVAT_HOOKS_CVAT_POLL_SECONDS": "0.1", "CVAT_HOOKS_RECONCILE_MINUTES": "0",
                "CVAT_HOOKS_WORKER_MAINTENANCE_SECONDS": str(MAINTENANCE_SECONDS)}

    def set_rules(self, rules: str) -> None:
        self.rules.write_text("version: 1\nrules:\n" + rules)

    def worker(self, kind: str = "fork", *, queues: tuple[str, ...] = (), name: str = "worker") -> WorkerProc:
        proc = WorkerProc(self.env, self.tmp / "logs", kind=kind, queues=queues, name=name)
        self.procs.append(proc)
        return proc.start()

    def started_up(self) -> None:
        """Wait until the workers' start-up look at CVAT (``operations.worker_start``) is done, so a
        fault injected next meets the test's own calls."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        from core.queueing import SERIALIZER
        from operations.worker_start import LEARN_JOB_ID

        def done() -> bool:
            try:
                job = Job.fetch(LEARN_JOB_ID, connection=self.client(), serializer=SERIALIZER)
            except NoSuchJobError:
                return False
            return job.get_status() in ("finished", "failed")

        assert wait_for(done, timeout=20), self.logs()

    def receiver(self, *, start: bool = True, **options: Any) -> ReceiverProc:
        proc = ReceiverProc(self.env, self.tmp / "logs", **options)
        self.procs.append(proc)
        return proc.start() if start else proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``cvat-hooks ARGS`` as a separate process with this stack's environment."""
        return subprocess.run(cli_argv(*args), env=clean_env(self.env), capture_output=True, text=True,
                              timeout=60)

    def client(self) -> Redis:
        return self.redis.client()

    def log(self) -> DeliveryLog:
        return DeliveryLog(self.client(), retention_seconds=3600)

    def app(self):  # type: ignore[no-untyped-def]
        """An in-process receiver on this stack's Redis (for tests where the receiver is not the fault)."""
        settings = Settings(secrets=(SECRET,), rules_path=self.rules,
                            workers=WorkerSettings(redis_url=self.redis.url, data_dir=self.tmp / "app-data"))
        return create_app(settings).test_client()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_text()[-4000:]}" for p in self.procs)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Redis and the test CVAT server started; every process a test starts is stopped afterwards."""
    redis = RedisProc(tmp_path / "redis", tmp_path / "logs").start()
    cvat = CvatTestServer(export_seconds=0.2).start()
    world = Stack(tmp_path, redis, cvat, tmp_path / "rules.yaml")
    world.set_rules(EXPORT_RULE)
    yield world
    for proc in reversed(world.procs):
        proc.kill()  # a graceful stop is not under test, and waits for idle dequeues to time out
    cvat.stop()
    redis.kill()


def steps(delivery) -> list[tuple[str, str | None]]:  # type: ignore[no-untyped-def]
    """A delivery's timeline without notes: (step, error class)."""
    return [(s["step"], (s.get("error") or {}).get("class")) for s in delivery.timeline if s["step"] != "note"]


def age_dead_worker(redis: Redis, queue_name: str) -> None:
    """Move RQ's clocks on as if the 90 s after a worker's death had passed: its started jobs' registry
    entries expire now, and its scheduler's lock (61 s) is gone. Nothing else is touched."""
    registry = StartedJobRegistry(queue_name, connection=redis)
    entries = redis.zrange(registry.key, 0, -1)
    assert entries, "the killed worker left no started job"
    redis.zadd(registry.key, {entry: time.time() - 1 for entry in entries})
    for name in QUEUES:
        redis.pexpire(RQScheduler.get_locking_key(name), 1)


# -- a worker killed in the middle of an export ----------------------------------------------------


class SlowDownloads:
    """Makes the test CVAT server send exports slowly (a pause between 1 MiB chunks) until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pause: float = 0.4) -> None:
        self.slow = threading.Event()
        original = cvat_exports.export_chunks

        def chunks(seed: str, size: int, chunk_size: int = cvat_exports.CHUNK_SIZE) -> Iterator[bytes]:
            for chunk in original(seed, size, chunk_size):
                yield chunk
                if self.slow.is_set():
                    time.sleep(pause)

        monkeypatch.setattr(cvat_exports, "export_chunks", chunks)


def partial_downloads(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.part")) if directory.exists() else []


def kill_mid_download(stack: Stack, slow: SlowDownloads, kill) -> Path:  # type: ignore[no-untyped-def]
    """Post a completed job, wait until the worker is half-way through downloading its export, kill."""
    target_dir = stack.data_dir / "exports" / "1" / "2"
    stack.cvat.export_size = 6 * cvat_exports.CHUNK_SIZE + 7
    slow.slow.set()
    body, _ = capture("update_job_completed.json")
    answer = stack.app().post("/webhooks/cvat", data=body, headers=signed(body))
    assert answer.status_code == 202, answer.json
    assert wait_for(lambda: any(p.stat().st_size > 0 for p in partial_downloads(target_dir)), timeout=30), \
        stack.logs()
    kill()
    slow.slow.clear()
    return target_dir


def assert_exported_once_after_a_kill(stack: Stack, target_dir: Path, error_class: str) -> None:
    """One final file with the export's bytes, no staging file left, and the killed attempt recorded
    before the successful one."""
    log = stack.log()
    [delivery_id] = [d.id for d in log.list(limit=5)]
    assert wait_for(lambda: log.get(delivery_id).status.value == "succeeded", timeout=90), \
        (steps(log.get(delivery_id)), stack.logs())
    delivery = log.get(delivery_id)
    assert steps(delivery) == [("received", None), ("started", None), ("retrying", error_class),
                               ("started", None), ("succeeded", None)]
    [action] = delivery.actions.values()
    assert action["attempts"] == 2
    assert sorted(p.name for p in target_dir.iterdir()) == ["job-1.zip"], "one final file, nothing staged"
    [rq_id] = [r.query.get("rq_id") for r in stack.cvat.calls("GET", "/api/jobs/1/dataset/download")][-1:]
    assert (target_dir / "job-1.zip").stat().st_size == stack.cvat.export_size
    assert hashlib.sha256((target_dir / "job-1.zip").read_bytes()).hexdigest() == stack.cvat.export_digest(rq_id)


def test_work_horse_killed_mid_export_runs_again_and_exports_once(stack: Stack, monkeypatch):
    """--class fork: the work-horse SIGKILLed half-way through a download; the worker records
    WorkHorseKilled, RQ retries, the export completes, and one file exists."""
    slow = SlowDownloads(monkeypatch)
    worker = stack.worker("fork")
    killed: list[int] = []

    def kill_horse() -> None:
        horse = worker.work_horse()
        assert horse is not None, "no work-horse running"
        os.kill(horse, signal.SIGKILL)
        killed.append(horse)

    target_dir = kill_mid_download(stack, slow, kill_horse)
    assert_exported_once_after_a_kill(stack, target_dir, "WorkHorseKilled")
    assert worker.running, "the worker itself survives its work-horse"
    assert len(stack.cvat.calls("POST", "/api/jobs/1/dataset/export")) == 2


@pytest.mark.parametrize("kind", ["fork", "simple"], ids=["fork-worker-and-horse", "simple-worker"])
def test_whole_worker_killed_mid_export_is_retried_by_the_next_worker(stack: Stack, monkeypatch, kind: str):
    """The whole worker (main process, work-horse, scheduler) SIGKILLed mid-export, a new one started:
    once RQ deems the job abandoned, the new worker's maintenance retries it (AbandonedJobError,
    recorded by our failure callback) and takes over the dead scheduler's role, so the delayed
    retry runs; the export completes once."""
    slow = SlowDownloads(monkeypatch)
    first = stack.worker(kind, name="first")
    target_dir = kill_mid_download(stack, slow, first.kill)
    redis = stack.client()
    assert len(StartedJobRegistry(EXPORT_QUEUE, connection=redis).get_job_ids(cleanup=False)) == 1
    # The next worker starts while RQ still counts the job as running and the dead scheduler's lock
    # as held (as a supervisor restarting a container would); then the 90 s pass.
    second = stack.worker(kind, name="second")
    age_dead_worker(redis, EXPORT_QUEUE)
    assert_exported_once_after_a_kill(stack, target_dir, "AbandonedJobError")
    assert second.running


def test_a_job_taken_by_a_worker_that_died_before_starting_it_is_run(stack: Stack):
    """The state a worker SIGKILLed (or cut off from Redis) between taking a job and starting it
    leaves: off its queue, in the StartedJobRegistry, still 'queued'. Once its registration runs out,
    a worker's maintenance puts it back on its queue and it runs once, without spending a retry (RQ
    on its own drops it: bench/soak.py lost one so)."""
    stack.set_rules(LABELS_RULE)
    body, _ = capture("create_task.json")
    answer = stack.app().post("/webhooks/cvat", data=body, headers=signed(body)).json
    [job_id] = answer["jobs"]
    redis = stack.client()
    light = queue(LIGHT_QUEUE, redis)
    # What the dying worker did, with RQ's own calls: pop the job, register its execution.
    assert redis.lpop(light.key) == job_id.encode()
    with redis.pipeline() as pipe:
        Execution.create(light.fetch_job(job_id), ttl=90, pipeline=pipe, worker_name="dead-worker")
        pipe.execute()
    assert light.fetch_job(job_id).get_status() == "queued"
    # Aged before the worker starts: a jump of RQ's clock in the middle of a maintenance round (after
    # the rescue looked, before RQ's cleanup did) is a race only a test can make; real time passing
    # is covered by the rescue looking ahead (workers.rq_gaps.LOOK_AHEAD_SECONDS).
    age_dead_worker(redis, LIGHT_QUEUE)
    stack.worker("fork")
    log = stack.log()
    assert wait_for(lambda: log.get(answer["delivery_id"]).status.value == "succeeded", timeout=20), \
        (steps(log.get(answer["delivery_id"])), stack.logs())
    time.sleep(2 * MAINTENANCE_SECONDS + 1)  # a second run would show by now
    delivery = log.get(answer["delivery_id"])
    assert steps(delivery) == [("received", None), ("started", None), ("succeeded", None)]
    assert "taken by a worker that stopped before starting it; queued again" in [
        s["message"] for s in delivery.timeline if s["step"] == "note"]
    assert light.failed_job_registry.count == 0


TAKE_AND_DIE = """
import os, signal, sys
from core.settings import WorkerSettings
from workers.worker import build_worker
worker = build_worker(WorkerSettings.from_env(), queues=[sys.argv[1]], kind=sys.argv[2], name="taker")
worker.bootstrap()
job, _ = worker.dequeue_job_and_maintain_ttl(10)
print("taken", job.id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # after RQ took the job, before it registered it anywhere
"""


@pytest.mark.parametrize("kind", ["simple", "fork"])
def test_a_job_taken_by_a_one_queue_worker_killed_before_registering_it_is_run(stack: Stack, kind: str):
    """A worker SIGKILLed right after its dequeue returned a job, before RQ wrote it anywhere. With
    several queues RQ pops with BLPOP and the job is then only in the dead process's memory (lost:
    bench/soak.py found one). A worker of one queue, as each child of the default ``split`` setup
    is, pops with LMOVE into RQ's intermediate queue. A live worker's maintenance puts the job back
    on its queue (``workers.rq_gaps.requeue_stuck``): it runs once, without spending a retry; with
    no retries, as here, RQ's own cleanup would have failed it without ever running it."""
    stack.set_rules(LABELS_RULE.replace("retry: {attempts: 2, backoff: [2]}", "retry: {attempts: 0}"))
    body, _ = capture("create_task.json")
    answer = stack.app().post("/webhooks/cvat", data=body, headers=signed(body)).json
    [job_id] = answer["jobs"]
    taker = subprocess.run([sys.executable, "-c", TAKE_AND_DIE, LIGHT_QUEUE, kind], env=clean_env(stack.env),
                           capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert taker.returncode == -signal.SIGKILL, taker.stderr[-3000:]
    assert f"taken {job_id}" in taker.stdout.splitlines(), taker.stdout[-3000:] + taker.stderr[-3000:]
    redis = stack.client()
    light = queue(LIGHT_QUEUE, redis)
    assert job_id not in light.job_ids
    assert light.intermediate_queue.get_job_ids() == [job_id]
    # RQ retries a job that stayed over a minute in the intermediate queue: move its clock on.
    redis.set(light.intermediate_queue.get_first_seen_key(job_id), time.time() - 120)
    stack.worker("split")
    log = stack.log()
    assert wait_for(lambda: log.get(answer["delivery_id"]).status.value == "succeeded", timeout=30), \
        (steps(log.get(answer["delivery_id"])), stack.logs())
    time.sleep(2 * MAINTENANCE_SECONDS + 1)  # a second run would show by now
    delivery = log.get(answer["delivery_id"])
    assert [s for s, _ in steps(delivery)] == ["received", "started", "succeeded"]
    assert [s["message"] for s in delivery.timeline if s["step"] == "note"][:1] == [
        "taken by a worker that stopped before starting it; queued again"]
    assert light.count == 0 and not light.intermediate_queue.get_job_ids()
    assert light.failed_job_registry.count == 0


# -- Redis restarted ---------------------------------------------------------------------------------

LABELS_RULE = """
  - id: check-new-task-labels
    on: create:task
    do:
      - action: check_labels
        require: [car, person]
    retry: {attempts: 2, backoff: [2]}
"""


def test_redis_restart_keeps_queued_jobs_and_scheduled_retries(stack: Stack):
    """Redis SIGKILLed and restarted (AOF, appendfsync always): a job waiting for a delayed retry and
    a job still queued are both there afterwards; the worker that lived through the restart runs the
    retry when it is due, a new worker runs the queued job, each exactly once."""
    stack.set_rules(EXPORT_RULE + LABELS_RULE)
    light = stack.worker("fork", queues=(LIGHT_QUEUE,), name="light")
    stack.started_up()
    stack.cvat.fail_next(1, 503, path="/api/")
    app, redis = stack.app(), stack.client()
    task_body, _ = capture("create_task.json")
    job_body, _ = capture("update_job_completed.json")
    retried = app.post("/webhooks/cvat", data=task_body, headers=signed(task_body)).json
    queued = app.post("/webhooks/cvat", data=job_body, headers=signed(job_body)).json
    scheduled = ScheduledJobRegistry(LIGHT_QUEUE, connection=redis)
    assert wait_for(lambda: scheduled.get_job_ids() == retried["jobs"], timeout=20), stack.logs()
    assert queue(EXPORT_QUEUE, redis).job_ids == queued["jobs"]

    stack.redis.kill()
    stack.redis.start()
    redis = stack.client()
    assert ScheduledJobRegistry(LIGHT_QUEUE, connection=redis).get_job_ids() == retried["jobs"]
    assert queue(EXPORT_QUEUE, redis).job_ids == queued["jobs"]

    log = DeliveryLog(redis, retention_seconds=3600)
    assert wait_for(lambda: log.get(retried["delivery_id"]).status.value == "succeeded", timeout=30), \
        (steps(log.get(retried["delivery_id"])), stack.logs())
    assert light.running
    stack.worker("fork", name="all")
    assert wait_for(lambda: log.get(queued["delivery_id"]).status.value == "succeeded", timeout=30), stack.logs()
    assert steps(log.get(retried["delivery_id"])) == [("received", None), ("started", None),
                                                      ("retrying", "TransientError"), ("started", None),
                                                      ("succeeded", None)]
    assert steps(log.get(queued["delivery_id"])) == [("received", None), ("started", None), ("succeeded", None)]
    assert len(stack.cvat.calls("POST", "/api/jobs/1/dataset/export")) == 1


def test_split_worker_waits_for_redis_instead_of_restarting_children_every_second(stack: Stack):
    """A child that dies while Redis is down would die again at once when restarted (it cannot even
    register): the parent waits for Redis, saying so once, instead of restarting it every second
    (a traceback and a fork a second for as long as Redis is down). Then actions run as usual."""
    stack.set_rules(LABELS_RULE)
    worker = stack.worker("split", name="split")
    # Every child of the shipped plan, and the scheduler's, all up before Redis goes.
    expected = len(plan(QUEUES, DEFAULT_LIGHT_PROCESSES)) + 1
    assert wait_for(lambda: len(children(worker.pid)) == expected, timeout=20), children(worker.pid)
    stack.redis.kill()
    light = re.search(r"started light worker (\S+) \(pid (\d+)\)", worker.log_text())
    assert light, worker.log_text()[-4000:]
    os.kill(int(light.group(2)), signal.SIGKILL)  # a death while Redis is down
    time.sleep(8)  # without the wait, the restarted child died and was restarted again about every second
    down = worker.log_text()
    # Once per child at most, however long Redis is down. Which ones die is RQ's doing: a child may
    # end on its own when its Redis calls fail, besides the one killed here.
    assert max(deaths(down).values(), default=0) <= 1, down[-4000:]
    assert down.count("Redis does not answer") == 1, down[-4000:]
    stack.redis.start()
    body, _ = capture("create_task.json")
    answer = stack.app().post("/webhooks/cvat", data=body, headers=signed(body)).json
    log = stack.log()
    assert wait_for(lambda: log.get(answer["delivery_id"]).status.value == "succeeded", timeout=45), stack.logs()
    # Another light child may have run the action before the parent saw Redis back.
    assert wait_for(lambda: "Redis answers again" in worker.log_text(), timeout=10), worker.log_text()[-4000:]
    assert worker.running
    after = worker.log_text()
    # The light child was killed (or, in a rare race, ended on its own first): it died once.
    assert deaths(after)[light.group(1)] == 1 and max(deaths(after).values()) == 1, after[-4000:]


def deaths(log: str) -> Counter[str]:
    """How many times the split worker's log says each of its children (by name) died."""
    return Counter(re.findall(r"worker (\S+) \(\w+\) died \(exit ", log))


@pytest.mark.parametrize("kind", ["split", "fork", "simple"])
def test_a_delayed_retry_runs_within_seconds_of_redis_coming_back(stack: Stack, kind: str):
    """Redis SIGKILLed while a retry waits in RQ's scheduled registry, and restarted after the retry
    was due: the scheduler is back within seconds, not at the workers' next maintenance round (30 s
    here, as by default), and the retry runs once. RQ's own scheduler ends on a Redis error; every
    worker class's scheduler waits for Redis instead (``workers.rq_gaps.WorkerScheduler``)."""
    stack.set_rules(LABELS_RULE)
    env = {**stack.env, "CVAT_HOOKS_WORKER_MAINTENANCE_SECONDS": "30"}
    worker = WorkerProc(env, stack.tmp / "logs", kind=kind, name=kind)
    stack.procs.append(worker)
    worker.start()
    stack.started_up()
    stack.cvat.fail_next(1, 503, path="/api/")
    body, _ = capture("create_task.json")
    answer = stack.app().post("/webhooks/cvat", data=body, headers=signed(body)).json
    scheduled = ScheduledJobRegistry(LIGHT_QUEUE, connection=stack.client())
    assert wait_for(lambda: scheduled.get_job_ids() == answer["jobs"], timeout=20), stack.logs()
    schedulers = scheduler_pids(worker.log_text())
    stack.redis.kill()
    time.sleep(3)  # the retry (2 s) falls due while Redis is away
    stack.redis.start()
    back = time.monotonic()
    log = stack.log()
    assert wait_for(lambda: log.get(answer["delivery_id"]).status.value == "succeeded", timeout=30), \
        (steps(log.get(answer["delivery_id"])), stack.logs())
    took = time.monotonic() - back
    assert took < 10, f"the retry ran {took:.1f} s after Redis came back:\n{stack.logs()}"
    assert steps(log.get(answer["delivery_id"])) == [("received", None), ("started", None),
                                                     ("retrying", "TransientError"), ("started", None),
                                                     ("succeeded", None)]
    assert worker.running
    # The split worker's scheduler child waited Redis out: it was not replaced.
    assert scheduler_pids(worker.log_text()) == schedulers, worker.log_text()[-4000:]
    assert len(schedulers) == (1 if kind == "split" else 0), worker.log_text()[-4000:]


@pytest.mark.parametrize("kind", ["split", "fork", "simple"])
def test_a_scheduler_lock_freed_after_the_worker_started_is_taken_within_seconds(stack: Stack, kind: str):
    """Another scheduler held the exports queue's lock when the worker started, so the worker's
    scheduler took only the other queues'. Once that lock is free (its holder stopped), a delayed
    retry waiting on the exports queue runs within seconds: RQ's own scheduler tries a lock it lacks
    only every 2 minutes (``workers.rq_gaps.WorkerScheduler``, gap 4)."""
    redis = stack.client()
    other = RQScheduler([EXPORT_QUEUE], connection=redis)
    assert other.acquire_locks() == {EXPORT_QUEUE}
    worker = stack.worker(kind)
    assert wait_for(lambda: f"Acquired scheduler lock for {LIGHT_QUEUE}" in worker.log_text(), timeout=20), \
        stack.logs()
    stack.started_up()
    stack.cvat.fail_next(1, 503, path="/api/")
    body, _ = capture("update_job_completed.json")
    answer = stack.app().post("/webhooks/cvat", data=body, headers=signed(body)).json
    scheduled = ScheduledJobRegistry(EXPORT_QUEUE, connection=redis)
    assert wait_for(lambda: scheduled.get_job_ids() == answer["jobs"], timeout=20), stack.logs()
    other.release_locks()
    freed = time.monotonic()
    log = stack.log()
    assert wait_for(lambda: log.get(answer["delivery_id"]).status.value == "succeeded", timeout=30), \
        (steps(log.get(answer["delivery_id"])), stack.logs())
    took = time.monotonic() - freed
    assert took < rq_gaps.REACQUIRE_SECONDS + 5, f"the retry ran {took:.1f} s after the lock was freed"
    assert steps(log.get(answer["delivery_id"])) == [("received", None), ("started", None),
                                                     ("retrying", "TransientError"), ("started", None),
                                                     ("succeeded", None)]


# -- the receiver killed under load -----------------------------------------------------------------

NOTIFY_RULE = """
  - id: note-jobs
    on: update:job
    do:
      - action: notify
        url: http://127.0.0.1:9/sink
        text: "job {job_id} is {job.state}"
"""


def distinct_job_events(n: int) -> list[bytes]:
    """``n`` different update:job deliveries (job ids 1000...), signed as CVAT signs them."""
    body, _ = capture("update_job_completed.json")
    payload = json.loads(body)
    return [json.dumps(dict(payload, job=dict(payload["job"], id=1000 + i))).encode() for i in range(n)]


def post_raw(url: str, body: bytes, timeout: float = 10.0) -> int | None:
    """POST a signed delivery; the status, or None when no answer came (refused, reset, timed out)."""
    request = urllib.request.Request(url + "/webhooks/cvat", data=body, headers=signed(body), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def post_all(url: str, bodies: list[bytes], answers: dict[int, int | None], indexes: list[int], *,
             threads: int = 4, stop: threading.Event | None = None) -> None:
    """Post ``bodies[i]`` for each index from ``threads`` client threads, writing each answer."""
    todo = list(reversed(indexes))
    lock = threading.Lock()

    def client() -> None:
        while stop is None or not stop.is_set():
            with lock:
                if not todo:
                    return
                i = todo.pop()
            answers[i] = post_raw(url, bodies[i])

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)


def test_receiver_killed_under_load_loses_and_doubles_nothing(stack: Stack):
    """gunicorn (master and workers, and the serve process) SIGKILLed while four clients post distinct
    signed deliveries: each delivery answered 2xx is recorded with its job queued, and after the
    restart the ones left without an answer are posted again, as CVAT retries: all recorded, every
    job queued exactly once."""
    stack.set_rules(NOTIFY_RULE)
    receiver = stack.receiver()
    bodies = distinct_job_events(500)
    answers: dict[int, int | None] = {}
    stop = threading.Event()
    load = threading.Thread(target=post_all, args=(receiver.url, bodies, answers, list(range(len(bodies)))),
                            kwargs={"stop": stop})
    load.start()
    assert wait_for(lambda: sum(1 for s in answers.values() if s and s < 300) >= 100, timeout=30), stack.logs()
    killed = receiver.kill()
    assert len(killed) >= 4, "serve, the gunicorn master and two gunicorn workers"
    stop.set()
    load.join(timeout=30)
    acknowledged_before = {i for i, s in answers.items() if s is not None and 200 <= s < 300}
    assert not [s for s in answers.values() if s is not None and s >= 500]

    redis = stack.client()
    log = DeliveryLog(redis, retention_seconds=3600)
    ids = [delivery_id_of(json.loads(b)) for b in bodies]
    for i in acknowledged_before:
        assert log.get(ids[i]) is not None, f"delivery {i} was acknowledged but not recorded"

    receiver.start()
    for _ in range(3):
        missing = [i for i in range(len(bodies)) if not (answers.get(i) and 200 <= answers[i] < 300)]
        if not missing:
            break
        post_all(receiver.url, bodies, answers, missing)
    assert all(answers[i] in (200, 202) for i in range(len(bodies))), \
        {i: answers.get(i) for i in range(len(bodies)) if answers.get(i) not in (200, 202)}

    jobs = queue(LIGHT_QUEUE, redis).get_job_ids()
    assert len(jobs) == len(set(jobs)) == len(bodies), "every delivery's job queued exactly once"
    expected = {a["job_id"] for i in range(len(bodies)) for a in log.get(ids[i]).actions.values()}
    assert set(jobs) == expected
    assert redis.zcard("cvat-hooks:deliveries") == len(bodies)


# -- CVAT unreachable -------------------------------------------------------------------------------

UNREACHABLE_RULES = """
  - id: to-review
    on: update:job
    # The captured event was made by the account the workers use (the test CVAT's token is admin's):
    # let the rule act on it, as the loop guard would not (README: Loops and the service account).
    allow_self_trigger: true
    do:
      - action: update_job
        stage: validation
    retry: {attempts: 1, backoff: [1]}
  - id: check-new-task-labels
    on: create:task
    do:
      - action: check_labels
        require: [car, person]
    retry: {attempts: 5, backoff: [2]}
"""
# RQ schedules a retry at a whole second, cut down: a 1-s backoff may run 0.1 s after the failure.
# 2 s keeps the schedule visible in the gaps between the patient rule's starts.


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.split()[-1])
    return 0.0


def test_cvat_unreachable_retries_on_schedule_then_fails_visibly_and_replay_recovers(stack: Stack):
    """CVAT stops listening: actions retry on their schedule (real scheduler, 1-2 s backoff). The one
    whose retries run out is failed in the delivery log, in RQ's failed registry and in /metrics;
    the one with retries left succeeds once CVAT is back; `cvat-hooks deliveries replay` recovers
    the failed one."""
    stack.set_rules(UNREACHABLE_RULES)
    stack.worker("fork")
    stack.cvat.stop()  # connections refused from now on
    app, redis = stack.app(), stack.client()
    log = DeliveryLog(redis, retention_seconds=3600)
    job_body, _ = capture("update_job_completed.json")
    task_body, _ = capture("create_task.json")
    short = app.post("/webhooks/cvat", data=job_body, headers=signed(job_body)).json
    patient = app.post("/webhooks/cvat", data=task_body, headers=signed(task_body)).json

    assert wait_for(lambda: log.get(short["delivery_id"]).status.value == "failed", timeout=20), stack.logs()
    failed = log.get(short["delivery_id"])
    [action] = failed.actions.values()
    assert action["attempts"] == 2 and action["error"]["kind"] == "transient"
    # RQ files the job as failed just after our code recorded the attempt and re-raised.
    failed_jobs = FailedJobRegistry(LIGHT_QUEUE, connection=redis)
    assert wait_for(lambda: failed_jobs.get_job_ids() == short["jobs"], timeout=10), failed_jobs.get_job_ids()
    scrape = app.get("/metrics").get_data(as_text=True)
    assert metric(scrape, "cvat_hooks_action_runs_total", action="update_job", outcome="failed") == 1
    assert metric(scrape, "cvat_hooks_action_runs_total", action="update_job", outcome="retrying") == 1

    stack.cvat.start()  # the same port: CVAT is back
    assert wait_for(lambda: log.get(patient["delivery_id"]).status.value == "succeeded", timeout=20), \
        (steps(log.get(patient["delivery_id"])), stack.logs())
    patient_steps = log.get(patient["delivery_id"]).timeline
    starts = [time.mktime(time.strptime(s["t"][:19], "%Y-%m-%dT%H:%M:%S")) + float("0" + s["t"][19:-1])
              for s in patient_steps if s["step"] == "started"]
    assert len(starts) >= 2
    assert all(b - a >= 0.8 for a, b in zip(starts, starts[1:], strict=False)), starts  # on schedule, not at once

    replayed = stack.cli("deliveries", "replay", short["delivery_id"])
    assert replayed.returncode == 0, replayed.stderr
    assert wait_for(lambda: log.get(short["delivery_id"]).status.value == "succeeded", timeout=20), stack.logs()
    assert len(stack.cvat.calls("PATCH", "/api/jobs/1")) == 1
    assert stack.cvat.state.jobs[1]["stage"] == "validation"


# -- the same event, many ways ----------------------------------------------------------------------


def test_the_same_event_many_ways_has_one_effect(stack: Stack):
    """One update:job event that CVAT failed to deliver, then: 24 copies at once through both gunicorn
    workers (its retries byte for byte, and redeliveries with keys in jsonb order) racing to be the
    first; CVAT's own redelivery; a `cvat-hooks reconcile` run; a replay of the finished delivery
    without --force. One 202, one job run, one export."""
    receiver = stack.receiver(start=False)
    hook = stack.cvat.add_webhook(receiver.url + "/webhooks/cvat", project_id=1, secret=SECRET,
                                  events=["update:job"])
    stack.cvat.set_job(1, stage="acceptance", state="completed")
    [missed] = stack.cvat.emit("update:job", 1, before={"state": "in progress"})
    assert missed["status_code"] == 502, "the receiver was down"
    sent = stack.cvat.webhooks.sent[-1].body
    reordered = json.dumps(jsonb_order(json.loads(sent))).encode()
    assert reordered != sent
    receiver.start()
    stack.worker("fork")

    copies = [sent, reordered] * 12
    answers: dict[int, int | None] = {}
    post_all(receiver.url, copies, answers, list(range(len(copies))), threads=8)
    assert sorted(answers.values()) == [200] * 23 + [202], answers
    delivery_id = delivery_id_of(json.loads(sent))
    log = stack.log()
    assert wait_for(lambda: log.get(delivery_id).status.value == "succeeded", timeout=30), stack.logs()

    request = urllib.request.Request(f"{stack.cvat.url}/api/webhooks/{hook}/deliveries/{missed['id']}/redelivery",
                                     method="POST", headers={"Authorization": f"Bearer {DEFAULT_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
    assert stack.cvat.webhooks.join()
    assert stack.cvat.webhooks.sent[-1].status_code == 200, "a duplicate"

    adopted = stack.cli("register", "--project", "1", "--url", receiver.url)  # made by hand above: adopt it
    assert adopted.returncode == 0, adopted.stderr
    reconciled = stack.cli("reconcile", "--json")
    assert reconciled.returncode == 0, reconciled.stderr
    report = json.loads(reconciled.stdout)
    assert report["redelivered_count"] == 0 and report["checked"] >= 2, report
    replayed = stack.cli("deliveries", "replay", delivery_id)
    assert replayed.returncode != 0 and "no failed action" in replayed.stderr

    delivery = log.get(delivery_id)
    assert [s for s, _ in steps(delivery) if s != "duplicate"] == ["received", "started", "succeeded"]
    assert delivery.record["duplicates"] == 24
    assert len(stack.cvat.calls("POST", "/api/jobs/1/dataset/export")) == 1
    assert sorted(p.name for p in (stack.data_dir / "exports" / "1" / "2").iterdir()) == ["job-1.zip"]
