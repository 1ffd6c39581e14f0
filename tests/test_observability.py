"""/metrics counts what every process did (receivers and several worker processes share Redis),
and JSON logs carry the delivery id on each line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

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
    procs = [subprocess.Popen([sys.executable, "-m", "receiver.cli", "worker", "--burst"], env=env,
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
