"""A Redis that can drop what we acknowledge (evicting policy, no persistence) is detected: real redis-servers."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis import Redis

from core.redis_conn import DurabilityCheck, check_durability
from operations.doctor import doctor
from receiver.app import create_app
from tests.conftest import capture, free_port, post, redis_binary

SAFE = ("--maxmemory-policy", "noeviction", "--appendonly", "yes", "--save", "")


class Server:
    """A redis-server with the given settings, stopped by its PID."""

    def __init__(self, directory: Path, args: tuple[str, ...]) -> None:
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(directory), *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = Redis.from_url(self.url)
        for _ in range(200):
            try:
                self.client.ping()
                return
            except Exception:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.client.close()
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    started: list[Server] = []

    def run(*args: str) -> Server:
        server = Server(tmp_path / f"redis-{len(started)}", args)
        started.append(server)
        return server

    yield run
    for server in started:
        server.stop()


def app_on(settings, server: Server):  # type: ignore[no-untyped-def]
    return create_app(replace(settings, workers=replace(settings.workers, redis_url=server.url)))


def doctor_check(settings, server: Server) -> dict:  # type: ignore[no-untyped-def]
    [check] = [c for c in doctor(settings, gateway=None, redis=server.client).checks if c.name == "redis durability"]
    return check.to_json()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "allkeys-random", "volatile-ttl",
                                    "allkeys-lfu", "volatile-lfu", "volatile-random"])
def test_an_evicting_redis_makes_the_receiver_not_ready_and_doctor_fail(start, settings, policy, caplog):
    """Any evicting maxmemory-policy: /readyz 503 saying how to fix it, an error at start, doctor FAIL."""
    server = start("--maxmemory", "100mb", "--maxmemory-policy", policy, "--appendonly", "yes")
    with caplog.at_level(logging.ERROR, logger="receiver.app"):
        app = app_on(settings, server)
    assert any(policy in r.getMessage() for r in caplog.records)
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 503
    assert policy in answer.json["checks"]["redis"] and "noeviction" in answer.json["checks"]["redis"]
    check = doctor_check(settings, server)
    assert check["status"] == "FAIL" and "CONFIG SET maxmemory-policy noeviction" in check["reason"]


def test_an_evicting_policy_without_maxmemory_is_refused_too(start, settings):
    """maxmemory unset today may be set tomorrow (or by a container limit): the policy alone decides."""
    server = start("--maxmemory-policy", "allkeys-lru", "--appendonly", "yes")
    assert app_on(settings, server).test_client().get("/readyz").status_code == 503


def test_redis_without_persistence_warns_at_start_and_in_doctor(start, settings, caplog):
    """No AOF and no RDB save points: a loud warning at start, doctor WARN with the fix; still ready."""
    server = start("--appendonly", "no", "--save", "")
    with caplog.at_level(logging.WARNING, logger="receiver.app"):
        app = app_on(settings, server)
    assert any("no persistence" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert app.test_client().get("/readyz").status_code == 200
    check = doctor_check(settings, server)
    assert check["status"] == "WARN" and "appendonly yes" in check["reason"]


@pytest.mark.parametrize("args", [SAFE, ("--maxmemory-policy", "noeviction", "--appendonly", "no",
                                         "--save", "3600 1")], ids=["aof", "rdb"])
def test_a_durable_redis_is_ok(start, settings, args):
    """noeviction with AOF or RDB save points: ready, doctor OK."""
    server = start(*args)
    assert app_on(settings, server).test_client().get("/readyz").status_code == 200
    assert doctor_check(settings, server)["status"] == "OK"


def test_a_managed_redis_refusing_config_get_is_could_not_check(start, settings):
    """CONFIG forbidden (ACL, as managed Redis does): 'could not check', still ready, INFO still sees eviction."""
    server = start(*SAFE)
    server.client.execute_command("ACL", "SETUSER", "default", "on", "nopass", "~*", "&*", "+@all", "-config")
    assert app_on(settings, server).test_client().get("/readyz").status_code == 200
    check = doctor_check(settings, server)
    assert check["status"] == "WARN" and "could not check" in check["reason"]
    server.client.execute_command("ACL", "SETUSER", "default", "-info")
    assert doctor_check(settings, server)["status"] == "WARN"
    evicting = start("--maxmemory-policy", "allkeys-lru", "--appendonly", "yes")
    evicting.client.execute_command("ACL", "SETUSER", "default", "on", "nopass", "~*", "&*", "+@all", "-config")
    assert check_durability(evicting.client).evicting is True
    assert app_on(settings, evicting).test_client().get("/readyz").status_code == 503


def test_the_check_is_cached_and_never_costs_a_round_trip_per_delivery(start, settings):
    """Deliveries and repeated /readyz calls send no CONFIG command; a fixed Redis is seen after the cache."""
    server = start("--maxmemory-policy", "allkeys-lru", "--appendonly", "yes")
    app = app_on(settings, server)
    client = app.test_client()

    def config_calls() -> int:
        stats = server.client.info("commandstats")  # Redis 7 counts ``config|get`` apart
        return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_config"))

    before = config_calls()
    assert before > 0, "the check at start asked CONFIG GET"
    body, _ = capture("update_job_completed.json")
    for n in range(5):
        post(client, body + b" " * n)
        client.get("/readyz")
    assert config_calls() == before
    now = [0.0]
    check = DurabilityCheck(server.client, clock=lambda: now[0])
    assert check.get().evicting
    server.client.config_set("maxmemory-policy", "noeviction")
    assert check.get().evicting, "cached"
    now[0] += 61
    assert check.get().evicting is False
