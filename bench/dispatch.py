"""Dispatch: how fast the shipped workers drain light actions, and how soon an event's action starts.

Workers are ``cvat-hooks worker`` as shipped (``--class split``, the default: light actions in a
supervised in-process child, exports in one of their own) and, for comparison, ``--class fork`` and
``--class simple`` (through ``bench.worker``, which only adds the ``bench_noop`` action), 1 and 2
processes (``cvat-hooks worker`` commands), on a production-like Redis. Jobs are queued the way the
receiver queues them: the delivery record and the job in one Redis transaction, through
``core.queueing.enqueue``, so a worker does its real per-job bookkeeping (delivery log,
metrics, RQ registries) around an action that does nothing but note its start time.

- drain: queue N jobs at once while the workers wait, time until all have finished;
- latency: one event every 10 ms (100 events/s) for a few seconds; the time from just before
  the enqueue transaction to the action's own start time, p50/p99;
- crash probe: an action that kills its process (``os._exit``, what a segfault or the OOM killer
  does), followed by a no-op: who survives, what runs next, when the crashed job is retried.

``stock`` is RQ's own ``SimpleWorker`` (``rq worker -w rq.SimpleWorker``, with RQ's scheduler) running a
job function that does what ``bench_noop`` does (note its start time) with none of cvat-hooks'
bookkeeping, queued with the same RQ options: the baseline of the target "a no-op action costs
cvat-hooks' worker at most :data:`STOCK_RATIO_TARGET` x RQ's stock SimpleWorker's CPU, in the same
run" (issue 16), printed PASS or MISS.

Nothing is pinned: two worker processes need both cores to show scale-out.
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis import Redis

from bench import procs
from bench.noop_action import ENV, NAME, STARTS_KEY
from bench.procs import MB, Proc, RedisProc
from core.settings import DEFAULT_LIGHT_PROCESSES

SHIPPED = "split"
"""The class ``cvat-hooks worker`` runs by default: the setup issue 5's dispatch targets are about."""
STOCK = "stock"
"""RQ's own SimpleWorker and a job function without cvat-hooks' bookkeeping: the baseline."""
STOCK_QUEUE = "bench-stock"
STOCK_RATIO_TARGET = 1.25
"""Most worker CPU per no-op job cvat-hooks' shipped worker may spend, as a multiple of stock's."""
SETUPS: tuple[tuple[str, int], ...] = ((STOCK, 1), (SHIPPED, 1), (SHIPPED, 2), ("split2", 1), ("fork", 1),
                                       ("fork", 2), ("simple", 1), ("simple", 2))
"""(setup, processes): ``cvat-hooks worker`` as :data:`KINDS` says, scaled by processes."""
KINDS: dict[str, tuple[str, dict[str, str], int]] = {
    STOCK: (STOCK, {}, 1),
    SHIPPED: (SHIPPED, {}, DEFAULT_LIGHT_PROCESSES + 2),
    "split2": (SHIPPED, {"CVAT_HOOKS_LIGHT_PROCESSES": "2"}, 4),
    "fork": ("fork", {}, 1),
    "simple": ("simple", {}, 1),
}
"""setup -> (``--class``, its environment, RQ workers it registers). ``split`` is the shipped setup:
``DEFAULT_LIGHT_PROCESSES`` light children and one per long-running queue (exports,
auto-annotation); ``split2`` is one ``split`` command with two light children, whatever the
default."""


def _calls(n: int, *, tag: str, crash: bool = False, attempts: int = 0, queue: str | None = None) -> list[Any]:
    """``n`` bench actions, one per (fake) delivery, shaped like the receiver's (on the light queue
    unless ``queue`` says otherwise)."""
    from core.contract import LIGHT_QUEUE, ActionCall
    from core.retry import RetryPolicy

    calls = []
    for i in range(n):
        delivery_id = hashlib.sha256(f"{tag}-{i}-{time.time_ns()}".encode()).hexdigest()
        event = {"event": "update:job", "resource": "job", "resource_id": 1000 + i, "job_id": 1000 + i,
                 "task_id": 2, "project_id": 1, "org_id": None, "updated_date": None, "webhook_id": 1,
                 "object": None}
        calls.append(ActionCall(delivery_id=delivery_id, rule_id=f"bench-{tag}", index=0, action=NAME,
                                params={"crash": True} if crash else {}, event=event,
                                retry=RetryPolicy(attempts=attempts, backoff=(1,) if attempts else ()),
                                queue=queue or LIGHT_QUEUE))
    return calls


class Queuer:
    """Queues calls as the receiver does: delivery record + job in one MULTI transaction."""

    def __init__(self, redis: Redis) -> None:
        from core.delivery_log import DeliveryLog

        self.redis = redis
        self.retention = 86400
        self.log = DeliveryLog(redis, retention_seconds=self.retention)

    def queue(self, calls: list[Any]) -> None:
        """All ``calls`` in one transaction (a burst that was waiting, or one event)."""
        from core.delivery_log import Outcome
        from core.queueing import enqueue
        from receiver.dispatch import record_actions

        now = time.time()
        with self.redis.pipeline(transaction=True) as pipe:
            for call in calls:
                record = {"delivery_id": call.delivery_id, "event": call.event["event"],
                          "outcome": Outcome.QUEUED.value, "resource": "job",
                          "resource_id": call.event["job_id"], "essentials": call.event,
                          "matched": [{"rule_id": call.rule_id, "reasons": [], "jobs": [call.job_id],
                                       "errors": []}]}
                self.log.add_received(pipe, record, record_actions([call]), now)
            # Finished jobs kept for the whole run: the drain counts them in RQ's finished registry,
            # where RQ's default keep (500 s) would let a long setup's first ones expire mid-count.
            enqueue(calls, self.redis, pipe, failure_ttl=self.retention, result_ttl=self.retention)
            pipe.execute()


def stock_noop(job_id: str) -> dict[str, bool]:
    """The stock baseline's job: what ``bench_noop`` does (note its start), nothing of cvat-hooks."""
    from rq import get_current_job

    started = time.time()
    job = get_current_job()
    assert job is not None
    job.connection.hset(STARTS_KEY, job_id, repr(started))
    return {"noop": True}


class StockQueuer:
    """Queues a stock job per call, with the RQ options ``core.queueing.enqueue`` gives ours."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.retention = 86400

    def queue(self, calls: list[Any]) -> None:
        """All ``calls`` in one transaction, as :class:`Queuer` does."""
        from rq import Callback, Queue

        from core.contract import FAILURE_CALLBACK, job_timeout
        from core.queueing import queue

        datas = [Queue.prepare_data(stock_noop, args=(call.job_id,), job_id=call.job_id,
                                    on_failure=Callback(FAILURE_CALLBACK), timeout=job_timeout(call.queue),
                                    result_ttl=self.retention, failure_ttl=self.retention,
                                    description=f"stock no-op {call.job_id[:12]}")
                 for call in calls]
        with self.redis.pipeline(transaction=True) as pipe:
            queue(STOCK_QUEUE, self.redis).enqueue_many(datas, pipeline=pipe)
            pipe.execute()


def _finished(redis: Redis) -> int:
    """Jobs of the light (or the stock) queue that finished or failed (RQ's registries)."""
    from core.contract import LIGHT_QUEUE
    from core.queueing import queue

    done = 0
    for name in (LIGHT_QUEUE, STOCK_QUEUE):
        q = queue(name, redis)
        done += int(redis.zcard(q.finished_job_registry.key)) + int(redis.zcard(q.failed_job_registry.key))
    return done


def _worker_count(redis: Redis) -> int:
    from rq import Worker

    return Worker.count(connection=redis)


@contextmanager
def workers(redis: RedisProc, kind: str, count: int, work: Path, *, extra_env: dict[str, str] | None = None,
            cpu: int | None = None) -> Iterator[list[Proc]]:
    """``count`` ``cvat-hooks worker`` commands of setup ``kind`` (:data:`KINDS`), registered and
    waiting; stopped by PID after."""
    worker_class, kind_env, per_process = KINDS[kind]
    env = {"CVAT_HOOKS_REDIS_URL": redis.url, "CVAT_HOOKS_DATA_DIR": str(work / "data"), ENV: "1",
           **kind_env, **(extra_env or {})}
    before = _worker_count(redis.client)
    started: list[Proc] = []
    try:
        for i in range(count):
            argv = ([sys.executable, "-m", "rq.cli", "worker", "-u", redis.url, "-w", "rq.worker.SimpleWorker",
                     "-S", "rq.serializers.JSONSerializer", "--with-scheduler", STOCK_QUEUE]
                    if worker_class == STOCK else
                    [sys.executable, "-m", "bench.worker", "--class", worker_class])
            started.append(procs.start(f"worker-{kind}-{count}-{i}", argv, env=env, log_dir=work / "logs",
                                       cpu=cpu))
        deadline = time.monotonic() + 60
        while _worker_count(redis.client) < before + count * per_process:
            for proc in started:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register within 60 s")
            time.sleep(0.05)
        time.sleep(0.5)  # let them reach their blocking dequeue
        yield started
    finally:
        for proc in started:
            proc.stop()


def drain(redis: RedisProc, queuer: Queuer | StockQueuer, n: int, started: list[Proc] | None = None) -> dict[str, Any]:
    """Queue ``n`` jobs at once; time until every one has finished, and the CPU the workers used."""
    def cpu() -> tuple[float, float]:
        return (sum(procs.tree_cpu(p.pid) for p in started or ()), procs.tree_cpu(redis.proc.pid))

    base = _finished(redis.client)
    cpu0 = cpu()
    calls = _calls(n, tag="drain")
    t_queue = time.perf_counter()
    queuer.queue(calls)
    t0 = time.perf_counter()
    deadline = t0 + max(60.0, n / 20)
    done = base
    while time.perf_counter() < deadline:
        done = _finished(redis.client)
        if done - base >= n:
            break
        time.sleep(0.02)  # a poll costs the workers' Redis too: often enough for a 1% error on seconds
    elapsed = time.perf_counter() - t0
    completed = done - base
    cpu1 = cpu()
    return {"jobs": n, "completed": completed, "seconds": round(elapsed, 3),
            "per_second": round(completed / elapsed, 1) if elapsed else 0.0,
            "enqueue_seconds": round(t0 - t_queue, 3),
            "worker_cpu_ms_per_job": round((cpu1[0] - cpu0[0]) * 1000 / max(1, completed), 2),
            "redis_cpu_ms_per_job": round((cpu1[1] - cpu0[1]) * 1000 / max(1, completed), 2)}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def latency(redis: RedisProc, queuer: Queuer | StockQueuer, *, rate: float, seconds: float) -> dict[str, Any]:
    """One event every ``1/rate`` s; event-to-action-start latency of each."""
    n = int(rate * seconds)
    calls = _calls(n, tag="latency")
    queued_at: dict[str, float] = {}
    start = time.perf_counter()
    behind = 0
    for i, call in enumerate(calls):
        due = start + i / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        elif pause < -0.005:
            behind += 1
        queued_at[call.job_id] = time.time()
        queuer.queue([call])
    sent_seconds = time.perf_counter() - start
    deadline = time.monotonic() + 60
    while redis.client.hlen(STARTS_KEY) < len(queued_at) and time.monotonic() < deadline:
        time.sleep(0.02)
    raw: dict[bytes, bytes] = redis.client.hgetall(STARTS_KEY)  # type: ignore[assignment]
    starts = {k.decode(): float(v) for k, v in raw.items()}
    lat = [(starts[j] - t) * 1000 for j, t in queued_at.items() if j in starts]
    return {"events": n, "rate": rate, "achieved_rate": round(n / sent_seconds, 1), "late_sends": behind,
            "started": len(lat), "p50_ms": round(percentile(lat, 50), 2),
            "p99_ms": round(percentile(lat, 99), 2),
            "max_ms": round(max(lat), 2) if lat else None,
            "mean_ms": round(statistics.fmean(lat), 2) if lat else None}


TOOK_DOWN = {SHIPPED: "one light child (its parent restarts it)", "split2": "one light child (its parent restarts it)",
             "fork": "the work-horse", "simple": "the whole worker"}
"""What one crashing action takes down, by class (what the probe then checks)."""


def crash_probe(redis: RedisProc, queuer: Queuer, kind: str, work: Path, *,
                crash_queue: str | None = None) -> dict[str, Any]:
    """A crashing action (one retry allowed, after 1 s; on the light queue unless ``crash_queue``
    says otherwise), then a light no-op, on one worker: what survives, whether the next job runs,
    and how soon the crashed job is retried (it crashes again, then fails)."""
    from rq.job import Job, JobStatus

    from core.delivery_log import DeliveryLog
    from core.queueing import SERIALIZER, queue

    redis.flush()
    crash = _calls(1, tag="crash", crash=True, attempts=1, queue=crash_queue)[0]
    after = _calls(1, tag="after-crash")[0]
    deliveries = DeliveryLog(redis.client, retention_seconds=86400)

    def action() -> dict[str, Any]:
        record = deliveries.get(crash.delivery_id)
        return record.actions.get(crash.job_id, {}) if record else {}

    def rq_status() -> JobStatus | None:
        return Job.fetch(crash.job_id, connection=redis.client, serializer=SERIALIZER).get_status()

    with workers(redis, kind, 1, work) as (proc,):
        t0 = time.time()
        queuer.queue([crash])
        queuer.queue([after])
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            if not proc.alive():
                time.sleep(0.5)  # give it time to write anything it writes on the way down
                break
            # RQ's abandoned-job cleanup runs our failure callback (the log's "failed") before it
            # commits the job's own status: wait for both, or the probe reads RQ mid-way.
            if redis.client.hexists(STARTS_KEY, after.job_id) and action().get("status") == "failed" \
                    and rq_status() != JobStatus.STARTED:
                break
            time.sleep(0.05)
        alive = proc.alive()
        exit_code = proc.popen.returncode
        next_ran = bool(redis.client.hexists(STARTS_KEY, after.job_id))
        status = rq_status()
        state = action()
        record = deliveries.get(crash.delivery_id)
        steps = [(st["step"], st["t"]) for st in (record.timeline if record else []) if st["step"] != "note"]
        q = queue(crash.queue, redis.client)
        wip: list[tuple[bytes, float]] = redis.client.zrange(  # type: ignore[assignment]
            q.started_job_registry.key, 0, -1, withscores=True)
        retry_in = None
        for member, score in wip:
            if member.decode().startswith(crash.job_id):
                retry_in = round(score - time.time())
        starts = [_epoch(t) for step, t in steps if step == "started"]
        return {
            "took_down": TOOK_DOWN.get(kind, "?"),
            "worker_survived": alive, "worker_exit_code": exit_code, "next_job_ran": next_ran,
            "crashed_job_rq_status": str(status.value if status else None),
            "crashed_job_log_status": state.get("status"),
            "crashed_job_log_error": (state.get("error") or {}).get("class"),
            "crashed_job_steps": [step for step, _ in steps],
            "first_start_s": round(starts[0] - t0, 2) if starts else None,
            "retried_after_s": round(starts[1] - starts[0], 2) if len(starts) > 1 else None,
            "abandoned_job_recovered_in_s": retry_in,
        }


def _epoch(iso_time: str) -> float:
    """Seconds since the epoch of a delivery-log time (``2026-11-22T19:26:26.123Z``)."""
    return datetime.strptime(iso_time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def run(work: Path, *, jobs: int, latency_seconds: float, rate: float = 100.0, drains: int = 3,
        setups: tuple[tuple[str, int], ...] = SETUPS, crash: bool = True,
        worker_env: dict[str, str] | None = None, log: Callable[[str], None]) -> dict[str, Any]:
    """The whole dispatch phase. Each setup drains ``drains`` times and keeps the median run: one
    drain of a few seconds moved by 5-10 % from run to run, enough to flip the 1.8x verdict."""
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"jobs": jobs, "rate": rate, "latency_seconds": latency_seconds, "shipped": SHIPPED,
                           "drains": drains, "setups": {}}
    with RedisProc(work / "redis") as redis:
        for kind, count in setups:
            name = f"{kind}x{count}"
            redis.flush()
            queuer: Queuer | StockQueuer = StockQueuer(redis.client) if kind == STOCK else Queuer(redis.client)
            with workers(redis, kind, count, work, extra_env=worker_env) as started:
                # A short warm-up burst: imports, connections and the first fork out of the way.
                drain(redis, queuer, min(50, jobs))
                runs = []
                for _ in range(drains):
                    d = drain(redis, queuer, jobs, started)
                    runs.append(d)
                    log(f"dispatch: {name:<9} drained {d['completed']}/{jobs} in {d['seconds']:.2f}s "
                        f"= {d['per_second']:.0f} jobs/s; CPU per job: workers {d['worker_cpu_ms_per_job']} ms, "
                        f"redis {d['redis_cpu_ms_per_job']} ms")
                d = {**sorted(runs, key=lambda r: r["per_second"])[len(runs) // 2],
                     "runs_per_second": [r["per_second"] for r in runs]}
                redis.client.delete(STARTS_KEY)
                lat = latency(redis, queuer, rate=rate, seconds=latency_seconds)
                log(f"dispatch: {name:<9} {rate:.0f} events/s: start latency p50 {lat['p50_ms']} ms "
                    f"p99 {lat['p99_ms']} ms ({lat['started']}/{lat['events']} started)")
                rss = sum(procs.tree_memory(p.pid).rss for p in started)
            out["setups"][name] = {"kind": kind, "processes": count, "drain": d, "latency": lat,
                                   "rss_mb_after": round(rss / MB, 1)}
        out["stock"] = paired_stock_ratio(redis, work, jobs=jobs, pairs=max(drains, 1) * 2 + 1,
                                          worker_env=worker_env, log=log) \
            if any(kind == STOCK for kind, _ in setups) and any(kind == SHIPPED for kind, _ in setups) \
            else stock_ratio(out["setups"], log)
        if crash:
            queuer = Queuer(redis.client)
            out["crash"] = {}
            for kind in sorted({KINDS[k][0] for k, _ in setups} - {STOCK}):
                probe = crash_probe(redis, queuer, kind, work)
                out["crash"][kind] = probe
                log(f"dispatch: crash probe {kind}: {probe}")
    return out


def paired_stock_ratio(redis: RedisProc, work: Path, *, jobs: int, pairs: int,
                       worker_env: dict[str, str] | None, log: Callable[[str], None]) -> dict[str, Any]:
    """The target's figure: stock and the shipped setup (one process each) both up, draining in
    turn, ``pairs`` times; the median of the pairs' CPU ratios.

    Measured apart from the setups' table because this host's speed drifts by 20-40 % over the
    minutes between two setups' drains (the same code measured 1.00x, 1.22x and 1.38x in three
    suites of one day): two drains seconds apart see the same host, so their ratio is the code's.
    """
    redis.flush()
    stock_queuer, ours_queuer = StockQueuer(redis.client), Queuer(redis.client)
    with workers(redis, STOCK, 1, work, extra_env=worker_env) as stock, \
            workers(redis, SHIPPED, 1, work, extra_env=worker_env) as ours:
        drain(redis, stock_queuer, min(50, jobs))
        drain(redis, ours_queuer, min(50, jobs))
        runs = []
        for i in range(pairs):
            # Who goes first alternates: a drift within a pair then favours neither.
            order: list[tuple[str, Queuer | StockQueuer, list[Proc]]] = [(STOCK, stock_queuer, stock),
                                                                         (SHIPPED, ours_queuer, ours)]
            measured = {name: drain(redis, q, jobs, started)["worker_cpu_ms_per_job"]
                        for name, q, started in (order if i % 2 == 0 else order[::-1])}
            runs.append(measured)
            log(f"dispatch: pair {i + 1}/{pairs}: worker CPU per no-op job {SHIPPED} {measured[SHIPPED]} ms, "
                f"{STOCK} {measured[STOCK]} ms = {measured[SHIPPED] / measured[STOCK]:.2f}x")
    runs.sort(key=lambda r: r[SHIPPED] / r[STOCK])
    ratios = [r[SHIPPED] / r[STOCK] for r in runs]
    median_pair = runs[len(runs) // 2]
    ratio = round(ratios[len(runs) // 2], 2)
    verdict = "PASS" if ratio <= STOCK_RATIO_TARGET else "MISS"
    log(f"dispatch: worker CPU per no-op job, {SHIPPED}x1 over RQ's stock SimpleWorker, median of {pairs} "
        f"pairs: {ratio}x (pairs {', '.join(f'{r:.2f}' for r in ratios)}); target <= {STOCK_RATIO_TARGET}x: "
        f"{verdict}")
    return {"ratio": ratio, "pairs": [round(r, 3) for r in ratios], "target": STOCK_RATIO_TARGET,
            "verdict": verdict, "stock_ms": median_pair[STOCK],
            "measured": f"{median_pair[SHIPPED]:.2f} vs {median_pair[STOCK]:.2f} ms of worker CPU per no-op, "
                        f"median of {pairs} paired drains"}


def stock_ratio(setups: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    """Worker CPU per no-op job of each one-process cvat-hooks setup over stock's; the shipped
    setup's ratio is the target's, printed PASS or MISS."""
    stock = setups.get(f"{STOCK}x1")
    if not stock:
        return None
    base = stock["drain"]["worker_cpu_ms_per_job"]
    ratios = {name: round(s["drain"]["worker_cpu_ms_per_job"] / base, 2) for name, s in setups.items()
              if s["processes"] == 1 and s["kind"] != STOCK and base}
    shipped = ratios.get(f"{SHIPPED}x1")
    verdict = None if shipped is None else ("PASS" if shipped <= STOCK_RATIO_TARGET else "MISS")
    log(f"dispatch: worker CPU per no-op job vs RQ's stock SimpleWorker ({base} ms): "
        + ", ".join(f"{name} {ratio}x" for name, ratio in ratios.items())
        + (f"; target {SHIPPED} <= {STOCK_RATIO_TARGET}x: {verdict}" if verdict else ""))
    measured = (f"{setups[f'{SHIPPED}x1']['drain']['worker_cpu_ms_per_job']:.2f} vs {base:.2f} ms of worker CPU "
                "per no-op" if shipped is not None else "")
    return {"ratio": shipped, "measured": measured, "stock_ms": base, "ratios": ratios,
            "target": STOCK_RATIO_TARGET, "verdict": verdict}
