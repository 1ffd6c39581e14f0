"""A local append-only journal for deliveries that arrive while Redis is unreachable.

CVAT before mid-2026 never retries a failed delivery, so answering 503 while Redis restarts would
lose events. Instead the verified raw body is appended here (fsync'd before we answer 202), and
replayed through the normal path once Redis answers again; dedupe makes a replay of something that
did get stored harmless. Bounded in size: when full, the receiver answers 503 after all.

Several gunicorn processes share one journal file: appends take an exclusive ``flock``; the single
drainer (whoever holds ``drain.lock``) renames the file aside under that lock, so new appends start
a fresh file, and writers re-check after locking that they still hold the current file.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
"""Bytes of journal kept at most (about 200,000 typical deliveries)."""
CURRENT = "journal.log"
DRAINING_SUFFIX = ".draining"


class JournalFull(Exception):
    """The journal reached its size limit; the delivery cannot be kept."""


class Journal:
    """Append verified bodies; drain them in order through a handler."""

    def __init__(self, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._pending_checked = 0.0
        self._pending = False
        self._drainer: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> Path:
        return self.directory / CURRENT

    def size(self) -> int:
        """Bytes held in every journal file."""
        try:
            return sum(p.stat().st_size for p in self.directory.iterdir() if p.name.startswith("journal"))
        except FileNotFoundError:
            return 0

    def append(self, body: bytes, received_at: float) -> None:
        """Durably add one delivery (raises :class:`JournalFull` or ``OSError``)."""
        line = json.dumps({"t": received_at, "b": base64.b64encode(body).decode()}).encode() + b"\n"
        if self.size() + len(line) > self.max_bytes:
            raise JournalFull(f"journal in {self.directory} is full ({self.max_bytes} bytes)")
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.fstat(fd).st_ino != os.stat(self.current).st_ino:
                        continue  # the drainer moved this file aside while we waited: use the new one
                except FileNotFoundError:
                    continue
                os.write(fd, line)
                os.fsync(fd)
                break
            finally:
                os.close(fd)  # closing releases the flock
        self._pending = True

    def pending(self) -> bool:
        """Whether anything waits to be drained (checks the disk at most once a second)."""
        now = time.monotonic()
        if not self._pending and now - self._pending_checked > 1.0:
            self._pending_checked = now
            self._pending = any(p.name.startswith("journal") for p in self._files())
        return self._pending

    def _files(self) -> list[Path]:
        try:
            return sorted(self.directory.iterdir())
        except FileNotFoundError:
            return []

    def drain(self, handle: Callable[[bytes, float], object]) -> int:
        """Feed every journaled delivery to ``handle`` in order; stop at its first exception.

        Progress is saved after each delivery, so a crash mid-drain replays at most one delivery
        (which dedupe recognises). Returns how many were handled.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.directory / "drain.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is draining
            self._move_current_aside()
            handled = 0
            for path in [p for p in self._files() if p.name.endswith(DRAINING_SUFFIX)]:
                handled += self._drain_file(path, handle)
            self._pending = any(p.name.startswith("journal") for p in self._files())
            return handled
        finally:
            os.close(lock_fd)

    def _move_current_aside(self) -> None:
        try:
            fd = os.open(self.current, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(self.current, self.directory / f"journal-{time.time_ns()}{DRAINING_SUFFIX}")
        finally:
            os.close(fd)

    def _drain_file(self, path: Path, handle: Callable[[bytes, float], object]) -> int:
        offset_path = path.with_suffix(".offset")
        offset = int(offset_path.read_text()) if offset_path.exists() else 0
        handled = 0
        with path.open("rb") as fh:
            fh.seek(offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # a torn last line from a crash mid-write was never acknowledged
                entry = json.loads(line)
                handle(base64.b64decode(entry["b"]), float(entry["t"]))
                offset += len(line)
                handled += 1
                offset_path.write_text(str(offset))
        path.unlink()
        offset_path.unlink(missing_ok=True)
        return handled

    def drain_in_background(self, handle: Callable[[bytes, float], object], ready: Callable[[], bool],
                            *, interval: float = 1.0) -> None:
        """Start (once per process) a thread that drains whenever ``ready()`` says Redis is back."""
        with self._lock:
            if self._drainer is not None and self._drainer.is_alive():
                return
            self._drainer = threading.Thread(target=self._drain_loop, args=(handle, ready, interval),
                                             name="cvat-hooks-journal", daemon=True)
            self._drainer.start()

    def _drain_loop(self, handle: Callable[[bytes, float], object], ready: Callable[[], bool],
                    interval: float) -> None:
        while self.pending():
            try:
                if ready():
                    count = self.drain(handle)
                    if count:
                        log.info("journal: moved %d delivery(ies) into Redis", count)
                        continue
            except Exception as exc:  # keep trying: the journal must not be abandoned
                log.warning("journal: drain paused: %s", exc)
            time.sleep(interval)
