"""Event to action start, at a steady 100 events/s, through what users run.

Each event is a real signed ``update:job`` delivery POSTed to ``cvat-hooks serve``; a rule sends a
``notify`` (the light action of most rules) to a small HTTP sink in this process, run by
``cvat-hooks worker`` (its shipped ``split`` setup) on a production-like Redis. Deliveries leave at
fixed times (``1/rate`` apart, from a few sender threads so one slow answer does not delay the next
event), and each event's latency runs from just before its POST to the start time the worker wrote
in the delivery log for its action. Also reported: the receiver's answer time, and the part from the
receiver's receipt (``received_ts``) to the action's start, which is the dispatch alone.

The delivery log keeps times to the millisecond, truncated: a latency reads up to 1 ms low.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import procs, stack
from bench.procs import Proc, RedisProc
from core.settings import DEFAULT_LIGHT_PROCESSES

SENDERS = 4
"""Sender threads: at 100 events/s each has 40 ms per delivery, several times an answer's time."""


def rules(sink_url: str) -> str:
    """One rule: notify the sink of every completed job."""
    return f"""\
version: 1
rules:
  - id: notify-completed-jobs
    description: Tell the team a job is completed (the bench's event-to-action-start latency).
    on: update:job
    if:
      job.state: {{became: completed}}
    do:
      - action: notify
        url: {sink_url}
        text: "job {{job_id}} completed"
"""


class _Sink(BaseHTTPRequestHandler):
    """Answers every POST with 204 at once, keeping the connection open as webhook hosts do."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        """Quiet: one line per notification would cost the bench's own CPU."""


@contextmanager
def sink() -> Iterator[str]:
    """A notification sink on 127.0.0.1; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/notify"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def paced(port: int, deliveries: list[tuple[bytes, str]], *, rate: float) -> tuple[list[dict[str, Any]], int]:
    """POST each delivery at its due time; each one's send time, answer time and delivery id."""
    sent: list[dict[str, Any]] = [{} for _ in deliveries]
    late = [0] * SENDERS
    start = time.perf_counter() + 0.05

    def sender(k: int) -> None:
        poster = stack.RawPoster(port)
        try:
            for i in range(k, len(deliveries), SENDERS):
                pause = start + i / rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                elif pause < -0.005:
                    late[k] += 1
                body, signature = deliveries[i]
                t0 = time.time()
                p0 = time.perf_counter()
                status, answer = poster.post(body, signature)
                took = time.perf_counter() - p0
                delivery_id = json.loads(answer).get("delivery_id") if status == 202 else None
                sent[i] = {"t": t0, "status": status, "answer_ms": took * 1000, "delivery_id": delivery_id}
        finally:
            poster.close()

    threads = [threading.Thread(target=sender, args=(k,), name=f"sender-{k}") for k in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent, sum(late)


def measure(port: int, redis: RedisProc, deliveries: list[tuple[bytes, str]], *, rate: float,
            watch: list[Proc]) -> dict[str, Any]:
    """One paced run; latencies from the delivery log, and the worker's CPU per event (a worker
    that needs more than ``1/rate`` s of CPU per event falls behind, and latency grows with the run)."""
    cpu0 = sum(procs.tree_cpu(p.pid) for p in watch)
    t0 = time.perf_counter()
    sent, late = paced(port, deliveries, rate=rate)
    took = time.perf_counter() - t0
    refused = [s["status"] for s in sent if s["status"] != 202]
    if refused:
        raise RuntimeError(f"cvat-hooks did not queue {len(refused)} deliveries: statuses {set(refused)}")
    ids = [s["delivery_id"] for s in sent]
    actions = stack.wait_actions(redis, ids, timeout=60, watch=watch)
    cpu = sum(procs.tree_cpu(p.pid) for p in watch) - cpu0
    total, dispatch = [], []
    for s in sent:
        action = actions.get(s["delivery_id"]) or {}
        started = stack.epoch(action.get("started_at"))
        if started is None:
            continue
        total.append((started - s["t"]) * 1000)
        if action.get("received_ts") is not None:
            dispatch.append((started - float(action["received_ts"])) * 1000)
    answers = [s["answer_ms"] for s in sent]

    def summary(values: list[float]) -> dict[str, Any]:
        return {"p50_ms": _r(stack.percentile(values, 50)), "p99_ms": _r(stack.percentile(values, 99)),
                "max_ms": _r(max(values) if values else None),
                "mean_ms": _r(statistics.fmean(values) if values else None)}

    statuses: dict[str, int] = {}
    for action in actions.values():
        statuses[str(action.get("status"))] = statuses.get(str(action.get("status")), 0) + 1
    return {"events": len(deliveries), "rate": rate, "achieved_rate": round(len(deliveries) / took, 1),
            "late_sends": late, "started": len(total), "action_statuses": statuses,
            "worker_cpu_ms_per_event": round(cpu * 1000 / len(deliveries), 2),
            **summary(total), "answer": summary(answers), "receipt_to_start": summary(dispatch)}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run(work: Path, *, rate: float = 100.0, seconds: float = 10.0, warmup: int = 50,
        light_processes: int = DEFAULT_LIGHT_PROCESSES,
        log: Callable[[str], None]) -> dict[str, Any]:
    """Warm up, then ``rate`` events/s for ``seconds``."""
    work.mkdir(parents=True, exist_ok=True)
    n = int(rate * seconds)
    all_deliveries = stack.deliveries(list(range(100_000, 100_000 + warmup + n)))
    with sink() as sink_url, RedisProc(work / "redis") as redis:
        (work / "rules.yaml").write_text(rules(sink_url))
        env = {**stack.hooks_env(redis, work), "CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS": "127.0.0.1"}
        with stack.receiver(work, env) as (port, _), \
                stack.worker(work, redis, env, light_processes=light_processes) as worker_proc:
            measure(port, redis, all_deliveries[:warmup], rate=rate, watch=[worker_proc])
            result = measure(port, redis, all_deliveries[warmup:], rate=rate, watch=[worker_proc])
    result.update({"seconds": seconds, "light_processes": light_processes, "action": "notify"})
    log(f"latency: {rate:g} events/s for {seconds:g} s: POST -> action start p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms; receipt -> start p50 {result['receipt_to_start']['p50_ms']} ms, "
        f"p99 {result['receipt_to_start']['p99_ms']} ms ({result['started']}/{n} started, "
        f"{result['late_sends']} late sends; worker CPU {result['worker_cpu_ms_per_event']} ms per event)")
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.latency [--quick]``: this measurement alone, saved like the suite's results."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s of events instead of 10")
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--seconds", type=float, help="seconds of events (default 10, quick 2)")
    parser.add_argument("--light-processes", type=int, default=DEFAULT_LIGHT_PROCESSES,
                        help="CVAT_HOOKS_LIGHT_PROCESSES of the worker (default: the shipped one)")
    args = parser.parse_args(argv)
    from bench.run import log, save_phase

    with tempfile.TemporaryDirectory(prefix="cvat-hooks-latency-") as work:
        result = run(Path(work), rate=args.rate, seconds=args.seconds or (2.0 if args.quick else 10.0),
                     warmup=20 if args.quick else 50, light_processes=args.light_processes, log=log)
    save_phase("latency", result, quick=args.quick)


if __name__ == "__main__":
    main()
