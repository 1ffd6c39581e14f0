"""Hold the current rules and reload them on change, never replacing good rules with bad ones.

The first load raises (a service started with a broken ``rules.yaml`` must fail loudly); a later
reload that fails is logged and the previous rules stay in force, as adnanh/webhook does. A
reload is triggered by SIGHUP or noticed by :meth:`RuleStore.maybe_reload`, which the receiver
calls per request: it only ``stat``\\ s the file, at most once a second.

Gunicorn builds the app in each worker (no ``--preload``), so a worker that restarts while the file
is bad loads it afresh. With a :class:`LastGoodRules` (the receiver always has one) every rules text
that loaded is kept on the data volume and in Redis, and such a worker starts on it instead of
failing to boot (which made gunicorn stop: "Worker failed to boot"). Only with no good rules at all
does it start empty and report itself not ready (:attr:`RuleStore.problem`, shown by ``/readyz``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from receiver.rules.loader import load_rules
from receiver.rules.model import RulesError, RuleSet

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0
"""Seconds between two ``stat`` calls of the rules file by :meth:`RuleStore.maybe_reload`."""

Signature = tuple[int, int, int] | None
"""``(mtime_ns, size, inode)`` of the file, or ``None`` when it cannot be read."""


class LastGoodRules:
    """The last rules text that loaded, on the data volume and (best effort) in Redis for new pods."""

    KEY = "cvat-hooks:rules:last-good"
    """Redis hash: ``text``, ``digest``, ``saved_at`` (seconds since the epoch)."""

    def __init__(self, directory: Path, redis: Any | None = None) -> None:
        self.path = directory / "rules-last-good.yaml"
        self.redis = redis
        self._saved_digest = ""

    def save(self, source: Path, digest: str) -> None:
        """Keep ``source``'s bytes if they are the ones that gave ``digest``; never raises."""
        if digest == self._saved_digest:
            return
        try:
            raw = source.read_bytes()
        except OSError:
            return
        if hashlib.sha256(raw).hexdigest() != digest:
            return  # changed again since it loaded: the next reload saves it
        self._write(raw)
        if self.redis is not None:
            try:
                self.redis.hset(self.KEY, mapping={"text": raw, "digest": digest, "saved_at": time.time()})
            except Exception as exc:  # Redis down: the copy on disk serves this host
                log.warning("rules: could not keep the last good rules in Redis: %s", exc)
        self._saved_digest = digest

    def fetch(self) -> Path | None:
        """A file holding the newest kept rules text (from disk or Redis), or ``None``."""
        disk_time = -1.0
        try:
            disk_time = self.path.stat().st_mtime
        except OSError:
            pass
        if self.redis is not None:
            try:
                kept = self.redis.hgetall(self.KEY)
            except Exception as exc:
                log.warning("rules: could not read the last good rules from Redis: %s", exc)
                kept = {}
            if kept.get(b"text") is not None and float(kept.get(b"saved_at", 0)) > disk_time and \
                    self._write(kept[b"text"]):
                disk_time = 0.0
        return self.path if disk_time >= 0 else None

    def _write(self, raw: bytes) -> bool:
        """Replace the kept file with ``raw`` atomically; whether it worked (a failure is logged)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(raw)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("rules: could not keep the last good rules in %s: %s", self.path, exc)
            return False
        return True


def _signature(path: Path) -> Signature:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _first(exc: RulesError) -> str:
    """The first line of a loader error (the whole list is in the log)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class RuleStore:
    """The receiver's current :class:`RuleSet`, swapped atomically on a successful reload."""

    def __init__(self, path: str | Path, *, loader: Callable[[Path], RuleSet] = load_rules,
                 clock: Callable[[], float] = time.monotonic, check_interval: float = CHECK_INTERVAL,
                 last_good: LastGoodRules | None = None) -> None:
        """Load the rules now. Without ``last_good`` unusable rules raise :class:`RulesError`; with it,
        the last good rules are used instead, or none at all (:attr:`usable` is then false)."""
        self.path = Path(path)
        self._load = loader
        self._clock = clock
        self._interval = check_interval
        self._lock = threading.Lock()
        self._hup_pending = False
        self._last_good = last_good
        self.problem: str | None = None
        """Why the rules in force are not this file's (``None`` when they are)."""
        self.usable = True
        """Whether any good rules are in force (``False``: started with none at all; not ready)."""
        self._signature = _signature(self.path)
        self._checked_at = clock()
        try:
            self._current = self._load(self.path)
        except RulesError as exc:
            if last_good is None:
                raise
            self._current = self._start_without_the_file(last_good, exc)
            return
        self._keep()
        log.info("rules %s: loaded %d rule(s) (digest %s)", self.path, len(self._current.rules),
                 self._current.digest[:12])

    def _start_without_the_file(self, last_good: LastGoodRules, exc: RulesError) -> RuleSet:
        kept = last_good.fetch()
        if kept is not None:
            try:
                rules = self._load(kept)
            except RulesError as kept_exc:
                log.error("rules %s: the kept last good rules do not load either: %s", kept, kept_exc)
            else:
                self.problem = (f"{self.path} refused ({_first(exc)}); serving the last good rules "
                                f"(digest {rules.digest[:12]})")
                log.error("rules %s: refused, starting with the last good rules (%d rule(s), digest %s): %s",
                          self.path, len(rules.rules), rules.digest[:12], exc)
                return RuleSet(rules.version, rules.rules, str(self.path), rules.warnings, rules.digest)
        self.usable = False
        self.problem = f"{self.path} refused and no last good rules kept: {_first(exc)}"
        log.error("rules %s: refused and no last good rules to start with; NOT READY until the file "
                  "is fixed: %s", self.path, exc)
        return RuleSet(1, (), str(self.path))

    def _keep(self) -> None:
        if self._last_good is not None:
            self._last_good.save(self.path, self._current.digest)

    @property
    def current(self) -> RuleSet:
        """The rules in force (one attribute read: safe from any thread)."""
        return self._current

    def reload(self) -> bool:
        """Re-read the file; ``True`` if new rules are in force, ``False`` if the old ones were kept."""
        with self._lock:
            return self._reload_locked()

    def _reload_locked(self) -> bool:
        self._hup_pending = False
        # Record the file's state before reading: a change during the read is seen next time.
        self._signature = _signature(self.path)
        self._checked_at = self._clock()
        try:
            rules = self._load(self.path)
        except RulesError as exc:
            log.error("rules %s: reload failed, keeping %d previous rule(s): %s",
                      self.path, len(self._current.rules), exc)
            if self.usable:
                self.problem = f"{self.path} refused ({_first(exc)}); the previous rules stay in force"
            return False
        for warning in rules.warnings:
            log.warning("rules %s: %s", self.path, warning)
        self._current = rules
        self.usable, self.problem = True, None
        self._keep()
        log.info("rules %s: reloaded %d rule(s) (digest %s)", self.path, len(rules.rules), rules.digest[:12])
        return True

    def maybe_reload(self) -> bool:
        """Reload if the file changed (or a SIGHUP is pending); cheap enough to call per request."""
        if not self._hup_pending and self._clock() - self._checked_at < self._interval:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # another thread is reloading right now
        try:
            if self._hup_pending:
                return self._reload_locked()
            self._checked_at = self._clock()
            if _signature(self.path) == self._signature:
                return False
            return self._reload_locked()
        finally:
            self._lock.release()

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of the main thread, possibly inside a reload
        # holding the lock: never block here, leave the reload to the next maybe_reload instead.
        self._hup_pending = True
        if self._lock.acquire(blocking=False):
            try:
                self._reload_locked()
            finally:
                self._lock.release()

    def install_sighup(self) -> bool:
        """Make SIGHUP reload the rules; only possible from the main thread (else a no-op, ``False``)."""
        hup = getattr(signal, "SIGHUP", None)
        if hup is None or threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(hup, self._on_sighup)
        log.debug("rules %s: SIGHUP reloads them (pid %d)", self.path, os.getpid())
        return True
