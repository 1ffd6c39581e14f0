"""``cvat-hooks worker``'s default setup (``--class split``) and RQ's SimpleWorker under it: a
crashing light action takes down its child only, is recorded and retried at once, and a job's
bookkeeping is RQ's own. Real redis-server, real processes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from redis import Redis
from rq import SimpleWorker
from rq.job import Job

from bench import dispatch
from bench.noop_action import NAME, register
from bench.procs import RedisProc
from core import metrics
from core.contract import EXPORT_QUEUE, LIGHT_QUEUE
from core.queueing import SERIALIZER, enqueue, queue
from workers.actions import REGISTRY
from workers.worker import build_worker


@pytest.mark.parametrize(("observations", "expected"), [
    ([], [0.0] * 13),  # no observation: every bucket 0
    ([0.01], [1.0] * 13),  # below the first bound: counted in every bucket
    ([0.3, 2], [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]),  # each from its own bound on
    ([5, 5, 9999], [0] * 6 + [2] * 6 + [3]),  # a bound is inclusive; past the last only in +Inf
], ids=["none", "tiny", "two", "edges"])
def test_histogram_buckets_render_cumulative(redis: Redis, observations: list[float], expected: list[float]):
    """One write per observation, and /metrics still shows Prometheus' cumulative ``le`` buckets."""
    for value in observations:
        metrics.observe(redis, "cvat_hooks_action_duration_seconds", value, action="notify")
    text = metrics.render(redis, []).decode()
    found = []
    for bound in [*map(str, metrics.DURATION_BUCKETS), "+Inf"]:
        line = f'cvat_hooks_action_duration_seconds_bucket{{action="notify",le="{bound}"}} '
        found.append(next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0))
    assert found == [float(e) for e in expected]
    if observations:
        assert f'cvat_hooks_action_duration_seconds_count{{action="notify"}} {float(len(observations))}' in text


def test_in_process_worker_keeps_rqs_bookkeeping(redis: Redis, settings, worker_env, monkeypatch):
    """A job run by the in-process worker is finished in RQ's registries with its result, its execution
    is gone, and the worker counted it: what RQ's own SimpleWorker leaves."""
    monkeypatch.setitem(REGISTRY, NAME, None)  # undone after the test: the bench action is not ours
    register()
    [call] = dispatch._calls(1, tag="bookkeeping")
    with redis.pipeline() as pipe:  # as the receiver queues it (the bench's Queuer keeps results longer)
        enqueue([call], redis, pipe, failure_ttl=3600)
        pipe.execute()
    q = queue(LIGHT_QUEUE, redis)
    worker = build_worker(settings.workers, queues=(LIGHT_QUEUE,), kind="simple", name="in-process")
    assert worker.work(burst=True, with_scheduler=False)
    job = Job.fetch(call.job_id, connection=redis, serializer=SERIALIZER)
    assert job.get_status() == "finished" and job.return_value() == {"noop": True}
    assert q.finished_job_registry.get_job_ids() == [call.job_id]
    assert q.started_job_registry.get_job_ids() == [] and not q.intermediate_queue.get_job_ids()
    # RQ's copy of the outcome goes within minutes (the delivery log keeps it): most of Redis' memory
    # per delivery while it was kept for days.
    assert 0 < redis.ttl(job.key) <= 15 * 60
    worker.refresh()
    assert worker.successful_job_count == 1


@pytest.mark.parametrize(("kind", "crash_queue"), [("split", LIGHT_QUEUE), ("split", EXPORT_QUEUE),
                                                  ("split2", LIGHT_QUEUE)], ids=["light", "exports", "2-light"])
def test_split_worker_crash_takes_down_its_child_only_and_retries_at_once(tmp_path: Path, kind: str,
                                                                          crash_queue: str):
    """`cvat-hooks worker` (split) running an action that calls os._exit(), as a light action or as an
    export (each child runs its jobs in-process), or with two light children: the command survives,
    the next light job runs, and the crashed job is recorded and retried now (not after RQ's
    abandoned-job timeout), then, crashing again with no retry left, given up."""
    with RedisProc(tmp_path / "redis") as server:
        probe = dispatch.crash_probe(server, dispatch.Queuer(server.client), kind, tmp_path,
                                     crash_queue=crash_queue)
    assert probe["worker_survived"] is True, probe
    assert probe["next_job_ran"] is True, probe
    assert probe["crashed_job_steps"] == ["received", "started", "retrying", "started", "failed"], probe
    assert probe["crashed_job_log_error"] == "AbandonedJobError"
    assert probe["crashed_job_rq_status"] == "failed"


@pytest.mark.parametrize("kind", ["simple", "fork"])
def test_a_running_action_reads_started_then_its_end(redis: Redis, settings, worker_env, monkeypatch, kind: str):
    """The delivery log says ``started`` while an attempt runs, in-process (``simple``) or in a fork's
    work-horse, then its end alone: one ``started`` and one ``succeeded`` step, nothing left over."""
    import threading
    import time

    from core.delivery_log import STARTED_PREFIX, DeliveryLog, record_key

    monkeypatch.setitem(REGISTRY, NAME, None)
    register()
    call = dataclasses.replace(dispatch._calls(1, tag=f"running-{kind}")[0], params={"sleep": 1.5})
    dispatch.Queuer(redis).queue([call])
    deliveries = DeliveryLog(redis, retention_seconds=86400)
    seen: dict = {}

    def watch() -> None:  # the worker wants the main thread (signals)
        nonlocal seen
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and seen.get("status") != "started":
            record = deliveries.get(call.delivery_id)
            seen = record.actions.get(call.job_id, {}) if record else {}
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    worker = build_worker(settings.workers, queues=(LIGHT_QUEUE,), kind=kind, name=f"running-{kind}")
    try:
        assert worker.work(burst=True, with_scheduler=False)
    finally:
        watcher.join()
    assert seen.get("status") == "started" and seen.get("attempts") == 1 and seen.get("started_at"), seen
    record = deliveries.get(call.delivery_id)
    assert record is not None
    action = record.actions[call.job_id]
    assert action["status"] == "succeeded" and action["attempts"] == 1, action
    assert action["started_at"] == seen["started_at"] and action["result"] == {"noop": True}
    assert [s["step"] for s in record.timeline if s.get("job_id") == call.job_id] == ["started", "succeeded"]
    assert not redis.hexists(record_key(call.delivery_id), STARTED_PREFIX + call.job_id)


def nap(seconds: float) -> None:
    """A job that runs for a while (time.sleep itself refuses RQ's empty keyword arguments)."""
    import time

    time.sleep(seconds)


def test_a_running_job_stays_registered_by_short_renewals(redis: Redis, settings, monkeypatch):
    """While a job runs in-process, its StartedJobRegistry entry is renewed every beat for beat + 60 s,
    instead of once for its whole time limit + 60 s: a job whose whole worker was killed is deemed
    abandoned (and retried by RQ) about a minute after the kill, not after the limit."""
    import threading
    import time

    from workers import worker as worker_module

    monkeypatch.setattr(worker_module, "JOB_MONITORING_SECONDS", 0.2)
    q = queue(LIGHT_QUEUE, redis)
    job = q.enqueue(nap, 2.5, job_timeout=300)
    scores: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            scores.extend(s for _, s in redis.zrange(q.started_job_registry.key, 0, -1, withscores=True))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    worker = build_worker(settings.workers, queues=(LIGHT_QUEUE,), kind="simple", name="beating")
    try:
        assert worker.work(burst=True, with_scheduler=False)
    finally:
        done.set()
        watcher.join()
    assert job.get_status() == "finished"
    assert scores, "the job was never seen registered"
    assert max(scores) - time.time() < 70  # never registered for its 300 s limit
    assert len(set(scores)) >= 3  # renewed while it ran, not set once


def renewal_threads() -> list[int]:
    """A job that says which renewal threads its worker process has."""
    import threading

    return [t.ident or 0 for t in threading.enumerate() if t.name.startswith("renewals-")]


def test_one_renewal_thread_serves_every_job_of_a_worker(redis: Redis, settings):
    """Jobs share the worker's renewal thread (a thread per job cost a tenth of a no-op job's CPU),
    and it ends with the worker."""
    import threading

    q = queue(LIGHT_QUEUE, redis)
    jobs = [q.enqueue(renewal_threads) for _ in range(3)]
    worker = build_worker(settings.workers, queues=(LIGHT_QUEUE,), kind="simple", name="renewing")
    assert worker.work(burst=True, with_scheduler=False)
    seen = [job.latest_result().return_value for job in jobs]
    assert all(len(threads) == 1 for threads in seen), seen
    assert len({threads[0] for threads in seen}) == 1, seen
    assert not [t for t in threading.enumerate() if t.name == "renewals-renewing"]


def test_recycling_limits_say_why():
    from core.settings import Recycle

    assert Recycle(max_rss_mb=100, max_jobs=0).due(10**6, 99 * 2**20) is None
    assert "CVAT_HOOKS_WORKER_MAX_RSS_MB=100" in (Recycle(max_rss_mb=100).due(1, 101 * 2**20) or "")
    assert "CVAT_HOOKS_WORKER_MAX_JOBS=3" in (Recycle(max_rss_mb=0, max_jobs=3).due(3, 10**12) or "")
    assert Recycle(max_rss_mb=0, max_jobs=0).due(10**6, 10**12) is None


@pytest.mark.parametrize("limit", [{"CVAT_HOOKS_WORKER_MAX_JOBS": "2"}, {"CVAT_HOOKS_WORKER_MAX_RSS_MB": "1"}],
                         ids=["jobs", "rss"])
def test_split_worker_replaces_a_child_at_its_recycling_limits(tmp_path: Path, limit: dict[str, str]):
    """`cvat-hooks worker` (split, burst) with a child limited to 2 jobs, or to 1 MB (every job is
    over it): each child ends after its limit and a fresh process takes the next jobs, none is lost
    or run twice, and a recycle is not taken for a crash (no job handed to RQ's abandoned-job retry)."""
    import os
    import subprocess
    import sys

    from bench.noop_action import ENV, STARTS_KEY

    jobs = 5
    with RedisProc(tmp_path / "redis") as server:
        calls = dispatch._calls(jobs, tag="recycle")
        dispatch.Queuer(server.client).queue(calls)
        env = {**os.environ, "CVAT_HOOKS_REDIS_URL": server.url, "CVAT_HOOKS_DATA_DIR": str(tmp_path / "data"),
               ENV: "1", **limit}
        done = subprocess.run([sys.executable, "-m", "bench.worker", "--burst", "--queue", LIGHT_QUEUE],
                              env=env, capture_output=True, text=True, timeout=120)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log
        started = server.client.hgetall(STARTS_KEY)
        statuses = [Job.fetch(c.job_id, connection=server.client, serializer=SERIALIZER).get_status()
                    for c in calls]
    assert len(started) == jobs and statuses == ["finished"] * jobs, (started, statuses, log)
    fresh = log.count("stopped at its recycling limits; starting a fresh one")
    assert fresh == (2 if "CVAT_HOOKS_WORKER_MAX_JOBS" in limit else jobs), log
    assert "handed to RQ's retry" not in log and "died (exit" not in log, log


@pytest.mark.parametrize("light", [1, 3])
def test_light_processes_run_that_many_light_actions_at_once(tmp_path: Path, light: int):
    """`cvat-hooks worker` (split, burst) with CVAT_HOOKS_LIGHT_PROCESSES: three light actions that
    each take 2 s start together with three light children, one after another with one (a light
    action mostly waits on CVAT or a notified host); each runs once."""
    import os
    import subprocess
    import sys

    from bench.noop_action import ENV, STARTS_KEY

    nap_seconds = 2.0
    with RedisProc(tmp_path / "redis") as server:
        calls = [dataclasses.replace(c, params={"sleep": nap_seconds}) for c in dispatch._calls(3, tag="light")]
        dispatch.Queuer(server.client).queue(calls)
        env = {**os.environ, "CVAT_HOOKS_REDIS_URL": server.url, "CVAT_HOOKS_DATA_DIR": str(tmp_path / "data"),
               ENV: "1", "CVAT_HOOKS_LIGHT_PROCESSES": str(light)}
        done = subprocess.run([sys.executable, "-m", "bench.worker", "--burst", "--queue", LIGHT_QUEUE],
                              env=env, capture_output=True, text=True, timeout=120)
        log = done.stdout + done.stderr
        starts = sorted(float(v) for v in server.client.hgetall(STARTS_KEY).values())
        statuses = [Job.fetch(c.job_id, connection=server.client, serializer=SERIALIZER).get_status()
                    for c in calls]
    assert done.returncode == 0, log
    assert statuses == ["finished"] * 3 and len(starts) == 3, (statuses, starts, log)
    assert log.count("started light worker") == light, log
    spread = starts[-1] - starts[0]
    if light == 3:
        assert spread < nap_seconds, (starts, log)  # the last started before the first was done
    else:
        assert spread >= 2 * nap_seconds, (starts, log)


def test_light_processes_must_be_a_positive_count():
    from core.settings import WorkerSettings

    assert WorkerSettings.from_env({}).light_processes == 2
    assert WorkerSettings.from_env({"CVAT_HOOKS_LIGHT_PROCESSES": "4"}).light_processes == 4
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError, match=f"CVAT_HOOKS_LIGHT_PROCESSES must be .* not '{bad}'"):
            WorkerSettings.from_env({"CVAT_HOOKS_LIGHT_PROCESSES": bad})


def test_an_unstarted_job_whose_registration_nearly_expired_is_queued_again(redis: Redis):
    """A job a dead worker registered but never started goes back to the front of its queue when its
    registration is within LOOK_AHEAD_SECONDS of expiring (RQ's cleanup, right after, would drop
    it); one further from it is left alone, and it is put back once only."""
    from rq.executions import Execution

    from workers.rq_gaps import LOOK_AHEAD_SECONDS, rescue_expired

    q = queue(LIGHT_QUEUE, redis)
    soon, later, waiting = q.enqueue(nap, 0), q.enqueue(nap, 0), q.enqueue(nap, 0)
    for job in (soon, later):
        redis.lrem(q.key, 1, job.id)  # taken by a worker that died before starting it
    with redis.pipeline() as pipe:
        Execution.create(soon, ttl=int(LOOK_AHEAD_SECONDS / 2), pipeline=pipe, worker_name="dead")
        Execution.create(later, ttl=90, pipeline=pipe, worker_name="dead")
        pipe.execute()
    assert rescue_expired(q) == [soon.id]
    assert rescue_expired(q) == []
    assert q.job_ids == [soon.id, waiting.id]
    assert q.started_job_registry.get_job_ids(cleanup=False) == [later.id]
    assert soon.get_status() == "queued" and soon.retries_left is None


def test_a_job_stuck_in_the_intermediate_queue_is_put_back_once_after_rqs_minute(redis: Redis):
    """``requeue_stuck``: a job a one-queue worker took (LMOVE) and died holding goes back to the front
    of its queue once RQ's first-seen stamp is a minute old; not before, not a job that did start,
    and only once (the next worker's maintenance finds nothing left to do)."""
    import time

    from rq.executions import Execution

    from workers.rq_gaps import requeue_stuck

    q = queue(LIGHT_QUEUE, redis)
    stuck, running, fresh, waiting = (q.enqueue(nap, 0) for _ in range(4))
    stuck_list = q.intermediate_queue
    for job in (stuck, running, fresh):
        redis.lmove(q.key, stuck_list.key, "LEFT", "RIGHT")  # what a worker's dequeue does
        stuck_list.set_first_seen(job.id)
    with redis.pipeline() as pipe:
        Execution.create(running, ttl=90, pipeline=pipe, worker_name="alive")
        pipe.execute()
    for job in (stuck, running):  # a minute has passed since RQ's maintenance first saw them
        redis.set(stuck_list.get_first_seen_key(job.id), time.time() - 120)
    assert q.job_ids == [waiting.id]

    assert requeue_stuck(q) == [stuck.id]
    assert requeue_stuck(q) == []
    assert q.job_ids == [stuck.id, waiting.id]
    assert stuck_list.get_job_ids() == [running.id, fresh.id]
    assert stuck.get_status() == "queued" and stuck.retries_left is None
    # Taken again by a live worker, and found by a cleanup before that worker registers it (another
    # worker's maintenance): its stamp went with it, so it is only noted, not failed as stuck.
    assert stuck_list.get_first_seen(stuck.id) is None
    redis.lmove(q.key, stuck_list.key, "LEFT", "RIGHT")
    stuck_list.cleanup(SimpleWorker([q], connection=redis), q)
    assert stuck.get_status() == "queued" and q.failed_job_registry.count == 0
