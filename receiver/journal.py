"""A local append-only journal for deliveries that arrive while Redis is unreachable.

CVAT before mid-2026 never retries a failed delivery, so answering 503 while Redis restarts would
lose events. Instead the verified raw body is appended here (fsync'd before we answer 202), and
replayed through the normal path once Redis answers again; dedupe makes a replay of something that
did get stored harmless. Bounded in size: when full, the receiver answers 503 after all.

Several gunicorn processes share one journal file: appends take an exclusive ``flock``; the single
drainer (whoever holds ``drain.lock``) renames the file aside under that lock, so new appends start
a fresh file, and writers re-check after locking that they still hold the current file.

An entry is acknowledged only once all of it is written and fsync'd: a short write or a full disk
cuts the file back to where the entry began and raises (the receiver answers 503, CVAT retries).
Each entry carries a CRC32 of its body; an entry that is torn or damaged anyway (a crash, a disk
that lied) is moved to ``quarantine.log`` beside the journal, logged and counted, and the drain goes
on with the next one instead of stopping there for ever.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
"""Bytes of journal kept at most (about 200,000 typical deliveries)."""
CURRENT = "journal.log"
DRAINING_SUFFIX = ".draining"
QUARANTINE = "quarantine.log"
"""Damaged entries set aside by a drain (not named ``journal*``: never drained, never counted as pending)."""


class JournalFull(Exception):
    """The journal reached its size limit; the delivery cannot be kept."""


class JournalWriteError(OSError):
    """An entry could not be written and synced in full; nothing of it was acknowledged."""


class DamagedEntry(ValueError):
    """A journal line that is not a whole, intact entry."""


def encode_entry(body: bytes, received_at: float) -> bytes:
    """One journal line: the body (base64), when it arrived, and a CRC32 of the body."""
    return json.dumps({"t": received_at, "b": base64.b64encode(body).decode(),
                       "c": zlib.crc32(body)}).encode() + b"\n"


def decode_entry(line: bytes) -> tuple[bytes, float]:
    """``(body, received_at)`` of one line; raises :class:`DamagedEntry` if it is torn or corrupt.

    Entries written before the checksum existed (no ``"c"``) are accepted if they parse.
    """
    if not line.endswith(b"\n"):
        raise DamagedEntry("torn: no end of line")
    try:
        entry = json.loads(line)
        body = base64.b64decode(entry["b"], validate=True)
        received_at = float(entry["t"])
        crc = entry.get("c")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedEntry(f"unreadable: {type(exc).__name__}") from None
    if crc is not None and crc != zlib.crc32(body):
        raise DamagedEntry("checksum mismatch")
    return body, received_at


class Journal:
    """Append verified bodies; drain them in order through a handler."""

    def __init__(self, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 on_damaged: Callable[[str], object] | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.on_damaged = on_damaged
        """Called with the reason for each damaged entry set aside (the receiver counts it)."""
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
        """Durably add one delivery: returns only once the whole entry is on disk (fsync'd).

        Raises :class:`JournalFull`, or ``OSError`` (:class:`JournalWriteError` for a short write) after
        cutting the file back to where this entry began, so no partial entry stays behind.
        """
        line = encode_entry(body, received_at)
        if self.size() + len(line) > self.max_bytes:
            raise JournalFull(f"journal in {self.directory} is full ({self.max_bytes} bytes)")
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.current, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.fstat(fd).st_ino != os.stat(self.current).st_ino:
                        continue  # the drainer moved this file aside while we waited: use the new one
                except FileNotFoundError:
                    continue
                self._write_entry(fd, line)
                break
            finally:
                os.close(fd)  # closing releases the flock
        self._pending = True

    def _write_entry(self, fd: int, line: bytes) -> None:
        """Write all of ``line`` at the end of the locked file and fsync it, or leave the file as it was."""
        start = os.fstat(fd).st_size
        prefix = b""
        if start and os.pread(fd, 1, start - 1) != b"\n":
            # An earlier entry was torn and could not be cut back: end it, so this one stays whole.
            prefix = b"\n"
        data = prefix + line
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise JournalWriteError(f"journal {self.current}: short write ({written} of {len(data)} bytes; "
                                        "disk full or file size limit?)")
            os.fsync(fd)
        except OSError:
            self._cut_back(fd, start)
            raise

    def _cut_back(self, fd: int, size: int) -> None:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as exc:  # the drain sets the torn rest aside; the caller answers 503 anyway
            log.error("journal %s: could not cut a failed entry back: %s", self.current, exc)

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
                try:
                    body, received_at = decode_entry(line)
                except DamagedEntry as exc:
                    self._quarantine(path, offset, line, str(exc))
                else:
                    handle(body, received_at)
                    handled += 1
                offset += len(line)
                offset_path.write_text(str(offset))
        path.unlink()
        offset_path.unlink(missing_ok=True)
        return handled

    def _quarantine(self, path: Path, offset: int, line: bytes, reason: str) -> None:
        """Set a damaged entry aside (kept, fsync'd, for a human), log and count it; never raises."""
        log.error("journal %s: damaged entry at byte %d (%s, %d bytes) moved to %s", path.name, offset, reason,
                  len(line), self.directory / QUARANTINE)
        record = json.dumps({"file": path.name, "offset": offset, "reason": reason,
                             "raw": base64.b64encode(line).decode()}).encode() + b"\n"
        try:
            fd = os.open(self.directory / QUARANTINE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, record)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("journal: could not keep the damaged entry in %s: %s", QUARANTINE, exc)
        if self.on_damaged is not None:
            try:
                self.on_damaged(reason)
            except Exception as exc:  # counting must never stop the drain
                log.debug("journal: could not count a damaged entry: %s", exc)

    def quarantined(self) -> int:
        """How many damaged entries ``quarantine.log`` holds (``cvat-hooks doctor`` reports them)."""
        try:
            with (self.directory / QUARANTINE).open("rb") as fh:
                return sum(1 for _ in fh)
        except FileNotFoundError:
            return 0

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
