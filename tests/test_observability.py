"""/metrics counts what every process did (receivers and several worker processes share Redis),
and JSON logs carry the delivery id on each line."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest

from tests.conftest import capture, post, signed


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if m and m[1] == name and ",".join(sorted((m[2] or "").split(","))) == want:
            return float(m[3])
    return 0.0


def workers(n: int, env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """Run ``n`` real `cvat-hooks worker --burst` processes at once until the queues are empty."""
    procs = [subprocess.Popen([sys.executable, "-m", "operations.cli", "worker", "--burst"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_metrics_count_receiver_and_several_workers(client, redis, settings, worker_env):
    """Deliveries, rejections and the attempts of two worker processes all appear at /metrics."""
    bodies = []
    for n in range(6):
        body, _ = capture("create_task.json")
        payload = json.loads(body)
        payload["task"]["id"] = 100 + n
        bodies.append(json.dumps(payload).encode())
    for body in bodies:
        assert post(client, body).status_code == 202
    post(client, bodies[0])  # a duplicate
    post(client, bodies[0], {"X-Signature-256": "sha256=" + "0" * 64})  # a bad signature
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVAT_URL")}
    env.pop("CVAT_ACCESS_TOKEN", None)  # no CVAT: each check_labels fails permanently, quickly
    results = workers(2, env)
    assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, "cvat_hooks_deliveries_total", event="create:task", outcome="queued") == 6
    assert metric(text, "cvat_hooks_deliveries_total", event="create:task", outcome="duplicate") == 1
    assert metric(text, "cvat_hooks_rejected_total", reason="signature_mismatch") == 1
    assert metric(text, "cvat_hooks_action_runs_total", action="check_labels", outcome="failed") == 6
    assert metric(text, "cvat_hooks_action_duration_seconds_count", action="check_labels") == 6
    assert metric(text, "cvat_hooks_jobs_failed", queue="cvat-hooks-actions") == 6
    assert metric(text, "cvat_hooks_queue_depth", queue="cvat-hooks-actions") == 0


def test_json_logs_carry_the_delivery_id(client, redis, worker_env):
    """With CVAT_HOOKS_LOG_FORMAT=json every worker log line is JSON, and lines about a delivery
    name it in a delivery_id field."""
    body, _ = capture("create_task.json")
    delivery_id = post(client, body, signed(body)).json["delivery_id"]
    env = dict(os.environ, CVAT_HOOKS_LOG_FORMAT="json")
    env.pop("CVAT_URL", None)
    [result] = workers(1, env)
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert lines, result.stderr
    ours = [line for line in lines if line.get("delivery_id") == delivery_id]
    assert any("check_labels" in line["message"] and line["level"] == "warning" for line in ours)


# -- what the service says about itself (issue 18, items 4 and 10) -------------------------------


def test_root_says_what_the_service_is_and_where_to_look(client):
    """GET / names the service and its version and links to readiness, metrics, the admin UI and the
    README: JSON for a program, HTML for a browser; the linked README is served."""
    from importlib import metadata

    as_json = client.get("/", headers={"Accept": "application/json"})
    assert as_json.status_code == 200 and as_json.json["service"] == "cvat-hooks"
    assert as_json.json["version"] == metadata.version("cvat-hooks")
    links = {name: link["href"] for name, link in as_json.json["links"].items()}
    assert {"readyz": "/readyz", "metrics": "/metrics", "admin": "/ui/", "readme": "/readme"}.items() <= links.items()
    page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.content_type.startswith("text/html")
    html = page.get_data(as_text=True)
    assert all(f'href="{href}"' in html for href in links.values())
    readme = client.get(links["readme"])
    assert readme.status_code == 200 and readme.get_data(as_text=True).startswith("# cvat-hooks")


def test_readyz_says_actions_needing_cvat_will_fail_and_stays_ready(client, settings, redis):
    """Without CVAT_URL, /readyz has a cvat check saying actions that call CVAT will fail, yet stays ready
    (receiving and recording still work); with CVAT configured the check says so."""
    from core.settings import CvatSettings
    from receiver.app import create_app
    from tests.conftest import with_settings

    answer = client.get("/readyz")
    assert answer.status_code == 200 and answer.json["status"] == "ready"
    assert "CVAT_URL is not set" in answer.json["checks"]["cvat"]
    assert "will fail" in answer.json["checks"]["cvat"]
    cvat = CvatSettings(url="http://127.0.0.1:9", access_token="a-token-for-readyz-only")
    configured = create_app(with_settings(settings, workers=replace(settings.workers, cvat=cvat)), redis=redis)
    assert configured.test_client().get("/readyz").json["checks"]["cvat"] == "configured"


def test_a_413_is_logged(client, settings, caplog):
    """A body over CVAT_HOOKS_MAX_BODY is refused with 413 and one warning line saying so and from whom."""
    body = b'{"event": "ping", "pad": "' + b"x" * settings.max_body + b'"}'
    with caplog.at_level(logging.WARNING, logger="receiver.endpoint"):
        answer = post(client, body)
    assert answer.status_code == 413
    [line] = [r.getMessage() for r in caplog.records if r.name == "receiver.endpoint"]
    assert "413 for POST /webhooks/cvat" in line and f"{len(body)} bytes" in line
    assert "CVAT_HOOKS_MAX_BODY" in line


# -- one log format for every process (issue 18, item 10) ------------------------------------------

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


def test_every_worker_line_is_timestamped(worker_env):
    """Every line a `cvat-hooks worker` writes, RQ's own included, starts with the time, level and logger."""
    proc = subprocess.run([sys.executable, "-m", "operations.cli", "worker", "--burst", "--class", "simple"],
                          env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any(" INFO rq.worker: " in line for line in lines), lines
    assert [line for line in lines if not TIMESTAMPED.match(line)] == []


@pytest.mark.parametrize("level", ["info", "debug"])
def test_rq_registry_maintenance_is_logged_at_debug_only(redis, capsys, level):
    """RQ's "cleaning registries" lines (every 30 s per worker) are DEBUG lines, shown only at
    CVAT_HOOKS_LOG_LEVEL=debug; RQ's other lines stay at INFO."""
    from rq import Queue, SimpleWorker

    from core.logs import configure

    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    try:
        configure("text", level=level)
        worker = SimpleWorker([Queue("maintenance-log", connection=redis)], connection=redis)
        worker.work(burst=True, logging_level="INFO")  # RQ's maintenance runs once at start, then it quits
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
    lines = capsys.readouterr().err.splitlines()
    assert any(" INFO rq.worker: " in line and "started" in line for line in lines), lines
    cleaning = [line for line in lines if "cleaning registries" in line]
    if level == "debug":
        assert cleaning and all(TIMESTAMPED.match(line) and " DEBUG rq.worker: " in line for line in cleaning)
    else:
        assert cleaning == []


def test_gunicorn_and_the_receiver_log_json_when_asked(settings, tmp_path):
    """With CVAT_HOOKS_LOG_FORMAT=json a real `cvat-hooks serve` writes only JSON lines, each with a time:
    gunicorn's own, its access log, and the receiver's (a 413 among them)."""
    from tests.conftest import SECRET, free_port
    from tests.procs import clean_env, wait_for

    port = free_port()
    env = clean_env({"CVAT_HOOKS_LOG_FORMAT": "json", "CVAT_HOOKS_REDIS_URL": settings.redis_url or "",
                     "CVAT_HOOKS_SECRET": SECRET, "CVAT_HOOKS_RULES": str(settings.rules_path),
                     "CVAT_HOOKS_DATA_DIR": str(settings.data_dir), "CVAT_HOOKS_MAX_BODY": "1000"})
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "operations.cli", "serve", "--port", str(port), "--workers", "1",
                                 "--no-worker"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _status(base + "/healthz") == 200, timeout=30), log.read_text()
        assert _status(base + "/webhooks/cvat", b"{" + b" " * 2000 + b"}") == 413
    finally:
        proc.terminate()
        proc.wait(30)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all(re.match(r"^\d{4}-\d\d-\d\dT[\d:.]+Z$", r["time"]) for r in records)
    loggers = {r["logger"] for r in records}
    assert {"gunicorn.error", "gunicorn.access", "receiver.endpoint"} <= loggers, loggers
    assert any(r["logger"] == "gunicorn.access" and '"GET /healthz HTTP/1.1" 200' in r["message"] for r in records)


def _status(url: str, body: bytes | None = None) -> int | None:
    """The HTTP status of a GET (or POST of ``body``), ``None`` when nothing answers."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None
