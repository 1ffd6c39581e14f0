"""``reconcile``: CVAT's failed or unrecorded deliveries are redelivered, each event processed once.

Real parts: the test CVAT server (its delivery records, redeliveries with reordered keys, signed),
the receiver on a real port, a real Redis, and real ``cvat-hooks worker`` processes for the periodic run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry

from core.contract import LIGHT_QUEUE, QUEUES
from core.delivery_log import DeliveryLog
from core.queueing import SERIALIZER, queue
from core.settings import CvatSettings
from operations.reconcile import (
    JOB_ID,
    RUNS_KEY,
    TRIES_KEY,
    ensure_scheduled,
    recent_runs,
    reconcile,
    schedule_periodic,
)
from receiver.settings import Settings
from tests import cvat_fixtures
from tests import live_receiver as live
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer, wait_until
from workers.cvat_client import CvatClient

cvat_server = cvat_fixtures.cvat_server
live_receiver = live.live_receiver
cli = live.cli


@pytest.fixture
def registered(cli, live_receiver):
    """Project 1's cvat-hooks webhook, pointing at the live receiver."""
    result = cli("register", "--project", "1", "--url", live_receiver.url)
    assert result.exit_code == 0, result.output
    return live_receiver


def queued_jobs(redis: Redis) -> list[str]:
    """Every job id waiting on cvat-hooks' queues."""
    return sorted(job_id for name in QUEUES for job_id in queue(name, redis).job_ids)


def emit_two_matching_events(server: CvatTestServer) -> list[dict]:
    """create:task (rule check-new-task-labels), and a job completed in acceptance (export-finished-jobs)."""
    deliveries = server.emit("create:task", 2)
    server.set_job(1, stage="acceptance", state="completed")
    deliveries += server.emit("update:job", 1, before={"state": "in progress"})
    return deliveries


def redeliveries(server: CvatTestServer) -> int:
    return len([r for r in server.calls("POST") if r.path.endswith("/redelivery")])


def test_events_missed_while_the_receiver_was_down_are_redelivered_once(cli, cvat_server, registered, redis):
    """Receiver down while CVAT sends (502s), back up: reconcile redelivers both events, each queues
    its job once, and a second reconcile finds nothing to do."""
    registered.stop()
    failed = emit_two_matching_events(cvat_server)
    assert [d["status_code"] for d in failed] == [502, 502]
    registered.start()
    first = cli("reconcile")
    assert first.exit_code == 0, first.output
    assert "redelivered 2" in first.output
    assert cvat_server.webhooks.join()
    jobs = queued_jobs(redis)
    assert len(jobs) == 2
    statuses = [d["status_code"] for d in cvat_server.state.deliveries.values() if d["redelivery"]]
    assert statuses == [202, 202]
    second = cli("reconcile", "--json")
    report = json.loads(second.stdout)
    assert (report["checked"], report["redelivered_count"], report["gave_up_count"]) == (4, 0, 0)
    assert redeliveries(cvat_server) == 2 and queued_jobs(redis) == jobs
    deliveries = DeliveryLog(redis, retention_seconds=60).list(limit=10)
    assert sorted(d.record["event"] for d in deliveries) == ["create:task", "update:job"]
    assert all(d.record.get("duplicates", 0) == 0 for d in deliveries)


def test_the_run_is_recorded(cli, cvat_server, registered, redis):
    """Each run leaves a summary (what was checked, redelivered, errors) for doctor and the admin."""
    registered.stop()
    cvat_server.emit("create:task", 2)
    registered.start()
    cli("reconcile")
    (run,) = recent_runs(redis)
    assert (run["trigger"], run["checked"], run["redelivered_count"], run["errors"]) == ("cli", 1, 1, [])
    assert run["redelivered"][0]["event"] == "create:task" and run["redelivered"][0]["status_code"] == 502


def test_dry_run_redelivers_nothing(cli, cvat_server, registered, redis):
    """--dry-run lists what would be redelivered, asks CVAT for nothing and counts no try."""
    registered.stop()
    cvat_server.emit("create:task", 2)
    registered.start()
    result = cli("reconcile", "--dry-run")
    assert "would redeliver 1" in result.output and "create:task, CVAT status 502" in result.output
    assert redeliveries(cvat_server) == 0 and queued_jobs(redis) == []
    assert redis.keys(TRIES_KEY.format("*")) == []


def test_delivered_but_unrecorded_events_are_redelivered(cli, cvat_server, registered, redis):
    """A 2xx CVAT recorded but the receiver has no trace of (its Redis lost its data, and with it which
    webhooks are this deployment's): reconcile says to register again, which adopts the webhook, and
    the next reconcile redelivers."""
    cvat_server.emit("create:task", 2)
    redis.flushdb()
    lost = cli("reconcile")
    assert "redelivered 0" in lost.output and "left alone webhook 1 (project 1)" in lost.output
    assert "remembers no webhook" in lost.output and redeliveries(cvat_server) == 0
    adopted = cli("register", "--project", "1", "--url", registered.url)
    assert "adopted webhook 1" in adopted.output, adopted.output
    result = cli("reconcile")
    assert "redelivered 1" in result.output
    assert cvat_server.webhooks.join() and len(queued_jobs(redis)) == 1


def test_a_failure_the_receiver_did_record_is_left_alone(cli, cvat_server, registered, redis):
    """CVAT timed out after the receiver had stored the event (504 recorded): nothing to redeliver."""
    (delivery,) = cvat_server.emit("create:task", 2)
    cvat_server.state.deliveries[delivery["id"]]["status_code"] = 504
    report = json.loads(cli("reconcile", "--json").stdout)
    assert (report["redelivered_count"], report["recorded_failures"]) == (0, 1)


def test_gives_up_after_max_tries(cli, cvat_server, registered, redis):
    """While the receiver stays down, a payload is redelivered once per run, max-tries times overall."""
    registered.stop()
    cvat_server.emit("create:task", 2)
    for run in range(3):
        report = json.loads(cli("reconcile", "--json", "--max-tries", "2").stdout)
        assert cvat_server.webhooks.join()
        assert report["redelivered_count"] == (1 if run < 2 else 0)
    assert report["gave_up_count"] == 1 and report["gave_up"][0]["tries"] == 2
    assert redeliveries(cvat_server) == 2
    assert len(cvat_server.state.deliveries) == 3  # the first attempt and two failed redeliveries


def test_since_bounds_the_search(cli, cvat_server, registered, redis):
    """Deliveries older than --since are not considered."""
    registered.stop()
    (delivery,) = cvat_server.emit("create:task", 2)
    registered.start()
    old = (datetime.now(UTC) - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cvat_server.state.deliveries[delivery["id"]].update(created_date=old, updated_date=old)
    assert "checked 0 deliveries" in cli("reconcile", "--since", "2h").output
    assert "redelivered 1" in cli("reconcile", "--since", "4h").output


def test_periodic_run_reads_one_page_when_nothing_is_missing(cvat_server, registered, redis, settings, cli):
    """An incremental run after a clean one reads only the newest page of each webhook's deliveries."""
    (delivery,) = cvat_server.emit("create:task", 2)
    record = cvat_server.state.deliveries[delivery["id"]]
    with cvat_server.state.lock:  # 150 more of that (recorded) delivery, one a minute up to now
        for minutes in range(150, -1, -1):
            when = (datetime.now(UTC) - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            copy_id = delivery["id"] if minutes == 150 else cvat_server.state.next_id("deliveries")
            cvat_server.state.deliveries[copy_id] = {**record, "id": copy_id, "created_date": when,
                                                     "updated_date": when}
    gateway = CvatClient(CvatSettings(url=cvat_server.url, access_token=DEFAULT_TOKEN))

    def pages(**options) -> int:
        cvat_server.clear_requests()
        reconcile(gateway, redis, dedupe_seconds=settings.dedupe_seconds, retention_seconds=3600, **options)
        return len(cvat_server.calls("GET", "/api/webhooks/1/deliveries"))

    try:
        assert pages(incremental=True) == 2  # no watermark yet: back to the horizon
        assert pages(incremental=True) == 1
        assert pages() == 2  # the command line reads everything again
    finally:
        gateway.close()


def test_ensure_scheduled_makes_one_job_for_concurrent_workers(redis):
    """Workers starting together schedule one periodic job; a new period replaces it; 0 removes it."""
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def worker_start() -> None:
        client = Redis(connection_pool=redis.connection_pool)
        start.wait()
        outcomes.append(ensure_scheduled(client, 5))

    threads = [threading.Thread(target=worker_start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["kept"] * 7 + ["scheduled"]
    registry = ScheduledJobRegistry(queue=queue(LIGHT_QUEUE, redis))
    assert registry.get_job_ids() == [JOB_ID]
    job = Job.fetch(JOB_ID, connection=redis, serializer=SERIALIZER)
    assert job.repeat_intervals == [300] and job.get_status() == JobStatus.SCHEDULED
    assert ensure_scheduled(redis, 10) == "scheduled"
    assert Job.fetch(JOB_ID, connection=redis, serializer=SERIALIZER).repeat_intervals == [600]
    assert registry.get_job_ids() == [JOB_ID]
    assert ensure_scheduled(redis, 0) == "removed" and registry.get_job_ids() == []


def test_a_job_scheduled_under_an_older_module_is_replaced(redis):
    """A periodic job that names a function this release no longer has (a moved module) would fail
    every period: the next worker start schedules the current one in its place."""
    from rq.repeat import Repeat

    queue(LIGHT_QUEUE, redis).enqueue_in(timedelta(seconds=300), "receiver.reconcile.scheduled_run", job_id=JOB_ID,
                                         repeat=Repeat(times=3, interval=300))
    assert ensure_scheduled(redis, 5) == "scheduled"
    assert Job.fetch(JOB_ID, connection=redis, serializer=SERIALIZER).func_name == "operations.reconcile.scheduled_run"
    assert ensure_scheduled(redis, 5) == "kept"


def test_learning_queued_under_an_older_module_is_queued_again(redis):
    """Likewise the start-up job that learns CVAT's state, if it waits under an older name."""
    from operations.worker_start import LEARN_JOB_FUNCTION, LEARN_JOB_ID, queue_learning

    queue(LIGHT_QUEUE, redis).enqueue("receiver.worker_start.learn_now", job_id=LEARN_JOB_ID)
    assert queue_learning(redis) is True
    assert Job.fetch(LEARN_JOB_ID, connection=redis, serializer=SERIALIZER).func_name == LEARN_JOB_FUNCTION
    assert queue_learning(redis) is False


def test_no_periodic_run_without_cvat(redis, settings):
    """A worker without CVAT settings schedules no reconcile."""
    schedule_periodic(settings, redis)
    assert ScheduledJobRegistry(queue=queue(LIGHT_QUEUE, redis)).get_job_ids() == []


def test_two_workers_run_the_periodic_reconcile_once_per_period(cvat_server, registered, redis,
                                                                settings: Settings, tmp_path):
    """Two `cvat-hooks worker` processes: one periodic job, runs one period apart (not two per
    period), each redelivering what was missed and repeating itself."""
    registered.stop()
    cvat_server.emit("create:task", 2)
    registered.start()
    period = 2.0
    env = {**os.environ, "CVAT_URL": cvat_server.url, "CVAT_ACCESS_TOKEN": DEFAULT_TOKEN,
           "CVAT_HOOKS_REDIS_URL": settings.redis_url or "", "CVAT_HOOKS_RULES": str(settings.rules_path),
           "CVAT_HOOKS_DATA_DIR": str(settings.data_dir), "CVAT_HOOKS_RECONCILE_MINUTES": str(period / 60),
           "CVAT_HOOKS_LOG_FORMAT": "text"}
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    command = [sys.executable, "-m", "operations.cli", "worker", "--class", "simple"]
    workers = []
    for log in logs:
        with log.open("wb") as out:
            workers.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        ran = wait_until(lambda: len(recent_runs(redis, 10)) >= 3, timeout=30, interval=0.1)
        assert ran, "\n".join(log.read_text() for log in logs)
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(timeout=20)
    runs = list(reversed(recent_runs(redis, 10)))
    assert all(r["trigger"] == "periodic" and not r["errors"] for r in runs)
    gaps = [later["ts"] - earlier["ts"] for earlier, later in zip(runs, runs[1:], strict=False)]
    assert min(gaps) > period * 0.5, gaps
    assert runs[0]["redelivered_count"] == 1 and all(r["redelivered_count"] == 0 for r in runs[1:])
    jobs = [key for key in redis.scan_iter(Job.redis_job_namespace_prefix + "*")
            if redis.type(key) == b"hash" and b"reconcile" in (redis.hget(key, "description") or b"")]
    assert jobs == [Job.key_for(JOB_ID).encode()]
    assert json.loads(redis.lindex(RUNS_KEY, 0))["webhooks"] == [1]
    assert time.time() - runs[0]["ts"] < 30
