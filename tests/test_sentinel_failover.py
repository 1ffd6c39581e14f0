"""A Redis Sentinel failover under ``cvat-hooks worker`` (split): a master, its replica and a Sentinel,
real processes on loopback; the master SIGKILLed while a delayed retry waits in RQ's scheduled
registry. Issue 16 measured RQ's scheduler back 7-38 s after such a failover; here the retry runs
within seconds of the replica's promotion, once (0 lost, 0 run twice)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from rq import Worker
from rq.registry import ScheduledJobRegistry

from core.contract import LIGHT_QUEUE
from core.delivery_log import DeliveryLog
from core.redis_conn import connect
from core.settings import WorkerSettings
from receiver.app import create_app
from receiver.settings import Settings
from tests.conftest import SECRET, capture, signed
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer
from tests.procs import Proc, RedisProc, WorkerProc, children, clean_env, free_port, redis_binary, wait_for

MASTER = "cvat-hooks"
"""The name the Sentinel monitors the master under."""

RULES = """version: 1
rules:
  - id: check-new-task-labels
    on: create:task
    do:
      - action: check_labels
        require: [car, person]
    retry: {attempts: 2, backoff: [2]}
"""


class SplitWorker(WorkerProc):
    """``cvat-hooks worker`` on a Sentinel URL: ready once its children are registered in RQ."""

    def __init__(self, env: dict[str, str], log_dir: Path, master: Redis) -> None:
        super().__init__(env, log_dir, kind="split", name="split")
        self.master = master

    def ready(self) -> None:
        def registered() -> bool:
            if not self.running:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            return len({w.pid for w in Worker.all(connection=self.master)} & set(children(self.pid))) >= 2

        if not wait_for(registered, timeout=30, interval=0.05):
            raise RuntimeError(f"{self.name} did not register:\n{self.log_text()[-3000:]}")


def link_up(replica: Redis) -> bool:
    try:
        return replica.info("replication").get("master_link_status") == "up"
    except Exception:
        return False


@pytest.fixture
def sentinel_world(tmp_path: Path) -> Iterator[tuple[RedisProc, Proc, Proc, int]]:
    """A master (AOF), its replica and one Sentinel (quorum 1, a master is down after 1 s)."""
    logs = tmp_path / "logs"
    master = RedisProc(tmp_path / "master", logs).start()
    replica_port, sentinel_port = free_port(), free_port()
    (tmp_path / "replica").mkdir()
    replica = Proc("replica", [redis_binary(), "--port", str(replica_port), "--bind", "127.0.0.1", "--dir",
                               str(tmp_path / "replica"), "--save", "", "--appendonly", "yes",
                               "--replicaof", "127.0.0.1", str(master.port)], clean_env({}), logs).start()
    assert wait_for(lambda: link_up(Redis(port=replica_port)), timeout=20)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {master.port} 1\n"
                    f"sentinel down-after-milliseconds {MASTER} 1000\n"
                    f"sentinel failover-timeout {MASTER} 5000\n")
    sentinel = Proc("sentinel", [redis_binary(), str(conf), "--sentinel"], clean_env({}), logs).start()
    watcher = Redis(port=sentinel_port)
    assert wait_for(lambda: _replicas(watcher), timeout=20), "the Sentinel never saw the replica"
    yield master, replica, sentinel, sentinel_port
    for proc in (sentinel, replica, master):
        proc.kill()


def started_up(redis: Redis) -> None:
    """Wait until the worker's start-up look at CVAT (``operations.worker_start``) is done."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from core.queueing import SERIALIZER
    from operations.worker_start import LEARN_JOB_ID

    def done() -> bool:
        try:
            return Job.fetch(LEARN_JOB_ID, connection=redis, serializer=SERIALIZER).get_status() in (
                "finished", "failed")
        except NoSuchJobError:
            return False

    assert wait_for(done, timeout=20)


def _replicas(sentinel: Redis) -> list:
    try:
        return list(sentinel.sentinel_slaves(MASTER))
    except Exception:
        return []


def test_a_delayed_retry_runs_within_seconds_of_a_sentinel_failover(sentinel_world, tmp_path: Path):
    """The master SIGKILLed while a retry waits (2 s): the Sentinel promotes the replica, and the retry
    runs within seconds of that, once; the delivery log tells the whole story."""
    master, replica, sentinel, sentinel_port = sentinel_world
    url = f"redis+sentinel://127.0.0.1:{sentinel_port}/{MASTER}"
    cvat = CvatTestServer().start()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    env = {"CVAT_HOOKS_REDIS_URL": url, "CVAT_HOOKS_SECRET": SECRET, "CVAT_HOOKS_RULES": str(rules),
           "CVAT_HOOKS_DATA_DIR": str(tmp_path / "data"), "CVAT_URL": cvat.url, "CVAT_ACCESS_TOKEN": DEFAULT_TOKEN,
           "CVAT_HOOKS_RECONCILE_MINUTES": "0", "CVAT_HOOKS_WORKER_MAINTENANCE_SECONDS": "30"}
    worker = SplitWorker(env, tmp_path / "logs", master.client())
    try:
        worker.start()
        started_up(master.client())  # its look at CVAT must not take the fault meant for the action
        cvat.fail_next(1, 503, path="/api/")
        settings = Settings(secrets=(SECRET,), rules_path=rules,
                            workers=WorkerSettings(redis_url=url, data_dir=tmp_path / "app-data"))
        body, _ = capture("create_task.json")
        answer = create_app(settings).test_client().post("/webhooks/cvat", data=body, headers=signed(body)).json
        scheduled = ScheduledJobRegistry(LIGHT_QUEUE, connection=master.client())
        assert wait_for(lambda: scheduled.get_job_ids() == answer["jobs"], timeout=20), worker.log_text()[-3000:]
        assert master.client().wait(1, 2000) == 1  # the replica has it all

        master.kill()
        watcher = Redis(port=sentinel_port)
        assert wait_for(lambda: watcher.sentinel_get_master_addr_by_name(MASTER)[1] != master.port, timeout=30)
        promoted = time.monotonic()
        log = DeliveryLog(connect(url), retention_seconds=3600)

        def status() -> str | None:
            try:
                delivery = log.get(answer["delivery_id"])
            except Exception:  # the client finds the new master on its next try
                return None
            return delivery.status.value if delivery else None

        assert wait_for(lambda: status() == "succeeded", timeout=45), worker.log_text()[-4000:]
        took = time.monotonic() - promoted
        assert took < 10, f"the retry ran {took:.1f} s after the promotion:\n{worker.log_text()[-4000:]}"
        delivery = log.get(answer["delivery_id"])
        assert delivery is not None
        assert [s["step"] for s in delivery.timeline if s["step"] != "note"] == [
            "received", "started", "retrying", "started", "succeeded"]
        assert worker.running
    finally:
        worker.kill()
        cvat.stop()
