"""Redis down while deliveries arrive: they are journaled on disk, answered 202, and moved into
Redis exactly once when it is back (real redis-server stopped and started by PID)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from receiver.app import create_app
from receiver.journal import Journal, JournalFull
from tests.conftest import RedisServer, capture, post
from workers.contract import EXPORT_QUEUE, LIGHT_QUEUE
from workers.queueing import queue


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server of this test's own, so it can be stopped and started again on the same port."""
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_deliveries_survive_redis_downtime_once_each(settings, own_redis, tmp_path):
    """Accepted while Redis is down (202 journaled), each processed exactly once after it returns."""
    from redis import Redis

    settings = replace(settings, workers=replace(settings.workers, redis_url=own_redis.url,
                                                 data_dir=tmp_path / "data"))
    client = create_app(settings).test_client()
    job_body, _ = capture("update_job_completed.json")
    task_body, _ = capture("create_task.json")
    own_redis.stop()
    answers = [post(client, job_body), post(client, task_body), post(client, job_body)]  # incl. a CVAT retry
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert {a.json["status"] for a in answers} == {"journaled"}
    assert (settings.data_dir / "journal" / "journal.log").exists()
    own_redis.start()
    redis = Redis.from_url(own_redis.url)
    assert wait_for(lambda: queue(EXPORT_QUEUE, redis).count == 1 and queue(LIGHT_QUEUE, redis).count == 1)
    time.sleep(1.5)  # any second drain would have happened by now
    assert queue(EXPORT_QUEUE, redis).count == 1 and queue(LIGHT_QUEUE, redis).count == 1
    assert redis.zcard("cvat-hooks:deliveries") == 2
    assert not list((settings.data_dir / "journal").glob("journal*"))
    # A delivery after the outage takes the normal path again.
    assert post(client, capture("ping.json")[0]).json["status"] == "ping"
    redis.close()


def test_journal_is_bounded(tmp_path):
    """The journal refuses deliveries beyond its size limit instead of filling the disk."""
    journal = Journal(tmp_path, max_bytes=500)
    journal.append(b'{"event": "ping"}', 1.0)
    with pytest.raises(JournalFull):
        journal.append(b"x" * 600, 2.0)


def test_drain_stops_at_first_failure_and_resumes_in_order(tmp_path):
    """A drain that fails midway keeps what is left, and the next drain resumes in order."""
    journal = Journal(tmp_path)
    for n in range(5):
        journal.append(json.dumps({"n": n}).encode(), float(n))
    seen: list[int] = []

    def flaky(body: bytes, t: float) -> None:
        n = json.loads(body)["n"]
        if n == 2 and 2 not in seen and len(seen) == 2:
            seen.append(-1)
            raise ConnectionError("Redis went away again")
        seen.append(n)

    with pytest.raises(ConnectionError):
        journal.drain(flaky)
    assert journal.drain(flaky) == 3
    assert [n for n in seen if n >= 0] == [0, 1, 2, 3, 4]
    assert not journal.pending() or not list(tmp_path.glob("journal*"))


def test_concurrent_appends_lose_nothing(tmp_path):
    """Appends from many threads while a drain runs are all drained exactly once."""
    journal = Journal(tmp_path)
    got: list[int] = []
    stop = threading.Event()

    def writer(base: int) -> None:
        for i in range(50):
            journal.append(json.dumps({"n": base + i}).encode(), 0.0)

    def drainer() -> None:
        while not stop.is_set():
            journal.drain(lambda body, t: got.append(json.loads(body)["n"]))

    threads = [threading.Thread(target=writer, args=(k * 1000,)) for k in range(4)]
    d = threading.Thread(target=drainer)
    d.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    d.join()
    journal.drain(lambda body, t: got.append(json.loads(body)["n"]))
    assert sorted(got) == sorted(k * 1000 + i for k in range(4) for i in range(50))
