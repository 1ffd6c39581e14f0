"""The receiver's body deadlines (``receiver.deadlines``), on real sockets."""

from __future__ import annotations

import socket
import threading
import time

from receiver.deadlines import BodyDeadlines


def test_a_read_still_blocked_at_its_deadline_is_cut_off() -> None:
    deadlines = BodyDeadlines(tick=0.02)
    server, client = socket.socketpair()
    with server, client:
        server.settimeout(3)  # without a watchdog the test fails instead of hanging
        client.sendall(b"part")
        started = time.monotonic()
        with deadlines.reading(server, 0.2):
            first = server.recv(100)
            rest = server.recv(100)  # the client sends nothing more: blocks until cut off
        waited = time.monotonic() - started
    assert (first, rest) == (b"part", b"")
    assert 0.2 <= waited < 2.0, waited


def test_a_read_done_in_time_leaves_the_socket_open_for_the_next_request() -> None:
    deadlines = BodyDeadlines(tick=0.02)
    server, client = socket.socketpair()
    with server, client:
        client.sendall(b"body")
        with deadlines.reading(server, 0.1):
            assert server.recv(100) == b"body"
        time.sleep(0.3)  # well past the deadline of the read that finished
        client.sendall(b"next")
        assert server.recv(100) == b"next"


def test_each_thread_gets_its_own_deadline() -> None:
    """A slow read is cut off while a read that started later with more time is left alone."""
    deadlines = BodyDeadlines(tick=0.02)
    slow_server, slow_client = socket.socketpair()
    fast_server, fast_client = socket.socketpair()
    got: dict[str, bytes] = {}

    def read(name: str, sock: socket.socket, seconds: float) -> None:
        with deadlines.reading(sock, seconds):
            got[name] = sock.recv(100)

    with slow_server, slow_client, fast_server, fast_client:
        slow_server.settimeout(3)
        slow = threading.Thread(target=read, args=("slow", slow_server, 0.1))
        patient = threading.Thread(target=read, args=("patient", fast_server, 5.0))
        slow.start()
        patient.start()
        slow.join(3)
        assert got.get("slow") == b""  # cut off
        assert "patient" not in got  # still waiting, within its deadline
        fast_client.sendall(b"late but in time")
        patient.join(3)
        assert got["patient"] == b"late but in time"
