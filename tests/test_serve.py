"""`cvat-hooks serve` as the README's trial runs it: real gunicorn, embedded Redis, a worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from receiver.signature import sign
from tests.conftest import ROOT, capture, free_port
from tests.procs import http


@pytest.fixture
def trial(tmp_path: Path):
    """A trial `cvat-hooks serve` in its own data directory, stopped by PID afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVAT_HOOKS_", "CVAT_"))}
    env.update(CVAT_HOOKS_DATA_DIR=str(tmp_path / "var"), CVAT_HOOKS_RULES=str(ROOT / "rules.yaml"))
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "receiver.cli", "serve", "--port", str(port), "--workers", "1"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if http(base + "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("serve did not come up")
        yield base, tmp_path / "var", env, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(40)
        log.close()


def test_trial_serves_verifies_and_runs_a_worker(trial):
    """The trial generates and keeps a secret, verifies with it, queues, and its worker runs the job."""
    base, data_dir, env, proc = trial
    secret = (data_dir / "webhook-secret").read_text().strip()
    assert len(secret) >= 32
    ping, _ = capture("ping.json")
    assert http(base + "/webhooks/cvat", ping, {"X-Signature-256": sign(ping, "mykey")})[0] == 401
    assert http(base + "/webhooks/cvat", ping, {"X-Signature-256": sign(ping, secret)}) [1]["status"] == "ping"
    body, _ = capture("create_task.json")
    status, receipt = http(base + "/webhooks/cvat", body, {"X-Signature-256": sign(body, secret),
                                                            "Content-Type": "application/json"})
    assert status == 202, receipt
    assert http(base + "/readyz")[0] == 200
    # No CVAT is configured in the trial: the worker runs the job and records a clear permanent failure.
    shown: dict = {}
    for _ in range(100):
        out = subprocess.run([sys.executable, "-m", "receiver.cli", "deliveries", "show", receipt["delivery_id"],
                              "--json"], env=env, cwd=data_dir.parent, capture_output=True, text=True)
        shown = json.loads(out.stdout) if out.returncode == 0 else {}
        if shown.get("status") == "failed":
            break
        time.sleep(0.2)
    assert shown.get("status") == "failed", shown
    assert "CVAT is not configured" in shown["actions"][0]["error"]["message"]


def test_trial_keeps_its_secret_across_restarts(tmp_path: Path):
    """The trial secret is generated once and reused, so CVAT's webhook keeps working."""
    from receiver.settings import Settings

    settings = Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path)})
    first, created = settings.with_trial_secret()
    again, created_again = settings.with_trial_secret()
    assert created and not created_again
    assert first.secrets == again.secrets
    assert oct((tmp_path / "webhook-secret").stat().st_mode & 0o777) == "0o600"


def test_production_serve_without_secret_refuses(tmp_path: Path):
    """`serve` with a Redis configured but no secret exits with a message naming CVAT_HOOKS_SECRET."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVAT_HOOKS_", "CVAT_"))}
    env["CVAT_HOOKS_REDIS_URL"] = "redis://127.0.0.1:1/0"
    out = subprocess.run([sys.executable, "-m", "receiver.cli", "serve", "--port", str(free_port())],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "CVAT_HOOKS_SECRET" in out.stderr
