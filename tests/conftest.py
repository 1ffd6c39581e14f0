"""Shared fixtures: a real redis-server on a free loopback port, settings, the app, CVAT payloads."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from core.delivery_log import DeliveryLog
from core.settings import WorkerSettings
from receiver.app import create_app
from receiver.settings import Settings
from receiver.signature import sign
from tests.captures import PAYLOADS as PAYLOADS  # re-exported: the tests' one import
from tests.captures import capture as capture
from tests.procs import free_port as free_port
from tests.procs import redis_binary as redis_binary

ROOT = Path(__file__).resolve().parents[1]
SECRET = "mykey"
"""The secret the captured CVAT 2.73 deliveries were signed with."""

# The test CVAT server's fixtures (cvat_server, cvat_settings, webhook_sink...) for every test module.
pytest_plugins = ("tests.cvat_fixtures", "tests.live_receiver")




class RedisServer:
    """A real redis-server we started, stopped by its PID."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             # An RDB save point (never reached in a test run) makes it a Redis that persists, as the
             # receiver requires of a production one (core.redis_conn's durability check).
             "--save", "3600 1", "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return self
            except Exception:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[Redis]:
    """A clean Redis database for one test."""
    client = Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    """A copy of the shipped rules.yaml a test may rewrite."""
    path = tmp_path / "rules.yaml"
    shutil.copy(ROOT / "rules.yaml", path)
    return path


@pytest.fixture
def settings(redis_server: RedisServer, redis: Redis, rules_file: Path, tmp_path: Path) -> Settings:
    return Settings(
        secrets=(SECRET,),
        rules_path=rules_file,
        workers=WorkerSettings(redis_url=redis_server.url, data_dir=tmp_path / "data"),
    )


@pytest.fixture
def worker_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The environment a worker process of these settings reads (set for in-process workers too)."""
    from workers import jobs

    env = {"CVAT_HOOKS_REDIS_URL": settings.redis_url or "", "CVAT_HOOKS_DATA_DIR": str(settings.data_dir)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    jobs.runtime.cache_clear()
    yield env
    jobs.runtime.cache_clear()


@pytest.fixture
def app(settings: Settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-Signature-256": sign(body, secret), "Content-Type": "application/json"}


def post(client, body: bytes, headers: dict[str, str] | None = None):
    """POST a delivery the way CVAT does."""
    return client.post("/webhooks/cvat", data=body, headers=headers if headers is not None else signed(body))


def with_settings(settings: Settings, **changes) -> Settings:
    return replace(settings, **changes)


os.environ.setdefault("CVAT_HOOKS_LOG_FORMAT", "text")


def stored(_action: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Show a delivery's action parameters as Redis holds them (``Delivery.to_json(shown=stored)``): a
    test that no secret is at rest must read what is stored, not what the registry would show."""
    return dict(params)


def succeed(log: DeliveryLog, delivery_id: str, job_id: str, result: dict[str, Any]) -> None:
    """Record a successful first attempt of an action the way a worker does (``Attempt``)."""
    attempt = log.attempt(delivery_id, job_id, 1)
    attempt.start()
    attempt.succeeded(result)
