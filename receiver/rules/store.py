"""Hold the current rules and reload them on change, never replacing good rules with bad ones.

The first load raises (a service started with a broken ``rules.yaml`` must fail loudly); a later
reload that fails is logged and the previous rules stay in force, as adnanh/webhook does. A
reload is triggered by SIGHUP or noticed by :meth:`RuleStore.maybe_reload`, which the receiver
calls per request: it only ``stat``\\ s the file, at most once a second.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from receiver.rules.loader import load_rules
from receiver.rules.model import RulesError, RuleSet

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0
"""Seconds between two ``stat`` calls of the rules file by :meth:`RuleStore.maybe_reload`."""

Signature = tuple[int, int, int] | None
"""``(mtime_ns, size, inode)`` of the file, or ``None`` when it cannot be read."""


def _signature(path: Path) -> Signature:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class RuleStore:
    """The receiver's current :class:`RuleSet`, swapped atomically on a successful reload."""

    def __init__(self, path: str | Path, *, loader: Callable[[Path], RuleSet] = load_rules,
                 clock: Callable[[], float] = time.monotonic, check_interval: float = CHECK_INTERVAL) -> None:
        """Load the rules now; raises :class:`RulesError` if they are unusable."""
        self.path = Path(path)
        self._load = loader
        self._clock = clock
        self._interval = check_interval
        self._lock = threading.Lock()
        self._hup_pending = False
        self._signature = _signature(self.path)
        self._current = self._load(self.path)
        self._checked_at = clock()
        log.info("rules %s: loaded %d rule(s) (digest %s)", self.path, len(self._current.rules),
                 self._current.digest[:12])

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
            return False
        for warning in rules.warnings:
            log.warning("rules %s: %s", self.path, warning)
        self._current = rules
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
