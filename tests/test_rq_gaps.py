"""``workers.rq_gaps`` and what it stands in for: RQ's own behaviour that each gap exists for (these
tests fail when RQ changes it: then the gap and its test go), what each gap does instead, and the
worker's logs around a failed action. Real redis-server, RQ's own calls to make each state."""

from __future__ import annotations

import logging
import re
import signal
import socket
import time
from datetime import datetime, timedelta

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Retry, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.scheduler import RQScheduler

from core.contract import LIGHT_QUEUE, ActionCall
from core.delivery_log import DeliveryLog
from core.logs import quiet_rq
from core.queueing import SERIALIZER, enqueue, queue
from core.retry import RetryPolicy
from tests.conftest import stored
from workers import rq_gaps
from workers.worker import build_worker


def nap(seconds: float) -> None:
    """A job for RQ to hold (time.sleep itself refuses RQ's empty keyword arguments)."""
    time.sleep(seconds)


def taken(redis: Redis, job: Job, worker_name: str, *, started: bool) -> Execution:
    """What a worker that took ``job`` leaves, with RQ's own calls: off its queue, registered, and
    marked started if ``started`` (a worker killed between the two leaves it ``queued``)."""
    q = queue(job.origin, redis)
    redis.lrem(q.key, 1, job.id)
    with redis.pipeline() as pipe:
        execution = Execution.create(job, ttl=90, pipeline=pipe, worker_name=worker_name)
        if started:
            job.prepare_for_execution(worker_name, pipeline=pipe)
        pipe.execute()
    return execution


# -- RQ's behaviour each gap stands in for ------------------------------------------------------------


def test_rq_drops_an_expired_registration_of_a_job_it_never_started(redis: Redis):
    """Gap 1 (rq/rq#2015): RQ's cleanup of an expired StartedJobRegistry entry skips a job that is not
    ``started``: the job is then on no queue and in no registry, still ``queued``, never to run."""
    q = queue(LIGHT_QUEUE, redis)
    job = q.enqueue(nap, 0)
    taken(redis, job, "dead", started=False)
    q.started_job_registry.cleanup(timestamp=time.time() + 3600)
    assert job.get_status() == "queued"
    assert job.id not in q.job_ids and q.started_job_registry.count == 0 and q.failed_job_registry.count == 0


def test_rq_fails_a_job_stuck_in_its_intermediate_queue_without_running_it(redis: Redis):
    """Gap 1 (rq/rq#2061): a job left in the intermediate queue for a minute is failed by RQ's
    maintenance (or charged a retry) though it never ran, and no failure callback says so."""
    q = queue(LIGHT_QUEUE, redis)
    job = q.enqueue(nap, 0)
    redis.lmove(q.key, q.intermediate_queue.key, "LEFT", "RIGHT")  # a one-queue worker's dequeue
    redis.set(q.intermediate_queue.get_first_seen_key(job.id), time.time() - 120)
    q.intermediate_queue.cleanup(SimpleWorker([q], connection=redis), q)
    assert job.get_status() == "failed" and q.failed_job_registry.get_job_ids() == [job.id]


def test_rq_leaves_a_jobs_first_seen_stamp_when_it_leaves_the_intermediate_queue(redis: Redis):
    """Gap 1 (rq/rq#2061): ``IntermediateQueue.remove`` keeps the job's first-seen stamp, so a job put
    back on its queue would be failed as stuck by the first cleanup that sees it there again, before
    its worker registers it (``rq_gaps.out_of_intermediate`` drops the stamp too)."""
    q = queue(LIGHT_QUEUE, redis)
    job = q.enqueue(nap, 0)
    redis.lmove(q.key, q.intermediate_queue.key, "LEFT", "RIGHT")
    redis.set(q.intermediate_queue.get_first_seen_key(job.id), time.time() - 120)
    q.intermediate_queue.remove(job.id)
    assert q.intermediate_queue.get_first_seen(job.id) is not None


def test_rqs_simple_worker_registers_a_job_for_its_whole_time_limit(redis: Redis):
    """Gap 3: RQ's SimpleWorker registers a running job for its time limit + 60 s (and does not renew
    it); ours for the monitoring interval + 60 s, as RQ's forking worker does."""
    q = queue(LIGHT_QUEUE, redis)
    job = q.enqueue(nap, 0, job_timeout=3600)
    assert SimpleWorker([q], connection=redis).get_heartbeat_ttl(job) == 3600 + 60
    ours = build_worker_for(redis, q)
    assert ours.get_heartbeat_ttl(job) <= 15 + 60


def build_worker_for(redis: Redis, q):  # type: ignore[no-untyped-def]
    """Our in-process worker class on ``q``, as ``build_worker`` makes it."""
    from workers.worker import JOB_MONITORING_SECONDS, InProcessWorker

    return InProcessWorker([q], connection=redis, job_monitoring_interval=JOB_MONITORING_SECONDS)


def test_rqs_scheduler_retries_a_lock_it_lacks_only_every_two_minutes(redis: Redis):
    """Gap 4: a scheduler without its lock (another held it) tries again only after RQ's fallback
    period; ours after a few seconds."""
    theirs = RQScheduler([LIGHT_QUEUE], connection=redis)
    ours = rq_gaps.Scheduler([LIGHT_QUEUE], redis)
    for scheduler in (theirs, ours):
        scheduler.lock_acquisition_time = datetime.now() - timedelta(seconds=rq_gaps.REACQUIRE_SECONDS + 5)
    assert (theirs.should_reacquire_locks, ours.should_reacquire_locks) == (False, True)


def test_rqs_scheduler_ends_on_a_redis_error():
    """rq/rq#2189: RQ's scheduler loop raises on a Redis connection error rather than waiting for
    Redis: whoever runs it must restart it (``workers.supervisor``: its own child)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(RedisConnectionError):
            RQScheduler([LIGHT_QUEUE], connection=Redis(port=port, socket_connect_timeout=1)).work()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# -- what the gaps do -----------------------------------------------------------------------------------


def test_hand_over_retries_a_dead_workers_started_job_now_and_queues_its_unstarted_one(redis: Redis):
    """Gap 2: the jobs of a worker that died: the started one goes through RQ's abandoned-job handling
    at once (retried: its registration had 90 s left), the one it never started back to the front of
    its queue without spending a retry; a live worker's job is untouched."""
    q = queue(LIGHT_QUEUE, redis)
    started, unstarted, other, waiting = (q.enqueue(nap, 0, retry=Retry(max=1)) for _ in range(4))
    taken(redis, started, "dead", started=True)
    taken(redis, unstarted, "dead", started=False)
    taken(redis, other, "alive", started=True)
    assert rq_gaps.hand_over(q, "dead") == ([unstarted.id], [started.id])
    assert rq_gaps.hand_over(q, "dead") == ([], [])
    assert q.job_ids == [unstarted.id, waiting.id, started.id]
    started.refresh()
    unstarted.refresh()
    assert (started.retries_left, unstarted.retries_left) == (0, 1)
    assert q.started_job_registry.get_job_ids(cleanup=False) == [other.id]


def test_hand_over_leaves_the_jobs_to_rq_while_another_worker_cleans_the_queue(redis: Redis, monkeypatch):
    """Gap 2 under a maintenance lock another worker holds: nothing is touched (two cleanups at once
    would retry the job twice); RQ's own maintenance handles it once its registration runs out."""
    monkeypatch.setattr(rq_gaps, "LOCK_WAIT_SECONDS", 0.2)
    q = queue(LIGHT_QUEUE, redis)
    job = q.enqueue(nap, 0, retry=Retry(max=1))
    taken(redis, job, "dead", started=True)
    assert q.acquire_maintenance_lock()
    assert rq_gaps.hand_over(q, "dead") == ([], [])
    assert q.started_job_registry.get_job_ids(cleanup=False) == [job.id] and job.get_status() == "started"


def test_a_running_jobs_end_stops_its_renewals(redis: Redis, settings, monkeypatch):
    """Gap 3: once a job has ended, nothing renews it any more (the renewal thread has no job)."""
    from workers import worker as worker_module

    monkeypatch.setattr(worker_module, "JOB_MONITORING_SECONDS", 0.2)
    q = queue(LIGHT_QUEUE, redis)
    job = q.enqueue(nap, 0.6)
    w = build_worker(settings.workers, queues=(LIGHT_QUEUE,), kind="simple", name="renewed")
    assert w.work(burst=True, with_scheduler=False)
    assert job.get_status() == "finished"
    assert w.renewals.running is None  # type: ignore[attr-defined]
    time.sleep(0.5)
    assert not q.started_job_registry.get_job_ids(cleanup=False)


# -- a failed action in the worker's log ------------------------------------------------------------


def call_for(action: str, params: dict, *, attempts: int) -> ActionCall:
    """One action call of a fake delivery, with ``attempts`` retries 5 s apart."""
    return ActionCall(delivery_id="f" * 40, rule_id="labels", index=0, action=action, params=params,
                      event={"task_id": 1, "resource": "task"}, retry=RetryPolicy(attempts=attempts, backoff=(5.0,)))


@pytest.mark.parametrize(("cvat_url", "attempts", "how"), [
    (None, 2, "permanent"),  # no CVAT configured: certain to fail, so not retried
    ("http://127.0.0.1:9", 2, r"will retry in \d+s"),  # CVAT unreachable: transient, retried (5 s, jittered)
    ("http://127.0.0.1:9", 0, "no retry left"),  # transient, but the rule allows no retry
], ids=["no-cvat", "unreachable", "no-retries"])
def test_a_failed_action_is_one_log_line_and_its_traceback_is_in_the_delivery_log(
        redis: Redis, settings, worker_env, monkeypatch, caplog, cvat_url: str | None, attempts: int, how: str):
    """The worker logs one line per failed attempt, naming the delivery, action, rule and what comes
    next, and no traceback (RQ's is dropped for action jobs); the traceback is in the delivery log."""
    from workers import jobs

    if cvat_url:
        monkeypatch.setenv("CVAT_URL", cvat_url)
        monkeypatch.setenv("CVAT_ACCESS_TOKEN", "t0ken-for-test")
    else:
        monkeypatch.delenv("CVAT_URL", raising=False)
    jobs.runtime.cache_clear()
    call = call_for("check_labels", {"require": ["car"]}, attempts=attempts)
    deliveries = DeliveryLog(redis, retention_seconds=3600)
    with redis.pipeline() as pipe:
        deliveries.add_received(pipe, {"delivery_id": call.delivery_id, "event": "create:task", "matched": []},
                                [call.summary()], time.time())
        enqueue([call], redis, pipe, failure_ttl=3600)
        pipe.execute()
    caplog.set_level(logging.INFO)
    quiet_rq()  # as every worker process's logging setup does (core.logs.configure)
    w = build_worker(settings.workers, queues=(LIGHT_QUEUE,), kind="simple", name="failing")
    w.work(burst=True, with_scheduler=False)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    assert re.fullmatch(f"delivery {call.delivery_id}: action check_labels of rule labels failed \\({how}\\): .+",
                        lines[0]), lines
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()], caplog.text
    assert "t0ken-for-test" not in caplog.text
    delivery = deliveries.get(call.delivery_id)
    assert delivery is not None
    [failed] = [s for s in delivery.timeline if s["step"] in ("failed", "retrying")]
    assert failed["traceback"].startswith("Traceback") or "Traceback" in failed["traceback"]
    assert "t0ken-for-test" not in str(delivery.to_json(shown=stored))
    assert Job.fetch(call.job_id, connection=redis, serializer=SERIALIZER).get_status() == (
        "scheduled" if how.startswith("will retry") else "failed")


def boom() -> None:
    """A job that fails outside ``run_action``."""
    raise RuntimeError("boom outside the action runner")


def test_a_failure_the_job_function_did_not_record_keeps_rqs_traceback(redis: Redis, settings, caplog):
    """Only failures ``run_action`` recorded lose RQ's traceback line: any other (here a job that is not
    an action) keeps it, so no failure goes unlogged."""
    q = queue(LIGHT_QUEUE, redis)
    q.enqueue(boom)
    caplog.set_level(logging.INFO)
    quiet_rq()
    build_worker(settings.workers, queues=(LIGHT_QUEUE,), kind="simple", name="other").work(burst=True)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR and "boom outside the action runner" in
            r.getMessage() and "Traceback" in r.getMessage()], caplog.text
