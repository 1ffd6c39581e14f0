"""Body deadlines: one watchdog thread per receiver process cuts off clients that trickle a body.

gunicorn's gthread worker waits at most 5 s for a request's first byte, but once it reads a
request, a client trickling its body holds that thread as long as it likes: ``--timeout`` only
watches the worker process, which stays responsive. So a request that is still reading its body at
its deadline has its socket's reading side shut down: the blocked read returns what it has at once,
and the client still gets its 408.

One thread per process, scanning a few entries (at most one per gunicorn thread) every
:data:`TICK_SECONDS`, where a ``threading.Timer`` per request cost a thread start and a cancel: about
0.17 ms of CPU per delivery on the bench machine (bench/README.md), for a deadline almost never hit.
A deadline is therefore enforced up to one tick late.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

TICK_SECONDS = 0.25
"""How often the watchdog looks for expired reads."""


class BodyDeadlines:
    """Reads in progress, by ticket, each with the socket to shut and the time to shut it."""

    def __init__(self, tick: float = TICK_SECONDS) -> None:
        self._tick = tick
        self._reads: dict[int, tuple[float, socket.socket]] = {}
        self._tickets = itertools.count()
        self._lock = threading.Lock()
        self._pid: int | None = None  # the process whose watchdog runs (gunicorn forks after import)

    @contextmanager
    def reading(self, sock: socket.socket, seconds: float) -> Iterator[None]:
        """While inside, ``sock``'s reading side is shut down once ``seconds`` have passed."""
        if self._pid != os.getpid():
            self._start()
        ticket = next(self._tickets)
        with self._lock:
            self._reads[ticket] = (time.monotonic() + seconds, sock)
        try:
            yield
        finally:
            with self._lock:  # the watchdog must not shut a socket the next request already reuses
                self._reads.pop(ticket, None)

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            threading.Thread(target=self._watch, name="body-deadlines", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(self._tick)
            try:
                self._cut_expired()
            except Exception:  # the watchdog must outlive any surprise, or slow bodies hold threads again
                log.exception("body deadlines: could not cut off expired reads")

    def _cut_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [(ticket, sock) for ticket, (deadline, sock) in self._reads.items() if deadline <= now]
            for ticket, sock in expired:
                del self._reads[ticket]
                _stop_reading(sock)


def _stop_reading(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass  # already closed: nothing to cut off
