"""Light processes against actions that wait on CVAT: does N times the processes drain N times as fast?

Each action is the built-in ``update_job`` on the test CVAT server (``bench.cvat_stand_in``, in a
process of its own), which holds every read of a job for ``delay_ms`` (100 ms), as a busy CVAT
does; the job is already in the state the rule asks for, so the action reads it and is done. For
each N (1, 2, 4, 8), ``per_process x N`` real signed deliveries are POSTed to ``cvat-hooks serve``
while no worker runs, then ``cvat-hooks worker`` starts with ``CVAT_HOOKS_LIGHT_PROCESSES=N`` and
drains them. The rate is the actions over the span from the first action's start to the last one's
end (from the delivery log), so the worker's start-up is not counted; the ratio is that rate over
the rate with one light process, against the target of 0.8 x N.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import stack
from bench.procs import RedisProc

RULES = """\
version: 1
rules:
  - id: close-completed-jobs
    description: Keep completed jobs completed (the bench's light action that waits on CVAT).
    on: update:job
    if:
      job.state: {became: completed}
    do:
      - action: update_job
        state: completed
"""
PROCESSES = (1, 2, 4, 8)


def queue_all(port: int, deliveries: Sequence[tuple[bytes, str]]) -> list[str]:
    """POST every delivery; their delivery ids (each must be queued)."""
    import json

    poster = stack.Poster(port)
    ids = []
    try:
        for body, signature in deliveries:
            status, answer = poster.post(body, signature)
            if status != 202:
                raise RuntimeError(f"cvat-hooks did not queue a delivery: {status} {answer[:200]!r}")
            ids.append(json.loads(answer)["delivery_id"])
    finally:
        poster.close()
    return ids


def drain(work: Path, redis: RedisProc, env: dict[str, str], ids: list[str], n: int, *,
          timeout: float) -> dict[str, Any]:
    """Start a worker with ``n`` light processes on the queued actions; the rate it drained them at."""
    t0 = time.monotonic()
    with stack.worker(work, redis, env, light_processes=n, name=f"cvat-hooks-worker-{n}") as proc:
        actions = stack.wait_actions(redis, ids, timeout=timeout, watch=[proc])
    wall = time.monotonic() - t0
    starts = [s for a in actions.values() if (s := stack.epoch(a.get("started_at"))) is not None]
    ends = [e for a in actions.values() if (e := stack.epoch(a.get("finished_at"))) is not None]
    durations = [float(a["duration"]) for a in actions.values() if a.get("duration") is not None]
    statuses: dict[str, int] = {}
    for action in actions.values():
        statuses[str(action.get("status"))] = statuses.get(str(action.get("status")), 0) + 1
    span = max(ends) - min(starts) if starts and ends else None
    done = statuses.get("succeeded", 0)
    return {"processes": n, "actions": len(ids), "succeeded": done, "statuses": statuses,
            "span_s": round(span, 3) if span else None,
            "per_second": round(done / span, 2) if span else 0.0,
            "mean_action_s": round(statistics.fmean(durations), 4) if durations else None,
            "worker_wall_s": round(wall, 2)}


def run(work: Path, *, processes: Sequence[int] = PROCESSES, per_process: int = 40, delay_ms: float = 100.0,
        log: Callable[[str], None]) -> dict[str, Any]:
    """Every N of ``processes``, one after the other, on one receiver and one test CVAT server."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "rules.yaml").write_text(RULES)
    out: dict[str, Any] = {"delay_ms": delay_ms, "per_process": per_process, "action": "update_job",
                           "runs": {}}
    jobs = per_process * max(processes)
    with stack.stand_in(work, jobs=jobs, delay_ms=delay_ms) as cvat, RedisProc(work / "redis") as redis:
        env = stack.hooks_env(redis, work, cvat.url)
        with stack.receiver(work, env) as (port, _):
            for n in processes:
                redis.flush()
                count = per_process * n
                ids = queue_all(port, stack.deliveries(cvat.job_ids[:count], tag=n))
                r = drain(work, redis, env, ids, n, timeout=60 + count * delay_ms / 1000 * 3)
                out["runs"][str(n)] = r
                log(f"scaling: {n} light process(es): {r['succeeded']}/{count} in {r['span_s']} s = "
                    f"{r['per_second']} actions/s (mean action {r['mean_action_s']} s)")
    base = (out["runs"].get("1") or {}).get("per_second")
    for n, r in out["runs"].items():
        r["ratio"] = round(r["per_second"] / base, 2) if base else None
        r["target_ratio"] = round(0.8 * int(n), 2)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.scaling [--quick]``: this measurement alone, saved like the suite's results."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1 and 2, 5 actions per process")
    parser.add_argument("--per-process", type=int, help="actions per light process (default 40, quick 5)")
    args = parser.parse_args(argv)
    from bench.run import log, save_phase

    with tempfile.TemporaryDirectory(prefix="cvat-hooks-scaling-") as work:
        result = run(Path(work), processes=(1, 2) if args.quick else PROCESSES,
                     per_process=args.per_process or (5 if args.quick else 40), log=log)
    save_phase("scaling", result, quick=args.quick)


if __name__ == "__main__":
    main()
