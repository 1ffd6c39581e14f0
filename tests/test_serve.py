"""`cvat-hooks serve` as the README's trial runs it: real gunicorn, embedded Redis, a worker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from receiver.secrets_store import read_secrets
from receiver.signature import sign
from tests.conftest import ROOT, capture, free_port
from tests.procs import http

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
"""The start of every log line of every process (core.logs)."""


def trial_secret(data_dir: Path) -> str:
    """The one secret of a trial's secrets store (where `register` writes too)."""
    [secret] = read_secrets([data_dir / "webhook-secrets"])
    return secret


@pytest.fixture
def trial(tmp_path: Path):
    """A trial `cvat-hooks serve` in its own data directory and temporary directory, stopped by PID."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVAT_HOOKS_", "CVAT_"))}
    (tmp_path / "tmp").mkdir()
    env.update(CVAT_HOOKS_DATA_DIR=str(tmp_path / "var"), CVAT_HOOKS_RULES=str(ROOT / "rules.yaml"),
               TMPDIR=str(tmp_path / "tmp"), PYTHONUNBUFFERED="1")
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "operations.cli", "serve", "--port", str(port), "--workers", "1"],
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
    secret = trial_secret(data_dir)
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
        out = subprocess.run([sys.executable, "-m", "operations.cli", "deliveries", "show", receipt["delivery_id"],
                              "--json"], env=env, cwd=data_dir.parent, capture_output=True, text=True)
        shown = json.loads(out.stdout) if out.returncode == 0 else {}
        if shown.get("status") == "failed":
            break
        time.sleep(0.2)
    assert shown.get("status") == "failed", shown
    assert "CVAT is not configured" in shown["actions"][0]["error"]["message"]


def test_trial_commands_agree_with_the_running_trial(trial, tmp_path: Path):
    """While the trial runs: the banner's command runs the CLI, doctor finds the secret serve uses, send
    delivers an example signed with it, /readyz says actions needing CVAT will fail (and stays ready);
    after it stops: every log line of every process is timestamped, and nothing is left in TMPDIR."""
    base, data_dir, env, proc = trial
    banner = (tmp_path / "serve.log").read_text()
    [command] = re.findall(r"`(\S+) deliveries list` shows it", banner)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([command, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    checks = {c["name"]: c for c in json.loads(run("doctor", "--json").stdout)["checks"]}
    assert checks["secrets"]["status"] == "OK", checks["secrets"]
    sent = run("send", str(ROOT / "examples/payloads/update_job_completed.json"), "--url", base)
    assert sent.returncode == 0 and sent.stdout.startswith("202 "), sent
    delivery_id = json.loads(sent.stdout.split("\n", 1)[1])["delivery_id"]
    listed = json.loads(run("deliveries", "list", "--json").stdout)
    assert [d["delivery_id"] for d in listed] == [delivery_id]
    status, ready = http(base + "/readyz")
    assert status == 200 and "CVAT_URL is not set" in ready["checks"]["cvat"], ready

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(40) == 0
    lines = (tmp_path / "serve.log").read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("Other commands"))
    logged = [line for line in lines[end + 1:] if line.strip()]
    assert [line for line in logged if not TIMESTAMPED.match(line)] == []
    names = {TIMESTAMPED.match(line)[0].split()[2] for line in logged}  # type: ignore[index]
    assert {"gunicorn.error:", "gunicorn.access:", "rq.worker:"} <= names, names
    assert any("WARNING operations.serve: cvat: CVAT_URL is not set" in line for line in logged)
    assert any("WARNING operations.cli: worker: CVAT_URL is not set" in line for line in logged)
    assert any('gunicorn.access: 127.0.0.1 - - "POST /webhooks/cvat HTTP/1.1" 202' in line for line in logged)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_trial_keeps_its_secret_across_restarts(tmp_path: Path):
    """The trial secret is generated once into the secrets store and reused, so CVAT's webhook keeps working."""
    from receiver.settings import Settings

    first, created = Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path)}).with_trial_secret()
    again, created_again = Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path)}).with_trial_secret()
    assert created and not created_again
    assert first.secrets == again.secrets == (trial_secret(tmp_path),)
    assert oct((tmp_path / "webhook-secrets").stat().st_mode & 0o777) == "0o600"
    assert not (tmp_path / "webhook-secret").exists()


def test_an_older_trial_secret_moves_into_the_store_once(tmp_path: Path):
    """A trial secret an older version kept in var/webhook-secret is taken into the store and the file
    deleted: the webhook set up with it keeps working, and doctor finds it where register writes."""
    from operations.doctor import Status, doctor
    from receiver.settings import Settings

    (tmp_path / "webhook-secret").write_text("an-older-trial-secret-0123456789abcdef\n")
    env = {"CVAT_HOOKS_DATA_DIR": str(tmp_path), "CVAT_HOOKS_RULES": str(ROOT / "rules.yaml")}
    before = {c.name: c for c in doctor(Settings.from_env(env), gateway=None, redis=None).checks}
    assert before["secrets"].status is Status.FAIL and "moves it into" in before["secrets"].reason
    settings, created = Settings.from_env(env).with_trial_secret()
    assert not created
    assert settings.secrets == ("an-older-trial-secret-0123456789abcdef",)
    assert not (tmp_path / "webhook-secret").exists()
    assert trial_secret(tmp_path) == "an-older-trial-secret-0123456789abcdef"
    again, created_again = Settings.from_env(env).with_trial_secret()
    assert again.secrets == settings.secrets and not created_again
    after = {c.name: c for c in doctor(Settings.from_env(env), gateway=None, redis=None).checks}
    assert after["secrets"].status is Status.OK, after["secrets"]


def test_production_serve_without_secret_refuses(tmp_path: Path):
    """`serve` with a Redis configured but no secret exits with a message naming CVAT_HOOKS_SECRET."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVAT_HOOKS_", "CVAT_"))}
    env["CVAT_HOOKS_REDIS_URL"] = "redis://127.0.0.1:1/0"
    out = subprocess.run([sys.executable, "-m", "operations.cli", "serve", "--port", str(free_port())],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "CVAT_HOOKS_SECRET" in out.stderr


def test_the_trial_banner_is_one_log_line_without_the_secret_in_json_mode(tmp_path: Path, capsys, caplog):
    """With CVAT_HOOKS_LOG_FORMAT=json the trial banner is a log line (no plain text among the JSON lines)
    naming where the secret is kept, never the secret; in text mode it prints the secret and the CLI."""
    import logging

    from operations.serve import ServeOptions, print_trial_banner
    from receiver.settings import Settings

    env = {"CVAT_HOOKS_DATA_DIR": str(tmp_path), "CVAT_HOOKS_LOG_FORMAT": "json"}
    settings, created = Settings.from_env(env).with_trial_secret()
    with caplog.at_level(logging.INFO, logger="operations.serve"):
        print_trial_banner(settings, ServeOptions(), created)
    assert capsys.readouterr().out == ""
    [line] = [r.getMessage() for r in caplog.records if r.name == "operations.serve"]
    assert str(tmp_path / "webhook-secrets") in line and settings.secrets[0] not in line
    print_trial_banner(Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path)}), ServeOptions(), False)
    text = capsys.readouterr().out
    assert settings.secrets[0] in text and "deliveries list` shows it" in text
