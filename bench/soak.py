"""``python -m bench.soak [--minutes 10] [--rate 200]``: a soak with faults, and its figures.

Starts a redis-server (AOF, ``appendfsync always``), ``cvat-hooks serve`` (gunicorn), ``cvat-hooks
worker`` processes, the test CVAT server and a webhook sink, all on 127.0.0.1. Sends mixed traffic
at about ``--rate`` deliveries a second: distinct events, CVAT's retries of them (same bytes),
manual redeliveries (keys in PostgreSQL jsonb order), bad signatures and malformed bodies. Every
event matches rules whose actions are ``notify`` to the sink, so each action's effect is one POST
there, counted per (delivery, action). A delivery left without an answer (the receiver was down)
is posted again a second later, as CVAT retries.

During the run it SIGKILLs, by PID, and restarts once each: Redis (at 25 % of the run), a worker
(whole process tree, at 50 %) and the receiver (serve, gunicorn master and workers, at 75 %). Then
it waits for every queue to drain and prints: deliveries sent, acknowledged (2xx), actions expected
(those of every event some copy of which got a 2xx), actions run (effects at the sink), lost (must
be 0), run twice (distinct runs of one action, must be 0; a ``notify`` posted again after a crash
between the POST and its marker carries the same ``Idempotency-Key`` and is counted apart), 5xx
answered, and the peak RSS of each process. The figures are saved
to ``bench/results/soak-<date>.json``.

A killed worker's in-flight job is retried by RQ once it deems it abandoned, about 75 s after the
kill (``workers.worker.JOB_MONITORING_SECONDS`` + 60), at the next
maintenance (30 s); a job taken off a queue but not yet registered, by RQ's intermediate-queue
cleanup (over a minute). The drain therefore takes that long at least.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import queue
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from core.events import delivery_id_of
from core.settings import DEFAULT_LIGHT_PROCESSES
from receiver.signature import sign
from tests.captures import capture
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer, WebhookSink, jsonb_order
from tests.procs import ReceiverProc, RedisProc, Sampler, WorkerProc, wait_for

RESULTS = Path(__file__).resolve().parent / "results"
SECRET = "soak-webhook-secret-4f7a"
MIX = {"distinct": 0.60, "retry": 0.15, "redelivery": 0.10, "bad_signature": 0.08, "malformed": 0.07}
"""Share of each kind of delivery in the traffic."""
RETRY_AFTER = 1.0
"""Seconds before a delivery that got no answer is posted again (as CVAT would retry it)."""
SENDERS = 8
"""Client threads (each with a keep-alive connection)."""

RULES = """
version: 1
rules:
  - id: soak-job
    on: update:job
    do:
      - action: notify
        url: %(sink)s/soak
        text: "{delivery_id} job"
    retry: {attempts: 6, backoff: [1, 2, 5, 10, 20, 30]}
  - id: soak-task
    on: create:task
    do:
      - action: notify
        url: %(sink)s/soak
        text: "{delivery_id} task-1"
      - action: notify
        url: %(sink)s/soak
        text: "{delivery_id} task-2"
    retry: {attempts: 6, backoff: [1, 2, 5, 10, 20, 30]}
"""
ACTIONS = {"update:job": ("job",), "create:task": ("task-1", "task-2")}
"""The effects each event must have at the sink, by the tag at the end of the notify text."""


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


@dataclass
class Event:
    """One distinct event and what happened to its copies."""

    body: bytes
    delivery_id: str
    name: str
    acked: bool = False


@dataclass
class Item:
    """One POST to make."""

    kind: str
    body: bytes
    headers: dict[str, str]
    event: Event | None = None
    tries: int = 0


@dataclass
class Tally:
    sent: int = 0
    answered: Counter[int] = field(default_factory=Counter)
    unanswered: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Traffic:
    """Makes the deliveries: distinct events, copies of earlier ones, bad and malformed ones."""

    def __init__(self, seed: int = 6) -> None:
        self.rng = random.Random(seed)
        job, _ = capture("update_job_completed.json")
        task, _ = capture("create_task.json")
        self.templates = {"update:job": json.loads(job), "create:task": json.loads(task)}
        self.events: list[Event] = []
        self.counter = 0
        self.lock = threading.Lock()

    def _new_event(self) -> Event:
        self.counter += 1
        n = self.counter
        name = "update:job" if self.rng.random() < 0.7 else "create:task"
        payload = json.loads(json.dumps(self.templates[name]))
        resource = "job" if name == "update:job" else "task"
        payload[resource]["id"] = 100_000 + n
        payload[resource]["updated_date"] = f"2026-11-22T18:{n // 60000 % 60:02d}:{n // 1000 % 60:02d}.{n:06d}Z"
        body = json.dumps(payload).encode()
        event = Event(body, delivery_id_of(payload), name)
        self.events.append(event)
        return event

    def next(self) -> Item:
        with self.lock:
            kind = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
            if kind in ("retry", "redelivery") and not self.events:
                kind = "distinct"
            if kind == "distinct":
                event = self._new_event()
                return Item(kind, event.body, signed(event.body), event)
            if kind == "retry":
                event = self.rng.choice(self.events[-500:])
                return Item(kind, event.body, signed(event.body), event)
            if kind == "redelivery":
                event = self.rng.choice(self.events[-500:])
                body = json.dumps(jsonb_order(json.loads(event.body))).encode()
                return Item(kind, body, signed(body), event)
            if kind == "bad_signature":
                body = self._new_event_body_unrecorded()
                return Item(kind, body, signed(body, "not-the-secret"))
            body = self.rng.choice([b'{"event": "update:job", "job": [1, 2', b"\xff\xfe", b"[]", b"{}",
                                    b'{"event": "update:job", "job": ' + b"[" * 100 + b"]" * 100 + b"}"])
            return Item(kind, body, signed(body))

    def _new_event_body_unrecorded(self) -> bytes:
        """A well-formed event nobody will acknowledge (it goes with a bad signature)."""
        payload = json.loads(json.dumps(self.templates["update:job"]))
        payload["job"]["id"] = 900_000_000 + self.rng.randrange(10 ** 6)
        return json.dumps(payload).encode()


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-Signature-256": sign(body, secret), "Content-Type": "application/json"}


class Load:
    """Posts items at a steady rate from several threads; re-posts unanswered valid ones later."""

    def __init__(self, port_of: Any, traffic: Traffic, rate: float, tally: Tally) -> None:
        self.port_of = port_of
        self.traffic = traffic
        self.rate = rate
        self.tally = tally
        self.tickets: queue.Queue[bool] = queue.Queue(maxsize=int(rate * 2) + 10)
        self.retries: queue.Queue[tuple[float, Item]] = queue.Queue()
        self.generating = threading.Event()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.generating.set()
        self.threads = [threading.Thread(target=self._pace, name="pacer", daemon=True)]
        self.threads += [threading.Thread(target=self._send, name=f"sender-{i}", daemon=True) for i in range(SENDERS)]
        for thread in self.threads:
            thread.start()

    def _pace(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self.stopping.is_set():
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                self.tickets.put(True, timeout=1)
            except queue.Full:
                next_at = time.monotonic()  # the senders fell behind: do not build a backlog

    def _take(self) -> Item | None:
        try:
            due, item = self.retries.get_nowait()
            if due <= time.monotonic():
                return item
            self.retries.put((due, item))
        except queue.Empty:
            pass
        if not self.generating.is_set():
            return None
        return self.traffic.next()

    def _send(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stopping.is_set():
            try:
                self.tickets.get(timeout=0.5)
            except queue.Empty:
                continue
            item = self._take()
            if item is None:
                continue
            status = None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port_of(), timeout=10)
                conn.request("POST", "/webhooks/cvat", body=item.body, headers=item.headers)
                answer = conn.getresponse()
                answer.read()
                status = answer.status
                if answer.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                conn = None
            self._record(item, status)

    def _record(self, item: Item, status: int | None) -> None:
        with self.tally.lock:
            self.tally.sent += 1
            self.tally.by_kind[item.kind] += 1
            if status is None:
                self.tally.unanswered += 1
            else:
                self.tally.answered[status] += 1
            if item.event is not None and status is not None and 200 <= status < 300:
                item.event.acked = True
        if status is None and item.event is not None and item.tries < 300:
            item.tries += 1
            self.retries.put((time.monotonic() + RETRY_AFTER, item))

    def pending_retries(self) -> int:
        return self.retries.qsize()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)


def effects(sink: WebhookSink, *, distinct_runs: bool = False) -> Counter[tuple[str, str]]:
    """(delivery id, action tag) -> POSTs the sink received for it; with ``distinct_runs``, the
    distinct ``Idempotency-Key`` values among them (runs a receiver honouring the key acts on)."""
    keys: dict[tuple[str, str], list[str]] = {}
    for received in list(sink.received):
        try:
            text = json.loads(received.body)["text"]
        except (ValueError, KeyError, TypeError):
            continue
        delivery_id, _, tag = text.partition(" ")
        headers = {k.lower(): v for k, v in dict(received.headers).items()}
        keys.setdefault((delivery_id, tag), []).append(headers.get("idempotency-key", ""))
    return Counter({k: len(set(v)) if distinct_runs else len(v) for k, v in keys.items()})


def pending_deliveries(redis_url: str) -> set[str]:
    """The first 32 characters of the delivery ids (as in job ids) of every job RQ still holds to run:
    queued, taken (intermediate queue), running, or scheduled for a retry. An expected action whose
    job is there is "not run yet"; one whose job is nowhere is lost."""
    from redis import Redis
    from rq.intermediate_queue import IntermediateQueue
    from rq.registry import ScheduledJobRegistry, StartedJobRegistry

    from core.contract import QUEUES
    from core.queueing import queue as rq_queue

    redis = Redis.from_url(redis_url, socket_timeout=10)
    ids: list[str] = []
    try:
        for name in QUEUES:
            q = rq_queue(name, redis)
            ids += q.get_job_ids()
            ids += IntermediateQueue(q.key, redis).get_job_ids()
            # cleanup=False: counting must not move what it counts (RQ's cleanup fails expired entries).
            ids += StartedJobRegistry(queue=q).get_job_ids(cleanup=False)
            ids += ScheduledJobRegistry(queue=q).get_job_ids(cleanup=False)
    finally:
        redis.close()
    return {i[4:36] for i in ids if i.startswith("cvh-")}


def drained(redis_url: str) -> bool:
    """Nothing queued, running or waiting for a retry."""
    from redis import Redis

    from core.queue_stats import queue_stats

    try:
        redis = Redis.from_url(redis_url, socket_timeout=5)
        try:
            return all(s.queued == 0 and s.running == 0 and s.scheduled == 0 for s in queue_stats(redis).values())
        finally:
            redis.close()
    except Exception:
        return False


DEFAULT_FAULTS = "redis@0.25,worker@0.5,receiver@0.75"
FAULT_KINDS = ("redis", "worker", "receiver")


def faults_arg(text: str) -> list[tuple[float, str]]:
    """``redis@0.25,worker@0.5`` -> [(0.25, "redis"), (0.5, "worker")], in time order."""
    if text.strip() in ("", "none"):
        return []
    schedule = []
    for part in text.split(","):
        what, _, at = part.strip().partition("@")
        if what not in FAULT_KINDS:
            raise argparse.ArgumentTypeError(f"{what!r} is not one of {', '.join(FAULT_KINDS)}")
        try:
            fraction = float(at) if at else 0.5
        except ValueError:
            raise argparse.ArgumentTypeError(f"{at!r} is not a fraction of the run") from None
        if not 0 <= fraction <= 1:
            raise argparse.ArgumentTypeError(f"{at!r} is not a fraction of the run in [0, 1]")
        schedule.append((fraction, what))
    return sorted(schedule)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the traffic (default 10)")
    parser.add_argument("--rate", type=float, default=200.0, help="deliveries a second (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="cvat-hooks worker processes (default 2)")
    parser.add_argument("--worker-class", choices=("split", "fork", "simple"), default="split",
                        help="cvat-hooks worker --class (default: split, the shipped setup)")
    parser.add_argument("--light-processes", type=int, default=DEFAULT_LIGHT_PROCESSES,
                        help="light children of each split worker (CVAT_HOOKS_LIGHT_PROCESSES, default "
                             f"{DEFAULT_LIGHT_PROCESSES}, the shipped one)")
    parser.add_argument("--fsync", choices=("always", "everysec"), default="always",
                        help="Redis appendfsync (default always: no acknowledged write lost to a kill)")
    parser.add_argument("--drain-minutes", type=float, default=30.0, help="longest wait for the queues to drain")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument("--faults", type=faults_arg, default=DEFAULT_FAULTS,
                        help="what to kill and when, as WHAT@FRACTION of the run, comma-separated "
                             "(WHAT: redis, worker, receiver; default %(default)s; 'none' for no fault)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="cvat-hooks-soak-"))
    logs = work / "logs"
    redis = RedisProc(work / "redis", logs, fsync=args.fsync)
    cvat = CvatTestServer(export_seconds=0.1)
    sink = WebhookSink()
    procs: list[Any] = []
    faults: list[dict[str, Any]] = []
    keep = False
    try:
        redis.start()
        cvat.start()
        sink.start()
        (work / "rules.yaml").write_text(RULES % {"sink": sink.url})
        env = {"CVAT_HOOKS_REDIS_URL": redis.url, "CVAT_HOOKS_SECRET": SECRET,
               "CVAT_HOOKS_RULES": str(work / "rules.yaml"), "CVAT_HOOKS_DATA_DIR": str(work / "data"),
               "CVAT_URL": cvat.url, "CVAT_ACCESS_TOKEN": DEFAULT_TOKEN, "CVAT_HOOKS_RECONCILE_MINUTES": "0",
               "CVAT_HOOKS_LIGHT_PROCESSES": str(args.light_processes),
               # The sink is on loopback, which notify reaches only when the address is listed.
               "CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS": "127.0.0.1"}
        receiver = ReceiverProc(env, logs)
        workers = [WorkerProc(env, logs, kind=args.worker_class, name=f"worker{i}") for i in range(args.workers)]
        procs = [receiver, *workers]
        receiver.start()
        for worker in workers:
            worker.start()
        log(f"soak: {args.minutes:g} min at {args.rate:g} deliveries/s; receiver {receiver.url}, "
            f"{args.workers} {args.worker_class} worker(s) ({args.light_processes} light process(es) each), "
            f"Redis appendfsync {args.fsync}; work in {work}")

        traffic, tally = Traffic(), Tally()
        load = Load(lambda: receiver.port, traffic, args.rate, tally)
        duration = args.minutes * 60
        schedule = args.faults if isinstance(args.faults, list) else faults_arg(args.faults)
        with Sampler([redis, receiver, *workers], interval=1.0):
            started = time.monotonic()
            load.start()
            for fraction, what in schedule:
                wait_until(started + duration * fraction)
                faults.append(kill_and_restart(what, redis, receiver, workers[0], started))
            wait_until(started + duration)
            load.generating.clear()
            log(f"soak: traffic over ({tally.sent} sent); re-posting what got no answer")
            wait_for(lambda: load.pending_retries() == 0, timeout=120, interval=0.5)
            load.stop()
            unacked = [e for e in traffic.events if not e.acked]
            log(f"soak: waiting for the queues to drain ({len(unacked)} event(s) never acknowledged)")
            expected = {(e.delivery_id, tag) for e in traffic.events if e.acked for tag in ACTIONS[e.name]}
            drain_started = time.monotonic()
            wait_for(lambda: expected <= set(effects(sink)) and drained(redis.url),
                     timeout=args.drain_minutes * 60, interval=2.0)
            drain_seconds = time.monotonic() - drain_started
            time.sleep(2)  # anything still in flight lands at the sink: counted as "run twice"

        seen, runs = effects(sink), effects(sink, distinct_runs=True)
        report = figures(args, tally, traffic, expected, seen, runs, procs, redis, faults, drain_seconds,
                         drained(redis.url), pending_deliveries(redis.url))
        print_report(report)
        if not args.no_save:
            RESULTS.mkdir(exist_ok=True)
            path = RESULTS / f"soak-{datetime.now():%Y%m%d-%H%M%S}.json"
            path.write_text(json.dumps(report, indent=2))
            log(f"soak: saved {path}")
        ok = (report["lost"] == 0 and report["not_run_yet"] == 0 and report["run_twice"] == 0
              and report["answered_5xx"] == 0)
        if not ok:
            keep = True
            log(f"soak: kept {work} (logs, Redis AOF) for a look at what went wrong")
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        sink.stop()
        cvat.stop()
        redis.stop()
        if args.work is None and not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def wait_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def kill_and_restart(what: str, redis: RedisProc, receiver: ReceiverProc, worker: WorkerProc,
                     started: float) -> dict[str, Any]:
    """SIGKILL one part (its whole process tree, by PID) and start it again; how long it was down."""
    proc = {"redis": redis, "receiver": receiver, "worker": worker}[what]
    at = time.monotonic()
    pids = proc.kill()
    proc.start()
    down = time.monotonic() - at
    log(f"soak: killed {what} (PIDs {', '.join(map(str, pids))}) at {at - started:.0f} s; back after {down:.1f} s")
    return {"what": what, "at_seconds": round(at - started, 1), "pids": pids, "down_seconds": round(down, 2)}


def figures(args: argparse.Namespace, tally: Tally, traffic: Traffic, expected: set[tuple[str, str]],
            seen: Counter[tuple[str, str]], runs: Counter[tuple[str, str]], procs: list[Any], redis: RedisProc,
            faults: list[dict[str, Any]],
            drain_seconds: float, is_drained: bool, pending: set[str]) -> dict[str, Any]:
    """The soak's figures as one JSON-ready dict."""
    mb = 1024 * 1024
    acked = sum(n for status, n in tally.answered.items() if 200 <= status < 300)
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpus": __import__("os").cpu_count()},
        "settings": {"minutes": args.minutes, "rate": args.rate, "workers": args.workers,
                     "worker_class": args.worker_class, "light_processes": args.light_processes,
                     "redis_appendfsync": args.fsync, "mix": MIX},
        "sent": tally.sent,
        "sent_by_kind": dict(tally.by_kind),
        "acknowledged_2xx": acked,
        "answers": {str(k): v for k, v in sorted(tally.answered.items())},
        "unanswered_then_reposted": tally.unanswered,
        "answered_5xx": sum(n for status, n in tally.answered.items() if status >= 500),
        "events": len(traffic.events),
        "events_acknowledged": sum(1 for e in traffic.events if e.acked),
        "actions_expected": len(expected),
        "actions_run": sum(seen[key] for key in expected),
        "lost": len(missing := {(d, tag) for d, tag in expected - set(seen) if d[:32] not in pending}),
        "lost_actions": sorted(f"{d} {tag}" for d, tag in missing)[:20],
        "not_run_yet": len(expected - set(seen)) - len(missing),
        "run_twice": sum(1 for key in expected if runs[key] > 1),
        "twice_actions": sorted(f"{d} {tag}" for d, tag in expected if runs[(d, tag)] > 1)[:20],
        "posted_again_same_key": sum(1 for key in expected if seen[key] > runs[key]),
        "unexpected_effects": sum(n for key, n in seen.items() if key not in expected),
        "drained": is_drained,
        "drain_seconds": round(drain_seconds, 1),
        "faults": faults,
        "peak_rss_mb": {p.name: {role: round(v / mb, 1) for role, v in p.peak_rss.items()}
                        for p in [redis, *procs]},
    }


def print_report(r: dict[str, Any]) -> None:
    rss = "; ".join(f"{name} " + ", ".join(f"{role} {v:g} MB" for role, v in roles.items())
                    for name, roles in r["peak_rss_mb"].items())
    lines = [
        f"deliveries sent      {r['sent']}  ({', '.join(f'{k} {v}' for k, v in r['sent_by_kind'].items())})",
        f"acknowledged (2xx)   {r['acknowledged_2xx']}  (answers: {r['answers']}; "
        f"{r['unanswered_then_reposted']} unanswered, posted again)",
        f"actions expected     {r['actions_expected']}  "
        f"({r['events_acknowledged']} of {r['events']} events acknowledged)",
        f"actions run          {r['actions_run']}",
        f"lost                 {r['lost']}" + (f"  ({', '.join(r['lost_actions'])})" if r["lost"] else ""),
        f"not run yet          {r['not_run_yet']}  (their jobs still queued, running or waiting for a retry "
        "when the drain wait ended)",
        f"run twice            {r['run_twice']}" + (f"  ({', '.join(r['twice_actions'])})" if r["run_twice"] else ""),
        f"posted again         {r['posted_again_same_key']}  (same Idempotency-Key: one effect where the "
        "receiver honours it)",
        f"unexpected effects   {r['unexpected_effects']}",
        f"5xx answered         {r['answered_5xx']}",
        f"drained              {r['drained']} ({r['drain_seconds']} s after the traffic)",
        "faults               " + "; ".join(f"{f['what']} killed at {f['at_seconds']} s, back in {f['down_seconds']} s"
                                             for f in r["faults"]),
        f"peak RSS             {rss}",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
