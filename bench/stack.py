"""What users run, started for a bench: ``cvat-hooks serve`` and ``cvat-hooks worker`` on a Redis, the
test CVAT server, and signed CVAT deliveries to send them.

Shared by the end-to-end benches (``adnanh``, ``scaling``, ``latency``): each event goes in as a real
signed ``update:job`` delivery over HTTP and comes out as an action the shipped worker ran, read back
from the delivery log, so nothing of cvat-hooks is bypassed or stubbed.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procs
from bench.cvat_stand_in import READY
from bench.procs import Proc, RedisProc
from core.settings import DEFAULT_LIGHT_PROCESSES

PAYLOAD = procs.ROOT / "tests" / "payloads" / "cvat-2.73" / "update_job_completed.json"
"""A real delivery of CVAT 2.73: a job moved to acceptance and completed."""
SECRET = "mykey"
"""The secret the captured CVAT deliveries were signed with."""
PATH = "/webhooks/cvat"


def cli() -> list[str]:
    """The ``cvat-hooks`` command as installed next to this interpreter (the console script users run)."""
    script = Path(sys.executable).parent / "cvat-hooks"
    if script.exists():
        return [str(script)]
    found = shutil.which("cvat-hooks")
    if found is None:
        raise RuntimeError("the cvat-hooks command is not installed (pip install -e .)")
    return [found]


def epoch(iso_time: str | None) -> float | None:
    """Seconds since the epoch of a delivery-log time (``2026-11-22T19:26:26.123Z``, milliseconds)."""
    if not iso_time:
        return None
    return datetime.strptime(iso_time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- deliveries -------------------------------------------------------------------------------


def deliveries(job_ids: Sequence[int], *, task_id: int | None = None, tag: int = 0) -> list[tuple[bytes, str]]:
    """One signed ``update:job`` delivery per job id, shaped exactly like the capture (the job, its
    URLs and ``updated_date`` vary; ``tag`` makes another round of the same jobs distinct events)."""
    from receiver.signature import sign

    payload = json.loads(json.loads(PAYLOAD.read_text())["body_raw"])
    job = payload["job"]
    out = []
    for i, job_id in enumerate(job_ids):
        job["id"] = job_id
        if task_id is not None:
            job["task_id"] = task_id
        job["url"] = f"http://127.0.0.1:8080/api/jobs/{job_id}"
        job["issues"]["url"] = f"http://127.0.0.1:8080/api/issues?job_id={job_id}"
        job["labels"]["url"] = f"http://127.0.0.1:8080/api/labels?job_id={job_id}"
        micros = tag * 10_000_000 + i
        job["updated_date"] = f"2026-11-22T18:{(micros // 60_000_000) % 60:02d}:" \
                              f"{(micros // 1_000_000) % 60:02d}.{micros % 1_000_000:06d}Z"
        payload["changes"]["updated_date"]["to"] = job["updated_date"]
        body = json.dumps(payload).encode()  # CVAT sends json.dumps(payload): same shape, same spacing
        out.append((body, sign(body, SECRET)))
    return out


class Poster:
    """POSTs deliveries the way CVAT sends them, over one kept-alive connection."""

    def __init__(self, port: int, path: str = PATH) -> None:
        self.port, self.path = port, path
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, signature: str) -> tuple[int, bytes]:
        """One delivery; reconnects once if the server closed the kept-alive connection."""
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request("POST", self.path, body=body,
                                  headers={"Content-Type": "application/json", "X-Signature-256": signature})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class RawPoster:
    """A :class:`Poster` for the latency bench, costing the bench as little CPU as Python allows: the
    request's bytes are written by hand and the answer read by its ``Content-Length``, which
    cvat-hooks' endpoint always sends. The bench shares the machine's two cores with the servers it
    measures, and the time before the bytes leave counts in every latency: http.client's request
    building and header parsing cost three times the CPU per POST (0.39 against 0.13 ms, 2026-12-07).
    Not for other servers (chunked answers, HTTP/1.0)."""

    def __init__(self, port: int, path: str = PATH) -> None:
        self.port, self.path = port, path
        self.sock: socket.socket | None = None

    def post(self, body: bytes, signature: str) -> tuple[int, bytes]:
        """One delivery; reconnects once if the server closed the kept-alive connection."""
        head = (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: application/json\r\nX-Signature-256: {signature}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        for attempt in (1, 2):
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.sock.sendall(head + body)
                return self._answer()
            except (ConnectionError, EOFError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _answer(self) -> tuple[int, bytes]:
        assert self.sock is not None
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed before an answer")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields["content-length"])
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed inside an answer")
            rest += chunk
        if fields.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split()[1]), rest[:length]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StandIn:
    """The test CVAT server running in a process of its own."""

    url: str
    first_job: int
    last_job: int
    proc: Proc

    @property
    def job_ids(self) -> list[int]:
        return list(range(self.first_job, self.last_job + 1))


@contextmanager
def stand_in(work: Path, *, jobs: int, delay_ms: float = 0.0, export_size_mb: float = 1.0,
             export_seconds: float = 0.2, name: str = "cvat-stand-in") -> Iterator[StandIn]:
    """``bench.cvat_stand_in`` in its own process (its CPU is not the bench's); yields its URL and jobs."""
    proc = procs.start(name, [sys.executable, "-m", "bench.cvat_stand_in", "--jobs", str(jobs),
                              "--delay-ms", str(delay_ms), "--export-size-mb", str(export_size_mb),
                              "--export-seconds", str(export_seconds)], log_dir=work / "logs")
    try:
        deadline = time.monotonic() + 60
        while True:
            line = next((x for x in (proc.tail(50) or "").splitlines() if x.startswith(READY)), None)
            if line:
                info = json.loads(line[len(READY):])
                break
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test CVAT server did not start:\n{proc.tail()}")
            time.sleep(0.05)
        yield StandIn(info["url"], info["first_job"], info["last_job"], proc)
    finally:
        proc.stop()


def hooks_env(redis: RedisProc, work: Path, cvat_url: str | None = None) -> dict[str, str]:
    """The environment both cvat-hooks commands get: Redis, data dir, the secret, CVAT's token."""
    from tests.cvat_server import DEFAULT_TOKEN

    env = {"CVAT_HOOKS_REDIS_URL": redis.url, "CVAT_HOOKS_SECRET": SECRET,
           "CVAT_HOOKS_DATA_DIR": str(work / "data"), "CVAT_HOOKS_LOG_FORMAT": "text",
           "CVAT_HOOKS_RULES": str(work / "rules.yaml")}
    if cvat_url:
        env.update({"CVAT_URL": cvat_url, "CVAT_ACCESS_TOKEN": DEFAULT_TOKEN})
    return env


@contextmanager
def receiver(work: Path, env: Mapping[str, str], *, name: str = "cvat-hooks-serve") -> Iterator[tuple[int, Proc]]:
    """``cvat-hooks serve --no-worker`` (the shipped gunicorn setup); yields its port and process once
    ready."""
    port = procs.free_port()
    proc = procs.start(name, [*cli(), "serve", "--port", str(port), "--no-worker"], env=env,
                       log_dir=work / "logs")
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=60)
        yield port, proc
    finally:
        proc.stop()


@contextmanager
def worker(work: Path, redis: RedisProc, env: Mapping[str, str], *, light_processes: int = DEFAULT_LIGHT_PROCESSES,
           expect: int | None = None, name: str = "cvat-hooks-worker") -> Iterator[Proc]:
    """``cvat-hooks worker`` (its default ``split`` class, ``light_processes`` light children and the
    exports child); yields it once its RQ workers are registered."""
    from rq import Worker

    before = Worker.count(connection=redis.client)
    full = {**env, "CVAT_HOOKS_LIGHT_PROCESSES": str(light_processes)}
    proc = procs.start(name, [*cli(), "worker"], env=full, log_dir=work / "logs")
    try:
        want = before + (expect if expect is not None else light_processes + 1)
        deadline = time.monotonic() + 90
        while Worker.count(connection=redis.client) < want:
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"cvat-hooks worker did not register {want - before} RQ workers:\n"
                                   f"{proc.tail()}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.stop()


def actions_of(redis: RedisProc, delivery_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each delivery's first action, as the delivery log has it (status, started_at, finished_at...)."""
    from core.delivery_log import DeliveryLog

    log = DeliveryLog(redis.client, retention_seconds=86400)
    out: dict[str, dict[str, Any]] = {}
    for delivery_id in delivery_ids:
        record = log.get(delivery_id)
        if record is not None and record.actions:
            out[delivery_id] = {**next(iter(record.actions.values())),
                                "received_ts": record.record.get("received_ts")}
    return out


def wait_actions(redis: RedisProc, delivery_ids: Sequence[str], *, timeout: float,
                 watch: Sequence[Proc] = ()) -> dict[str, dict[str, Any]]:
    """Wait until every delivery's action has ended (succeeded, failed, skipped) or ``timeout``."""
    deadline = time.monotonic() + timeout
    ended = ("succeeded", "failed", "skipped")
    while True:
        actions = actions_of(redis, delivery_ids)
        if sum(1 for a in actions.values() if a.get("status") in ended) >= len(delivery_ids):
            return actions
        for proc in watch:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            return actions
        time.sleep(0.1)
