"""End to end against the way people do this today: adnanh/webhook running a cvat-sdk script per event.

Both sides get the same signed CVAT deliveries (the captured ``update:job`` "completed" delivery of
CVAT 2.73, one job id per event) at the same fixed rate, and export each job, 1 MiB, from the same
test CVAT server (``bench.cvat_stand_in``, in a process of its own) to a local file:

- **adnanh/webhook** (the Debian package ``webhook``): a hook whose ``trigger-rule`` checks the HMAC
  on ``X-Signature-256`` (``payload-hmac-sha256``; webhook strips the ``sha256=`` prefix CVAT sends)
  and that the event is a completed job, then runs ``bench/adnanh_export.py`` (the script through
  ``pass-arguments-to-command``, the job id through ``pass-environment-to-command``, CVAT's address
  and login through the environment it inherits): cvat-sdk's ``make_client`` and ``export_dataset``
  with the SDK's defaults, the way the scripts people share do it. webhook answers at once and runs the script
  in the background, one process per event.
- **cvat-hooks**: ``cvat-hooks serve`` and ``cvat-hooks worker`` (its shipped ``split`` setup) on a
  production-like Redis, with one rule exporting the job on the same event.

Measured per side, in one run: events per second from the first delivery sent to the last export
on disk, and each event's latency from just before its POST to the file's modification time (the
moment its last byte was written), p50/p99/max. A file counts once it has the export's full size.
The two sides run one after the other, so neither takes CPU from the other. Without the ``webhook``
binary the adnanh side is skipped with a message and cvat-hooks is still measured.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import procs, stack
from bench.procs import RedisProc

FORMAT = "CVAT for images 1.1"
EXPORT_MB = 1.0
"""Size of every export: a job's annotations, small enough that transfer is not what is measured."""
SCRIPT = Path(__file__).resolve().parent / "adnanh_export.py"
HOOK_ID = "cvat-export"
ACCEPTED = "export started"
"""webhook's answer when the trigger rule holds (its ``response-message``)."""
CVAT_USER, CVAT_PASSWORD = "admin", "admin-password"
"""The stand-in's seeded administrator: a script logs in as a person would."""
SKIPPED_NO_WEBHOOK = ("skipped: the webhook binary (adnanh/webhook) is not installed; "
                      "apt-get install -y webhook to compare against it")

RULES = f"""\
version: 1
rules:
  - id: export-completed-jobs
    description: Export each job once it is completed (the bench's adnanh/webhook comparison).
    on: update:job
    if:
      job.state: {{became: completed}}
    do:
      - action: export
        resource: job
        format: {FORMAT}
        to: exports/job-{{job_id}}.zip
"""


def hooks_json(path: Path) -> Path:
    """adnanh/webhook's hooks.json: verify, check the event, run the export script with the job id."""
    hooks = [{
        "id": HOOK_ID,
        "execute-command": sys.executable,
        "command-working-directory": str(procs.ROOT),
        "response-message": ACCEPTED,
        "trigger-rule-mismatch-http-response-code": 401,
        "pass-arguments-to-command": [
            {"source": "string", "name": str(SCRIPT)},
        ],
        "pass-environment-to-command": [
            {"source": "payload", "name": "job.id", "envname": "CVAT_JOB_ID"},
        ],
        "trigger-rule": {"and": [
            {"match": {"type": "payload-hmac-sha256", "secret": stack.SECRET,
                       "parameter": {"source": "header", "name": "X-Signature-256"}}},
            {"match": {"type": "value", "value": "update:job",
                       "parameter": {"source": "payload", "name": "event"}}},
            {"match": {"type": "value", "value": "completed",
                       "parameter": {"source": "payload", "name": "job.state"}}},
        ]},
    }]
    path.write_text(json.dumps(hooks, indent=2))
    return path


def send(post: Callable[[bytes, str], tuple[int, bytes]], events: Sequence[tuple[int, bytes, str]], *,
         rate: float, ok: int, answers: dict[int, bytes] | None = None) -> tuple[dict[int, float], dict[str, Any]]:
    """POST ``events`` (job id, body, signature) one every ``1/rate`` s; the send time of each (and
    each answer's body into ``answers``)."""
    sent_at: dict[int, float] = {}
    statuses: dict[str, int] = {}
    late = 0
    start = time.perf_counter()
    for i, (job_id, body, signature) in enumerate(events):
        pause = start + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        elif pause < -0.05:
            late += 1
        sent_at[job_id] = time.time()
        status, answer = post(body, signature)
        if answers is not None:
            answers[job_id] = answer
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    took = time.perf_counter() - start
    if statuses.get(str(ok), 0) != len(events):
        raise RuntimeError(f"not every delivery was accepted ({ok} expected): {statuses}")
    return sent_at, {"answers": statuses, "late_sends": late,
                     "achieved_rate": round(len(events) / took, 2) if took else None}


def collect(out_dir: Path, sent_at: dict[int, float], *, size: int, timeout: float,
            alive: Callable[[], None] = lambda: None,
            failed: Callable[[], dict[int, str]] = dict) -> dict[str, Any]:
    """Wait for every job's file at its full size (or its ``.error``, or ``failed()`` naming it, read
    once a second); latency and throughput."""
    deadline = time.monotonic() + timeout
    written: dict[int, float] = {}
    errors: dict[int, str] = {}
    checked = time.monotonic()
    while len(written) + len(errors) < len(sent_at) and time.monotonic() < deadline:
        alive()
        if time.monotonic() - checked >= 1.0:
            checked = time.monotonic()
            errors.update({j: e for j, e in failed().items() if j not in written})
        for job_id in sent_at:
            if job_id in written or job_id in errors:
                continue
            path = out_dir / f"job-{job_id}.zip"
            error = out_dir / f"job-{job_id}.error"
            if error.exists():
                errors[job_id] = error.read_text()[-500:]
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if st.st_size >= size:
                written[job_id] = st.st_mtime
        time.sleep(0.05)
    lat = [(written[j] - sent_at[j]) * 1000 for j in written]
    first = min(sent_at.values())
    span = max(written.values()) - first if written else None
    return {"events": len(sent_at), "written": len(written), "errors": len(errors),
            "first_error": next(iter(errors.values()), None),
            "seconds_to_last_file": round(span, 3) if span else None,
            "events_per_second": round(len(written) / span, 2) if span else 0.0,
            "p50_ms": _r(stack.percentile(lat, 50)), "p99_ms": _r(stack.percentile(lat, 99)),
            "max_ms": _r(max(lat) if lat else None)}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def run_webhook(work: Path, cvat: stack.StandIn, events: Sequence[tuple[int, bytes, str]], *, rate: float,
                timeout: float, log: Callable[[str], None]) -> dict[str, Any]:
    """adnanh/webhook and its per-event script."""
    if shutil.which("webhook") is None:
        log(f"adnanh: {SKIPPED_NO_WEBHOOK}")
        return {"skipped": SKIPPED_NO_WEBHOOK}
    out_dir = work / "webhook-exports"
    out_dir.mkdir(parents=True, exist_ok=True)
    host, port = cvat.url.rsplit(":", 1)  # "http://127.0.0.1", as a script names a CVAT without TLS
    env = {"BENCH_CVAT_HOST": host, "BENCH_CVAT_PORT": port, "BENCH_CVAT_USER": CVAT_USER,
           "BENCH_CVAT_PASSWORD": CVAT_PASSWORD, "BENCH_EXPORT_DIR": str(out_dir), "BENCH_EXPORT_FORMAT": FORMAT}
    hook_port = procs.free_port()
    proc = procs.start("webhook", ["webhook", "-hooks", str(hooks_json(work / "hooks.json")), "-ip", "127.0.0.1",
                                   "-port", str(hook_port)], env=env, log_dir=work / "logs")
    poster = stack.Poster(hook_port, f"/hooks/{HOOK_ID}")
    try:
        procs.wait_port(hook_port, proc)
        _, body, _ = events[0]
        bad = poster.post(body, "sha256=" + "0" * 64)
        if bad[1].strip() == ACCEPTED.encode():
            raise RuntimeError(f"webhook ran the export for a bad signature: {bad}")
        cpu0 = procs.tree_cpu(proc.pid)
        sent_at, sending = send(poster.post, events, rate=rate, ok=200)

        def alive() -> None:
            if not proc.alive():
                raise RuntimeError(f"webhook exited:\n{proc.tail()}")

        result = collect(out_dir, sent_at, size=int(EXPORT_MB * procs.MB), timeout=timeout, alive=alive)
        time.sleep(0.5)  # webhook reaps the last scripts: their CPU counts (into webhook's) once reaped
        result["cpu_seconds"] = round(procs.tree_cpu(proc.pid) - cpu0, 2)
    finally:
        poster.close()
        proc.stop()
    version = (procs.tool_version(["webhook", "-version"]) or "").replace("webhook version ", "")
    return {"label": f"adnanh/webhook {version} + cvat-sdk script".strip(), "bad_signature_answer": bad[0],
            **sending, **result}


def run_cvat_hooks(work: Path, cvat: stack.StandIn, events: Sequence[tuple[int, bytes, str]], *, rate: float,
                   timeout: float, log: Callable[[str], None]) -> dict[str, Any]:
    """``cvat-hooks serve`` and ``cvat-hooks worker``, one export rule."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "rules.yaml").write_text(RULES)
    with RedisProc(work / "redis") as redis:
        env = stack.hooks_env(redis, work, cvat.url)
        with stack.receiver(work, env) as (port, serve_proc), stack.worker(work, redis, env) as worker_proc:
            tree = (serve_proc.pid, worker_proc.pid, redis.proc.pid)
            poster = stack.Poster(port)
            try:
                _, body, _ = events[0]
                bad = poster.post(body, "sha256=" + "0" * 64)
                if bad[0] != 401:
                    raise RuntimeError(f"cvat-hooks did not refuse a bad signature: {bad}")
                cpu0 = sum(procs.tree_cpu(pid) for pid in tree)
                answers: dict[int, bytes] = {}
                sent_at, sending = send(poster.post, events, rate=rate, ok=202, answers=answers)
                delivery_of = {json.loads(a)["delivery_id"]: job_id for job_id, a in answers.items()}

                def alive() -> None:
                    if not worker_proc.alive():
                        raise RuntimeError(f"cvat-hooks worker exited:\n{worker_proc.tail()}")

                def failed() -> dict[int, str]:
                    actions = stack.actions_of(redis, list(delivery_of))
                    return {delivery_of[d]: str(a.get("error")) for d, a in actions.items()
                            if a.get("status") == "failed"}

                result = collect(work / "data" / "exports", sent_at, size=int(EXPORT_MB * procs.MB),
                                 timeout=timeout, alive=alive, failed=failed)
                result["cpu_seconds"] = round(sum(procs.tree_cpu(pid) for pid in tree) - cpu0, 2)
            finally:
                poster.close()
    return {"label": "cvat-hooks serve + worker", "bad_signature_answer": bad[0], **sending, **result}


def run(work: Path, *, events: int = 120, rate: float = 2.0, timeout: float | None = None,
        log: Callable[[str], None]) -> dict[str, Any]:
    """The whole comparison: the same ``events`` deliveries at ``rate`` per second to each side."""
    work.mkdir(parents=True, exist_ok=True)
    wait = timeout if timeout is not None else 60.0 + events / rate * 3
    out: dict[str, Any] = {"events": events, "rate": rate, "export_mb": EXPORT_MB, "format": FORMAT,
                           "sides": {}}
    with stack.stand_in(work, jobs=events, export_size_mb=EXPORT_MB) as cvat:
        bodies = stack.deliveries(cvat.job_ids[:events])
        plan = [(job_id, body, sig) for job_id, (body, sig) in zip(cvat.job_ids, bodies, strict=False)]
        for name, side in (("webhook", run_webhook), ("cvat-hooks", run_cvat_hooks)):
            result = side(work / name, cvat, plan, rate=rate, timeout=wait, log=log)
            out["sides"][name] = result
            if "skipped" not in result:
                log(f"adnanh: {name:<10} {result['written']}/{events} files, "
                    f"{result['events_per_second']} events/s to the last file, p50 {result['p50_ms']} ms "
                    f"p99 {result['p99_ms']} ms (errors {result['errors']})"
                    + (f"; first error: {result['first_error']}" if result["first_error"] else ""))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.adnanh [--quick]``: this comparison alone, saved like the suite's results."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.adnanh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 events at 2/s (under half a minute)")
    parser.add_argument("--events", type=int, help="deliveries per side (default 120, quick 6)")
    parser.add_argument("--rate", type=float, default=2.0, help="deliveries per second")
    args = parser.parse_args(argv)
    from bench.run import log, save_phase

    with tempfile.TemporaryDirectory(prefix="cvat-hooks-adnanh-") as work:
        result = run(Path(work), events=args.events or (6 if args.quick else 120), rate=args.rate, log=log)
    save_phase("adnanh", result, quick=args.quick)


if __name__ == "__main__":
    main()
