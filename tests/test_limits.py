"""Limits, through the real gunicorn the receiver runs under (``operations.serve.gunicorn_command``):
body size (413), JSON nesting depth (400), oversized request lines and headers (4xx from gunicorn,
before the app), and slow clients cut off without blocking anybody else.

Raw sockets are used where a client library would not misbehave the way an attacker does.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from operations.serve import ServeOptions, gunicorn_command
from receiver.settings import DEFAULT_MAX_BODY
from tests.conftest import ROOT, SECRET, capture, free_port, signed
from tests.procs import Proc, RedisProc, clean_env, wait_for

BODY_SECONDS = 1.5
"""The receiver's body deadline in these tests (CVAT_HOOKS_BODY_SECONDS; 10 s by default)."""
THREADS = 2 * 4
"""Request threads of the receiver: gunicorn_command's 2 workers x 4 threads."""


class Gunicorn(Proc):
    """The receiver's gunicorn command line, with its limits, on a free loopback port."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.port = free_port()
        super().__init__("gunicorn", gunicorn_command(ServeOptions(port=self.port)), clean_env(env), log_dir)

    def ready(self) -> None:
        if not wait_for(lambda: get(self.port, "/healthz", timeout=1)[0] == 200, timeout=30, interval=0.05):
            raise RuntimeError(f"gunicorn did not start:\n{self.log_text()[-3000:]}")


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int | None, float]:
    """(status or None, seconds taken) of a GET."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status, time.monotonic() - started
    except OSError:
        return None, time.monotonic() - started
    finally:
        conn.close()


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, return everything the server answers before closing (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass  # the server may close before reading it all; its answer is what counts
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and not raw.startswith(b"POST"):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int | None:
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def post(port: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/webhooks/cvat", body=body, headers=headers if headers is not None else signed(body))
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """gunicorn serving the receiver, over a redis-server of this module's own."""
    base = tmp_path_factory.mktemp("limits")
    redis = RedisProc(base / "redis", base / "logs").start()
    env = {"CVAT_HOOKS_REDIS_URL": redis.url, "CVAT_HOOKS_SECRET": SECRET,
           "CVAT_HOOKS_RULES": str(ROOT / "rules.yaml"), "CVAT_HOOKS_DATA_DIR": str(base / "data"),
           "CVAT_HOOKS_BODY_SECONDS": str(BODY_SECONDS)}
    server = Gunicorn(env, base / "logs").start()
    yield server
    server.stop()
    redis.stop()


def nested_event(depth: int) -> bytes:
    """A ping whose payload nests ``depth`` levels in all (the event object is level 1)."""
    return b'{"event": "ping", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


BODIES = [
    # (id, body, expected status)
    ("ping", capture("ping.json")[0], 200),
    ("depth-64-accepted", nested_event(64), 200),
    ("depth-65-refused", nested_event(65), 400),
    ("depth-100000-refused", nested_event(100_000), 400),
    ("exactly-the-size-limit", b'{"event": "ping", "pad": "' + b"x" * (DEFAULT_MAX_BODY - 28) + b'"}', 200),
    ("one-byte-over", b'{"event": "ping", "pad": "' + b"x" * (DEFAULT_MAX_BODY - 27) + b'"}', 413),
]


@pytest.mark.parametrize("body,status", [(b, s) for _, b, s in BODIES], ids=[i for i, _, _ in BODIES])
def test_body_limits(receiver: Gunicorn, body: bytes, status: int) -> None:
    """Signed bodies at and past the depth (64) and size (1 MiB) limits get 2xx, 400 or 413, in
    well under a second of work each (a 1 MiB string once took minutes to redact)."""
    started = time.monotonic()
    answer, text = post(receiver.port, body)
    assert answer == status, text[:200]
    assert time.monotonic() - started < 5.0


def test_chunked_body_over_the_limit_is_413(receiver: Gunicorn) -> None:
    """A body sent in chunks (no Content-Length to refuse up front) is cut at the limit too."""
    body = b'{"event": "ping", "pad": "' + b"x" * DEFAULT_MAX_BODY + b'"}'
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=20)
    try:
        conn.request("POST", "/webhooks/cvat", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                     headers=signed(body), encode_chunked=True)
        assert conn.getresponse().status == 413
    finally:
        conn.close()


def test_chunked_body_within_the_limit_is_received(receiver: Gunicorn) -> None:
    """The same in chunks, under the limit: read to its end and answered like any delivery."""
    body = capture("update_job_completed.json")[0]
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=20)
    try:
        conn.request("POST", "/webhooks/cvat", body=iter([body[i:i + 500] for i in range(0, len(body), 500)]),
                     headers=signed(body), encode_chunked=True)
        answer = conn.getresponse()
        assert answer.status == 202, answer.read()[:200]
    finally:
        conn.close()


HEADERS = [
    # (id, raw request) -- each beyond one of gunicorn_command's limits
    ("request-line-over-8190", b"GET /healthz?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("header-field-over-8190", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"),
    ("signature-header-over-8190", b"POST /webhooks/cvat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                   b"X-Signature-256: sha256=" + b"0" * 9000 + b"\r\n\r\n{}"),
    ("over-100-header-fields", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                               + b"".join(b"X-H%d: 1\r\n" % i for i in range(120)) + b"\r\n"),
]


@pytest.mark.parametrize("raw", [r for _, r in HEADERS], ids=[i for i, _ in HEADERS])
def test_oversized_request_heads_are_refused_by_gunicorn(receiver: Gunicorn, raw: bytes) -> None:
    """A request line, a header or a header count past gunicorn's limits: a 4xx before the app runs,
    and the receiver keeps serving."""
    status = status_of(exchange(receiver.port, raw))
    assert status is not None and 400 <= status < 500, status
    assert get(receiver.port, "/healthz")[0] == 200


class SlowClient(threading.Thread):
    """Sends a delivery's headers, then its body one byte every ``pause`` seconds (never in time)."""

    def __init__(self, port: int, pause: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.port, self.pause = port, pause
        self.status: int | None = None
        self.cut_after: float | None = None
        self.started_sending = threading.Event()

    def run(self) -> None:
        body = capture("ping.json")[0]
        head = (f"POST /webhooks/cvat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"X-Signature-256: {signed(body)['X-Signature-256']}\r\nContent-Length: {len(body)}\r\n\r\n")
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(head.encode())
            sock.settimeout(self.pause)
            answer = b""
            for byte in body:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                self.started_sending.set()
                try:
                    answer = sock.recv(4096)
                    break  # an answer (or the server closed): cut off
                except TimeoutError:
                    continue
            self.cut_after = time.monotonic() - started
            self.status = status_of(answer)


@pytest.mark.parametrize("clients", [1, THREADS], ids=["one-slow-client", "a-slow-client-per-thread"])
def test_slow_clients_are_cut_off_and_others_served(receiver: Gunicorn, clients: int) -> None:
    """Clients trickling a body a byte at a time get 408 at the body deadline; meanwhile a normal
    request is answered at once while threads are free, and just after the deadline when slow
    clients held every thread."""
    slow = [SlowClient(receiver.port) for _ in range(clients)]
    for client in slow:
        client.start()
    assert all(c.started_sending.wait(10) for c in slow)
    status, seconds = get(receiver.port, "/healthz", timeout=BODY_SECONDS + 10)
    assert status == 200
    assert seconds < (1.0 if clients < THREADS else BODY_SECONDS + 3.0), seconds
    for client in slow:
        client.join(timeout=BODY_SECONDS + 15)
        assert not client.is_alive(), "the slow client was never cut off"
        assert client.status == 408, client.status
        assert client.cut_after is not None and client.cut_after < BODY_SECONDS + 5.0, client.cut_after
    status, answer = post(receiver.port, json.dumps({"event": "ping", "after": clients}).encode())
    assert (status, json.loads(answer)["status"]) == (200, "ping")


class SlowHead(threading.Thread):
    """Sends a delivery's request line and headers one byte every ``pause`` seconds; gives up by
    itself after ``give_up`` seconds (the test never leaves a thread or a socket behind)."""

    def __init__(self, port: int, pause: float = 2.0, give_up: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.port, self.pause, self.give_up = port, pause, give_up
        self.answer: bytes | None = None
        self.cut_after: float | None = None
        self.connected = threading.Event()

    def run(self) -> None:
        head = b"POST /webhooks/cvat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" * 20
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.settimeout(self.pause)
            for byte in head:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                self.connected.set()
                try:
                    self.answer = sock.recv(4096)
                    break  # an answer, or the server closed: cut off
                except TimeoutError:
                    if time.monotonic() - started > self.give_up:
                        break
                except OSError:
                    self.answer = b""
                    break
            self.cut_after = time.monotonic() - started


def test_slow_heads_do_not_delay_real_deliveries(receiver: Gunicorn) -> None:
    """100 clients sending their headers one byte every 2 s hold no thread: signed deliveries are
    answered well within CVAT's 10 s meanwhile, and the slow clients are cut off with a 408."""
    from receiver.http_worker import HEAD_SECONDS

    slow = [SlowHead(receiver.port) for _ in range(100)]
    for client in slow:
        client.start()
    assert all(c.connected.wait(10) for c in slow)
    time.sleep(0.5)  # every slow client has sent a byte: under gthread each would now hold a thread
    for n in range(5):
        started = time.monotonic()
        status, answer = post(receiver.port, json.dumps({"event": "ping", "slow_heads": n}).encode())
        assert (status, json.loads(answer)["status"]) == (200, "ping")
        assert time.monotonic() - started < 2.0
    for client in slow:
        client.join(timeout=HEAD_SECONDS + 15)
        assert not client.is_alive(), "the slow client was never cut off"
        assert client.cut_after is not None and client.cut_after < HEAD_SECONDS + 3.0, client.cut_after
        assert client.answer is not None and status_of(client.answer) in (408, None), client.answer
    assert sum(status_of(c.answer or b"") == 408 for c in slow) >= 90


def test_access_log_never_shows_query_strings_or_referers(receiver: Gunicorn) -> None:
    """A token sent in a query string (or a Referer) does not reach gunicorn's access log."""
    conn = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=5)
    try:
        conn.request("GET", "/healthz?token=QueryTok3nInTheUrl&x=1",
                     headers={"Referer": "http://x/ui/?token=RefererTok3nInTheUrl"})
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert wait_for(lambda: '"GET /healthz HTTP/1.1" 200' in receiver.log_text(), timeout=5)
    assert "Tok3nInTheUrl" not in receiver.log_text()
