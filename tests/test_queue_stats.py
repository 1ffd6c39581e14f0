"""``core.queue_stats``: ``doctor``, ``/metrics`` and the admin API read the same counts from the same
Redis, and reading them runs none of RQ's cleanup. Real redis-server, real RQ jobs and worker."""

from __future__ import annotations

import time
from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue

from core.contract import ANNOTATE_QUEUE, EXPORT_QUEUE, LIGHT_QUEUE, QUEUES
from core.queue_stats import QueueStats, queue_stats
from core.queueing import queue
from operations.doctor import doctor
from receiver.app import create_app
from tests.conftest import with_settings
from workers.worker import build_worker

ADMIN = "admin-token-for-queue-stats-3e9a71c05b"
"""The admin token of these tests."""
GAUGES = {"cvat_hooks_queue_depth": "queued", "cvat_hooks_jobs_running": "running",
          "cvat_hooks_jobs_scheduled": "scheduled", "cvat_hooks_jobs_failed": "failed"}
"""Each /metrics gauge of a queue and the count it shows."""


def nap(seconds: float) -> None:
    """A job for RQ to hold (time.sleep itself refuses RQ's empty keyword arguments)."""
    time.sleep(seconds)


def boom() -> None:
    """A job that fails, for a real worker to put in the failed registry."""
    raise RuntimeError("boom")


def running(q: Queue, *, ttl: int) -> Job:
    """A job as a worker holds it while running it, with RQ's own calls: an execution in the started
    registry (for ``ttl`` seconds) and the job marked started; never on the queue."""
    job = q.create_job(nap, args=(0,))
    with q.connection.pipeline() as pipe:
        job.save(pipeline=pipe)
        Execution.create(job, ttl=ttl, pipeline=pipe, worker_name="gone-worker")
        job.prepare_for_execution("gone-worker", pipeline=pipe)
        pipe.execute()
    return job


def failed_by_a_worker(settings, name: str, count: int) -> None:
    """``count`` jobs on queue ``name`` that a real worker ran and RQ failed."""
    q = queue(name, Redis.from_url(settings.redis_url))
    for _ in range(count):
        q.enqueue(boom)
    build_worker(settings.workers, queues=(name,), kind="simple", name=f"failing-{name}").work(
        burst=True, with_scheduler=False)
    assert q.count == 0


def every_reading(settings, redis: Redis) -> dict[str, dict[str, dict[str, int]]]:
    """The counts as the admin API, /metrics and doctor each show them."""
    client = create_app(with_settings(settings, admin_token=ADMIN)).test_client()
    api = client.get("/api/stats", headers={"Authorization": f"Bearer {ADMIN}"})
    assert api.status_code == 200 and api.json is not None, api.data
    scraped: dict[str, dict[str, int]] = {name: {} for name in QUEUES}
    for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True)):
        if family.name in GAUGES:
            for sample in family.samples:
                scraped[sample.labels["queue"]][GAUGES[family.name]] = int(sample.value)
    checks = {c.name: c for c in doctor(settings, gateway=None, redis=redis).checks}
    return {
        "api": api.json["queues"],
        "metrics": scraped,
        "doctor": {name: {"queued": checks["queues"].details["depth"][name],
                          "failed": checks["failed jobs"].details["failed"][name]} for name in QUEUES},
    }


def test_doctor_metrics_and_the_admin_api_agree(settings, redis: Redis):
    """Queued, running, scheduled and failed jobs, different on each queue: core, the admin API,
    /metrics and doctor all give the same counts, and they are the jobs made."""
    failed_by_a_worker(settings, LIGHT_QUEUE, 2)
    failed_by_a_worker(settings, EXPORT_QUEUE, 1)
    light, export = queue(LIGHT_QUEUE, redis), queue(EXPORT_QUEUE, redis)
    for _ in range(3):
        light.enqueue(nap, 0)
    export.enqueue(nap, 0)
    light.enqueue_in(timedelta(hours=1), nap, 0)
    export.enqueue_in(timedelta(hours=1), nap, 0)
    export.enqueue_in(timedelta(hours=2), nap, 0)
    running(light, ttl=3600)

    expected = {LIGHT_QUEUE: QueueStats(queued=3, running=1, scheduled=1, failed=2),
                EXPORT_QUEUE: QueueStats(queued=1, running=0, scheduled=2, failed=1),
                ANNOTATE_QUEUE: QueueStats(queued=0, running=0, scheduled=0, failed=0)}
    assert queue_stats(redis) == expected
    shown = every_reading(settings, redis)
    assert shown["api"] == {name: s.to_json() for name, s in expected.items()}
    assert shown["metrics"] == {name: s.to_json() for name, s in expected.items()}
    assert shown["doctor"] == {name: {"queued": s.queued, "failed": s.failed} for name, s in expected.items()}


def test_reading_the_counts_runs_no_cleanup(settings, redis: Redis):
    """An expired run in the started registry and an expired dead letter stay where they are, counted,
    after core, the admin API, /metrics and doctor read the counts (RQ's cleanup would fail the run
    and drop the dead letter: that is the workers' maintenance, never a read's)."""
    light = queue(LIGHT_QUEUE, redis)
    stale = running(light, ttl=1)
    dead = light.create_job(nap, args=(0,))
    dead.save()
    light.failed_job_registry.add(dead, ttl=1)
    deadline = time.monotonic() + 10
    while not (stale.id in light.started_job_registry.get_expired_job_ids()
               and dead.id in light.failed_job_registry.get_expired_job_ids()):
        assert time.monotonic() < deadline, "the registry entries did not expire"
        time.sleep(0.2)

    counts = queue_stats(redis)[LIGHT_QUEUE]
    shown = every_reading(settings, redis)

    assert light.started_job_registry.get_job_ids(cleanup=False) == [stale.id]
    assert light.failed_job_registry.get_job_ids(cleanup=False) == [dead.id]
    assert stale.get_status() == "started"
    assert counts == QueueStats(queued=0, running=1, scheduled=0, failed=1)
    assert shown["api"][LIGHT_QUEUE] == shown["metrics"][LIGHT_QUEUE] == counts.to_json()
    assert shown["doctor"][LIGHT_QUEUE] == {"queued": 0, "failed": 1}
