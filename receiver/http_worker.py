"""gunicorn's ``gthread`` worker, with the request head read by the event loop instead of a thread.

Why (security issue, item 3): ``gthread`` hands a connection to a thread as soon as its first byte
arrives, and the thread then reads the head with a blocking socket and no deadline. A hundred
clients sending their headers one byte every two seconds held every thread, and CVAT's real
deliveries (it waits 10 s) all timed out. Here the worker's poller collects the head without a
thread (non-blocking reads, any number of connections up to ``--worker-connections``); a
connection gets a thread only once its head is complete, and a head not complete within
:data:`HEAD_SECONDS` (or larger than :data:`MAX_HEAD_BYTES`) is answered 408 (431) and closed.
The body has its own deadline in the app (``CVAT_HOOKS_BODY_SECONDS``).

Kept-alive connections go through the same head phase for their next request. TLS connections
(gunicorn's ``--certfile``) keep gunicorn's own path: their bytes cannot be read before the handshake.

This steers ``ThreadWorker`` below its documented surface (its poller, ``TConn``, the parser's
unreader), so it is kept to this one module, and
``tests/test_limits.py::test_slow_heads_do_not_delay_real_deliveries`` runs it under real slow
clients on every CI run: it fails when a gunicorn release changes what this relies on. gunicorn has
no deadline for a request head (benoitc/gunicorn#2652); PR #3519 only defers connections that
send nothing at all, not ones that trickle. Remove this once gunicorn bounds the head read itself.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections import deque
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker  # type: ignore[import-untyped]

HEAD_SECONDS = 5.0
"""Seconds a client has to send its request line and headers (CVAT sends them at once)."""
MAX_HEAD_BYTES = 64 * 1024
"""Bytes of request line and headers read at most (gunicorn's own limits are checked after)."""
_TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TOO_LARGE_ANSWER = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                     b"Content-Length: 0\r\n\r\n")


class HeadFirstWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn ships no type hints
    """``gthread``, but no thread is committed to a connection before its request head is complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heading: deque[TConn] = deque()
        """Connections whose head is being read, oldest first (their deadlines are in that order)."""

    def _start_head(self, conn: TConn) -> None:
        """Put a connection on the poller until its head is complete or its deadline passes."""
        conn.sock.setblocking(False)
        conn.head = bytearray()
        conn.timeout = time.monotonic() + HEAD_SECONDS
        self.heading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_readable, conn))

    def _drop(self, conn: TConn, answer: bytes | None = None) -> None:
        """Stop reading a head: answer (best effort, never blocking) and close the connection."""
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        if answer:
            try:
                conn.sock.send(answer)
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def accept(self, listener: socket.socket) -> None:
        """Accept a connection and start reading its head on the poller (TLS: gunicorn's path)."""
        if self.cfg.is_ssl:
            super().accept(listener)
            return
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._start_head(TConn(self.cfg, client_sock, client_addr, listener.getsockname()))

    def on_client_socket_readable(self, conn: TConn, client: socket.socket) -> None:
        """A kept-alive connection starts its next request: read that head on the poller too."""
        if self.cfg.is_ssl:
            super().on_client_socket_readable(conn, client)
            return
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._start_head(conn)
        self._on_head_readable(conn, client)

    def _on_head_readable(self, conn: TConn, client: socket.socket) -> None:
        """Read what arrived; hand the connection to a thread once the head is complete."""
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.heading.remove(conn)
            self._drop(conn)
            return
        conn.head += chunk
        if b"\r\n\r\n" not in conn.head and b"\n\n" not in conn.head:
            if len(conn.head) > MAX_HEAD_BYTES:
                self.heading.remove(conn)
                self._drop(conn, _TOO_LARGE_ANSWER)
            return
        self.heading.remove(conn)
        self.poller.unregister(client)
        conn.data_ready = True
        self.enqueue_req(conn)

    def handle(self, conn: TConn) -> Any:
        """Give the parser the head read by the poller, then let gunicorn serve the request."""
        head = getattr(conn, "head", None)
        if head:
            conn.head = bytearray()
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(bytes(head))
        return super().handle(conn)

    def murder_pending(self) -> None:
        """Besides gunicorn's pending connections, close heads past their deadline with a 408."""
        super().murder_pending()
        now = time.monotonic()
        while self.heading and self.heading[0].timeout <= now:
            self._drop(self.heading.popleft(), _TIMEOUT_ANSWER)
