"""Export: the time an export takes beyond the CVAT server's own, and the worker's memory growth.

The real export action runs in the shipped worker (``cvat-hooks worker``, its default ``split``
setup: a parent, its light children, and the exports child that runs the export in-process) against
the test CVAT server (``python -m tests.cvat_server``), which streams generated exports without
holding them, and an S3 endpoint served by moto in a process of its own. Only the worker's
process tree is measured: moto keeps uploaded objects in memory, which says nothing about
cvat-hooks.

- overhead: a small export (1 MB) that the server takes ``export_seconds`` to prepare; overhead is
  the time from queuing the job to the action's end, minus ``export_seconds``. Split into queue ->
  action start, the action before the server finishes (login, format check), the polling
  overshoot (``server_seconds`` as the worker saw it, minus the server's time) and the rest
  (download, commit).
- memory: one 500 MB export to a local path and one to S3. Growth is the peak of the worker tree
  while exporting minus the idle tree just before; shown as RSS (the issue's measure) and PSS,
  which does not count the pages the children share with their parent several times. A 5 MB
  export is measured the same way, to separate what any export costs from what grows with the file.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import procs
from bench.procs import MB, Proc, RedisProc, TreeSampler

BUCKET = "cvat-bench"
FORMAT = "CVAT for images 1.1"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": "/nonexistent/aws-config",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}


def _ts(iso: str | None) -> float | None:
    """A delivery-log timestamp (``2026-11-22T18:49:28.866Z``) as epoch seconds."""
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@contextmanager
def cvat_server(work: Path, *, size_mb: float, export_seconds: float) -> Iterator[str]:
    """The test CVAT server alone, in its own process; yields its URL."""
    port = procs.free_port()
    proc = procs.start(f"cvat-server-{size_mb:g}mb", [sys.executable, "-m", "tests.cvat_server", "--port",
                                                      str(port), "--export-size-mb", str(size_mb),
                                                      "--export-seconds", str(export_seconds)],
                       log_dir=work / "logs")
    try:
        procs.wait_port(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@contextmanager
def moto_server(work: Path) -> Iterator[str]:
    """moto's S3 in its own process (its memory is not the worker's); a bucket made; yields the URL."""
    import boto3  # type: ignore[import-untyped]

    port = procs.free_port()
    proc = procs.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                       log_dir=work / "logs")
    try:
        procs.wait_port(port, proc)
        url = f"http://127.0.0.1:{port}"
        client = boto3.session.Session().client(
            "s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
            region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        client.close()
        yield url
    finally:
        proc.stop()


@contextmanager
def worker(work: Path, redis: RedisProc, cvat_url: str, s3_url: str | None,
           extra_env: dict[str, str] | None = None) -> Iterator[Proc]:
    """The shipped worker (``split``), configured for the test CVAT server and moto."""
    from rq import Worker

    from tests.cvat_server import DEFAULT_TOKEN

    env = {"CVAT_HOOKS_REDIS_URL": redis.url, "CVAT_HOOKS_DATA_DIR": str(work / "data"),
           "CVAT_URL": cvat_url, "CVAT_ACCESS_TOKEN": DEFAULT_TOKEN, **AWS_ENV}
    if s3_url:
        env["AWS_ENDPOINT_URL"] = s3_url
    env.update(extra_env or {})
    before = Worker.count(connection=redis.client)
    proc = procs.start("export-worker", [sys.executable, "-m", "bench.worker", "--class", "split"], env=env,
                       log_dir=work / "logs")
    try:
        deadline = time.monotonic() + 60
        while Worker.count(connection=redis.client) < before + 2:  # both children
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"export worker did not start:\n{proc.tail()}")
            time.sleep(0.05)
        time.sleep(1.0)  # settle: each child's scheduler process forks off after registration
        yield proc
    finally:
        proc.stop()


def export_once(redis: RedisProc, proc: Proc, sampler: TreeSampler, to: str, *,
                timeout: float) -> dict[str, Any]:
    """Queue one export of job 1 like the receiver would, wait for its end, measure it."""
    from bench.dispatch import Queuer
    from core.contract import EXPORT_QUEUE, ActionCall
    from core.delivery_log import DeliveryLog
    from core.retry import RetryPolicy

    # A new updated_date each time: a new version of the job, so the export is not skipped as done.
    updated = datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    delivery_id = hashlib.sha256(f"export-{updated}".encode()).hexdigest()
    event = {"event": "update:job", "resource": "job", "resource_id": 1, "job_id": 1, "task_id": 2,
             "project_id": 1, "org_id": None, "updated_date": updated, "webhook_id": 1, "object": None}
    call = ActionCall(delivery_id=delivery_id, rule_id="bench-export", index=0, action="export",
                      params={"resource": "job", "format": FORMAT, "to": to}, event=event,
                      retry=RetryPolicy(attempts=0, backoff=()), queue=EXPORT_QUEUE)
    log = DeliveryLog(redis.client, retention_seconds=86400)
    idle = sampler.mark("idle")
    since = time.monotonic()
    queued = time.time()
    Queuer(redis.client).queue([call])
    deadline = time.monotonic() + timeout
    action: dict[str, Any] = {}
    while time.monotonic() < deadline:
        record = log.get(delivery_id)
        action = record.actions.get(call.job_id, {}) if record else {}
        if action.get("status") in ("succeeded", "failed", "skipped"):
            break
        if not proc.alive():
            raise RuntimeError(f"export worker died:\n{proc.tail()}")
        time.sleep(0.05)
    else:
        raise RuntimeError(f"export to {to} did not finish within {timeout:g}s:\n{proc.tail()}")
    if action["status"] != "succeeded":
        raise RuntimeError(f"export to {to} {action['status']}: {action.get('error')}\n{proc.tail()}")
    time.sleep(0.3)  # the worker's own bookkeeping ends after the log says succeeded
    peak, peak_pss = sampler.peak(since), sampler.peak_pss(since)
    result = action.get("result") or {}
    started, finished = _ts(action.get("started_at")), _ts(action.get("finished_at"))
    timeline = record.timeline if record else []
    notes = {step.get("message", "").split(" ", 1)[0]: _ts(step.get("t")) for step in timeline
             if step.get("job_id") == call.job_id and step.get("step") == "note"}
    return {
        "to": to, "size_mb": round((result.get("size") or 0) / MB, 1),
        "total_s": round((finished or 0) - queued, 3),
        "queue_to_start_s": round((started or 0) - queued, 3),
        "action_s": action.get("duration"), "server_seconds": result.get("server_seconds"),
        "steps": _steps(started, notes, finished, result.get("server_seconds")),
        "rss_idle_mb": round(idle.rss / MB, 1), "rss_peak_mb": round(peak.rss / MB, 1),
        "rss_growth_mb": round((peak.rss - idle.rss) / MB, 1),
        "pss_idle_mb": round(idle.pss / MB, 1), "pss_peak_mb": round(peak_pss.pss / MB, 1),
        "pss_growth_mb": round((peak_pss.pss - idle.pss) / MB, 1),
    }


def _steps(started: float | None, notes: dict[str, float | None], finished: float | None,
           server_seconds: float | None) -> dict[str, float | None]:
    """Where an action's time went, from its timeline notes (``export started``, ``downloaded``,
    ``committed``): before the export request (plan, login, format check, staging), after the server
    was seen finished until the file was here (download), the commit (fsync and rename, or the upload),
    and from the commit to the recorded end (closing the clients, the worker's bookkeeping)."""
    began, downloaded, committed = notes.get("export"), notes.get("downloaded"), notes.get("committed")

    def span(a: float | None, b: float | None, minus: float = 0.0) -> float | None:
        return round(b - a - minus, 3) if a is not None and b is not None else None

    return {"before_request_s": span(started, began),
            "download_s": span(began, downloaded, server_seconds or 0.0),
            "commit_s": span(downloaded, committed), "end_s": span(committed, finished)}


def run(work: Path, *, size_mb: float, small_mb: float = 5.0, export_seconds: float = 2.0, reps: int = 3,
        worker_env: dict[str, str] | None = None, log: Callable[[str], None]) -> dict[str, Any]:
    """The whole export phase."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    out: dict[str, Any] = {"export_seconds": export_seconds, "size_mb": size_mb}
    with RedisProc(work / "redis") as redis, moto_server(work) as s3_url:
        # 1. overhead over the server's own time, on a small file
        with cvat_server(work, size_mb=1, export_seconds=export_seconds) as url, \
                worker(work, redis, url, s3_url, worker_env) as proc:
            sampler = TreeSampler(proc.pid, interval=0.05).start()
            try:
                runs = []
                for i in range(reps):
                    r = export_once(redis, proc, sampler, f"exports/bench/overhead-{i}.zip", timeout=120)
                    r["overhead_s"] = round(r["total_s"] - export_seconds, 3)
                    r["poll_overshoot_s"] = round((r["server_seconds"] or 0) - export_seconds, 3)
                    runs.append(r)
                    log(f"export: overhead run {i + 1}: total {r['total_s']:.2f}s for a {export_seconds:g}s "
                        f"server export -> +{r['overhead_s']:.2f}s "
                        f"(queue->start {r['queue_to_start_s']:.2f}s, "
                        f"seen finished after {r['server_seconds']}s; steps {r['steps']})")
            finally:
                sampler.stop()
        out["overhead"] = {"runs": runs, "export_seconds": export_seconds,
                           "median_overhead_s": statistics.median(r["overhead_s"] for r in runs),
                           "median_queue_to_start_s": statistics.median(r["queue_to_start_s"] for r in runs),
                           "median_poll_overshoot_s": statistics.median(r["poll_overshoot_s"] for r in runs)}
        # 2. memory, small then large, local then S3
        out["memory"] = {}
        for size in (small_mb, size_mb):
            with cvat_server(work, size_mb=size, export_seconds=0.2) as url, \
                    worker(work, redis, url, s3_url, worker_env) as proc:
                sampler = TreeSampler(proc.pid, interval=0.05).start()
                try:
                    for where, to in (("local", f"exports/bench/big-{size:g}.zip"),
                                      ("s3", f"s3://{BUCKET}/exports/big-{size:g}.zip")):
                        r = export_once(redis, proc, sampler, to, timeout=900)
                        r["overhead_s"] = round(r["total_s"] - 0.2, 3)
                        r["mb_per_s"] = round(size / r["total_s"], 1) if r["total_s"] else None
                        out["memory"][f"{where}-{size:g}mb"] = r
                        log(f"export: {size:g} MB to {where}: {r['total_s']:.1f}s, worker RSS "
                            f"{r['rss_idle_mb']} -> {r['rss_peak_mb']} MB (+{r['rss_growth_mb']}), PSS "
                            f"+{r['pss_growth_mb']} MB; steps {r['steps']}")
                        local = data / to if not to.startswith("s3://") else None
                        if local is not None and local.exists():
                            local.unlink()  # 500 MB of disk back
                finally:
                    sampler.stop()
    out["memory_note"] = json.dumps({"measured": "worker process tree only (moto and the CVAT server apart)"})
    return out
