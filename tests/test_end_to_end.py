"""Deliveries all the way through: signed bytes -> receiver -> Redis -> RQ worker -> cvat-sdk -> storage.

Real parts only: a real redis-server, real RQ workers (in-process SimpleWorker in burst mode, and
the `cvat-hooks worker` command as a subprocess), cvat-sdk over HTTP to the test CVAT server, and
moto's S3 server over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rq.registry import FailedJobRegistry

from core.contract import EXPORT_QUEUE
from core.delivery_log import DeliveryLog
from core.queueing import queue
from core.replay import NothingToReplay, replay
from tests.conftest import capture, post, stored
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer
from tests.moto_s3 import bucket, s3_endpoint, use_endpoint
from workers.worker import build_worker

RULES = """
version: 1
rules:
  - id: export-finished-jobs
    on: update:job
    if:
      job.state: {became: completed}
      job.stage: acceptance
    do:
      - action: export
        resource: job
        format: CVAT for images 1.1
        to: %(to)s
    retry: {attempts: 2, backoff: [0]}
  - id: check-new-task-labels
    on: create:task
    do:
      - action: check_labels
        require: [car, person, bicycle]
        on_mismatch: report
"""


@pytest.fixture
def e2e(settings, cvat_server: CvatTestServer, monkeypatch: pytest.MonkeyPatch, worker_env):
    """Receiver settings and a worker environment pointed at the test CVAT server."""
    monkeypatch.setenv("CVAT_URL", cvat_server.url)
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", DEFAULT_TOKEN)
    monkeypatch.setenv("CVAT_HOOKS_CVAT_POLL_SECONDS", "0.1")
    settings.rules_path.write_text(RULES % {"to": "exports/{project_id}/{task_id}/job-{job_id}.zip"})
    return settings


def drain(settings) -> None:
    """Run a real RQ worker until the queues are empty."""
    from workers import jobs

    jobs.runtime.cache_clear()
    build_worker(settings.workers, kind="simple").work(burst=True, with_scheduler=False)


def delivery(redis, delivery_id: str):
    return DeliveryLog(redis, retention_seconds=60).get(delivery_id)


def only_export(server: CvatTestServer) -> str:
    [rq_id] = list(server.state.requests)
    return rq_id


def test_completed_job_is_exported_to_the_rendered_path(e2e, client, redis, cvat_server):
    """update_job_completed.json writes the job's export at exports/1/2/job-1.zip, byte for byte."""
    body, headers = capture("update_job_completed.json")
    answer = post(client, body, {"X-Signature-256": headers["X-Signature-256"]})
    assert answer.status_code == 202
    drain(e2e)
    target = e2e.data_dir / "exports" / "1" / "2" / "job-1.zip"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == cvat_server.export_digest(only_export(cvat_server))
    record = delivery(redis, answer.json["delivery_id"])
    assert record.status.value == "succeeded"
    [action] = record.actions.values()
    assert action["result"]["size"] == target.stat().st_size
    assert action["result"]["format"] == "CVAT for images 1.1"
    assert action["result"]["uri"].endswith("exports/1/2/job-1.zip")
    assert [s["step"] for s in record.timeline if s["step"] != "note"] == ["received", "started", "succeeded"]
    assert not list(target.parent.glob("*.tmp*")), "no temporary file left behind"


def test_new_task_gets_a_label_report(e2e, client, redis):
    """create_task.json produces a label report (from the task's project) in the delivery record."""
    body, _ = capture("create_task.json")
    answer = post(client, body)
    drain(e2e)
    [action] = delivery(redis, answer.json["delivery_id"]).actions.values()
    assert action["status"] == "succeeded"
    report = action["result"]
    assert report["missing"] == ["bicycle"]
    assert sorted(report["matched"]) == ["car", "person"]
    assert report["source"] == "project"


def test_cvat_503_is_retried_then_succeeds(e2e, client, redis, cvat_server):
    """A 503 from CVAT is recorded as a transient failure, retried, and the retry succeeds."""
    cvat_server.fail_next(1, 503, path="/api/")
    body, _ = capture("update_job_completed.json")
    answer = post(client, body)
    drain(e2e)
    record = delivery(redis, answer.json["delivery_id"])
    [action] = record.actions.values()
    assert action["status"] == "succeeded" and action["attempts"] == 2
    [failed] = [s for s in record.timeline if s["step"] == "retrying"]
    assert failed["error"]["kind"] == "transient" and "503" in failed["error"]["message"]
    assert (e2e.data_dir / "exports/1/2/job-1.zip").exists()


def test_cvat_404_gives_up_at_once(e2e, client, redis, cvat_server):
    """A 404 is permanent: one attempt, recorded as failed, in RQ's failed registry, no retry."""
    body, _ = capture("update_job_completed.json")
    payload = json.loads(body)
    payload["job"]["id"] = 99
    answer = post(client, json.dumps(payload).encode())
    drain(e2e)
    record = delivery(redis, answer.json["delivery_id"])
    [action] = record.actions.values()
    assert action["status"] == "failed" and action["attempts"] == 1
    assert action["error"]["kind"] == "permanent" and "404" in action["error"]["message"]
    assert DEFAULT_TOKEN not in json.dumps(record.to_json(shown=stored))
    assert FailedJobRegistry(queue=queue(EXPORT_QUEUE, redis)).get_job_ids() == [action["job_id"]]
    assert record.status.value == "failed"


def test_a_duplicate_delivery_exports_once(e2e, client, redis, cvat_server):
    """A CVAT retry and a reordered redelivery of the same event cause one export, and a replay
    of the finished delivery without --force changes nothing."""
    body, _ = capture("update_job_completed.json")
    first = post(client, body)
    post(client, body)
    post(client, json.dumps(dict(reversed(list(json.loads(body).items())))).encode())
    drain(e2e)
    assert len(cvat_server.calls("POST", "/api/jobs/1/dataset/export")) == 1
    log = DeliveryLog(redis, retention_seconds=60)
    with pytest.raises(NothingToReplay):
        replay(log, log.get(first.json["delivery_id"]))
    # Even a forced replay of the same resource version writes nothing new: it is already exported.
    replay(log, log.get(first.json["delivery_id"]), force=True)
    drain(e2e)
    assert len(cvat_server.calls("POST", "/api/jobs/1/dataset/export")) == 1
    actions = log.get(first.json["delivery_id"]).actions
    assert sorted(a["status"] for a in actions.values()) == ["skipped", "succeeded"]


def test_replay_recovers_a_failed_delivery(e2e, client, redis, cvat_server):
    """When retries run out the failure is visible, and a replay after CVAT is back succeeds."""
    cvat_server.down()
    body, _ = capture("update_job_completed.json")
    answer = post(client, body)
    drain(e2e)
    log = DeliveryLog(redis, retention_seconds=60)
    failed = log.get(answer.json["delivery_id"])
    [action] = failed.actions.values()
    assert action["status"] == "failed" and action["attempts"] == 3
    cvat_server.up()
    [job_id] = replay(log, failed)
    assert job_id.endswith("-r1")
    drain(e2e)
    assert log.get(answer.json["delivery_id"]).status.value == "succeeded"
    assert (e2e.data_dir / "exports/1/2/job-1.zip").exists()


def test_export_to_s3_is_multipart_and_streamed(e2e, redis, cvat_server, monkeypatch, tmp_path):
    """An export to s3:// lands in an S3-compatible store (moto over HTTP) as a multipart upload."""
    from receiver.app import create_app

    cvat_server.export_size = 20 * 1024 * 1024  # over boto3's 8 MB multipart threshold
    e2e.rules_path.write_text(RULES % {"to": "s3://cvat-exports/{project_id}/job-{job_id}.zip"})
    client = create_app(e2e).test_client()
    with s3_endpoint() as endpoint:
        use_endpoint(monkeypatch, endpoint, tmp_path)
        with bucket("cvat-exports") as s3:
            body, _ = capture("update_job_completed.json")
            answer = post(client, body)
            drain(e2e)
            [action] = delivery(redis, answer.json["delivery_id"]).actions.values()
            assert action["status"] == "succeeded", action
            head = s3.head_object(Bucket="cvat-exports", Key="1/job-1.zip")
            assert head["ContentLength"] == 20 * 1024 * 1024
            assert "-" in head["ETag"], "a multipart upload"
            digest = hashlib.sha256(s3.get_object(Bucket="cvat-exports", Key="1/job-1.zip")["Body"].read())
            assert digest.hexdigest() == cvat_server.export_digest(only_export(cvat_server))
    assert not list((e2e.data_dir / "tmp").glob("*")), "the staging file was removed"


def test_cvat_hooks_worker_command_runs_jobs(e2e, client, redis, cvat_server):
    """The `cvat-hooks worker --burst` command (forking worker) runs a queued export."""
    body, _ = capture("update_job_completed.json")
    answer = post(client, body)
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-m", "operations.cli", "worker", "--burst"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert delivery(redis, answer.json["delivery_id"]).status.value == "succeeded"
    assert Path(e2e.data_dir / "exports/1/2/job-1.zip").exists()
    assert DEFAULT_TOKEN not in done.stderr + done.stdout
