"""Hold the current rules and reload them on change, never replacing good rules with bad ones.

The first load raises (a service started with a broken ``rules.yaml`` must fail loudly); a later
reload that fails is logged and the previous rules stay in force, as adnanh/webhook does. A
change is noticed when it happens by :meth:`RuleStore.watch`'s thread (one
per process: each gunicorn worker holds its own rules), which ``stat``\\ s the file once a second
(mtime, size, inode: an edit in place, a rename over it, a Kubernetes ConfigMap's symlink swap) and
reloads when that changes; the new bytes' SHA-256 tells a real change from a ``touch``.
:meth:`RuleStore.maybe_reload`, called per request, does the same check (at most once a second) for
a process whose thread did not survive a fork.

Both outcomes are logged as they happen: a good reload at INFO with its version (the first 12 hex
digits of the file's SHA-256) and rule count, a refused one at ERROR with the loader's
``file:line: problem`` list. With several gunicorn workers every worker reloads, but only the first
to claim the change in Redis (``SET NX``, see :data:`ANNOUNCED_KEY`) logs it at that level; the
others log it at DEBUG. :meth:`RuleStore.status` is what ``/readyz``, ``/api/rules``, the UI and
``/metrics`` show: the version in force and the last refused edit, until a good reload clears it.

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
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.keys import RULES_ANNOUNCED_KEY as ANNOUNCED_KEY
from core.keys import RULES_LAST_GOOD_KEY
from receiver.rules.loader import load_rules
from receiver.rules.model import RulesError, RuleSet

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0
"""Seconds between two ``stat`` calls of the rules file by :meth:`RuleStore.maybe_reload`."""

ANNOUNCED_SECONDS = 120
"""Seconds a claim under :data:`ANNOUNCED_KEY` lives (one process logs a reload outcome at INFO/ERROR
level; the outcome, the file's digest and its mtime end the key, so a later edit back to the same
text is announced again): far longer than the workers of one host take to notice the same change."""

Signature = tuple[int, int, int] | None
"""``(mtime_ns, size, inode)`` of the file, or ``None`` when it cannot be read."""


class LastGoodRules:
    """The last rules text that loaded, on the data volume and (best effort) in Redis for new pods."""

    KEY = RULES_LAST_GOOD_KEY
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


def _file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes (``""`` when it cannot be read): names a refused version."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


@dataclass(frozen=True)
class ReloadError:
    """The last refused edit of the rules file, shown until a good reload clears it."""

    message: str
    """The loader's problems, one ``file:line: ...`` per line."""
    at: float
    """When it was refused (seconds since the epoch)."""
    digest: str
    """SHA-256 of the refused file's bytes (``""``: the file could not be read)."""

    def to_json(self) -> dict[str, Any]:
        """As ``/readyz`` and ``/api/rules`` show it."""
        return {"message": self.message, "at": _iso(self.at), "digest": self.digest[:12] or None}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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
        self._last_good = last_good
        self._shared = last_good.redis if last_good is not None else None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.loaded_at = time.time()
        """When the rules in force were loaded (seconds since the epoch)."""
        self.last_error: ReloadError | None = None
        """The last refused edit, until a good reload (``None``: the file in place is the one in force)."""
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
            self.last_error = ReloadError(str(exc), time.time(), _file_digest(self.path))
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
                digest = self.last_error.digest if self.last_error else ""
                log.log(logging.ERROR if self._claim("refused", digest) else logging.DEBUG,
                        "rules %s: refused, starting with the last good rules (%d rule(s), version %s): %s",
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

    def _reload_locked(self) -> bool:
        """Re-read the file; ``True`` if new rules are in force, ``False`` if the old ones were kept."""
        # Record the file's state before reading: a change during the read is seen next time.
        self._signature = _signature(self.path)
        self._checked_at = self._clock()
        previous = self._current
        try:
            rules = self._load(self.path)
        except RulesError as exc:
            refused = ReloadError(str(exc), time.time(), _file_digest(self.path))
            if self.last_error is None or self.last_error.digest != refused.digest or not refused.digest:
                level = logging.ERROR if self._claim("refused", refused.digest) else logging.DEBUG
                log.log(level, "rules %s: reload failed, keeping %d previous rule(s) (version %s): %s",
                        self.path, len(previous.rules), previous.digest[:12], exc)
            self.last_error = refused
            if self.usable:
                self.problem = f"{self.path} refused ({_first(exc)}); the previous rules stay in force"
            return False
        for warning in rules.warnings:
            log.warning("rules %s: %s", self.path, warning)
        changed = rules.digest != previous.digest or self.last_error is not None or not self.usable
        self._current = rules
        self.usable, self.problem, self.last_error = True, None, None
        self.loaded_at = time.time()
        self._keep()
        level = logging.INFO if changed and self._claim("loaded", rules.digest) else logging.DEBUG
        log.log(level, "rules %s: reloaded: version %s, %d rule(s) (was version %s, %d rule(s))", self.path,
                rules.digest[:12], len(rules.rules), previous.digest[:12], len(previous.rules))
        return True

    def _claim(self, outcome: str, digest: str) -> bool:
        """Whether this process is the one to log this reload outcome at INFO/ERROR level (the first
        gunicorn worker to notice it); without Redis every process is."""
        if self._shared is None:
            return True
        sig = self._signature
        key = f"{ANNOUNCED_KEY}{outcome}:{digest[:16]}:{sig[0] if sig else 0}"
        try:
            return bool(self._shared.set(key, os.getpid(), nx=True, ex=ANNOUNCED_SECONDS))
        except Exception:  # Redis down: better twice than never
            return True

    def status(self) -> dict[str, Any]:
        """The rules in force and the last refused edit: what ``/readyz``, ``/api/rules``, the UI and
        ``/metrics`` show."""
        rules = self._current
        return {
            "source": str(self.path),
            "version": rules.digest[:12] or None,
            "digest": rules.digest or None,
            "rule_count": len(rules.rules),
            "loaded_at": _iso(self.loaded_at),
            "usable": self.usable,
            "reload_failed": self.last_error is not None,
            "last_reload_error": self.last_error.to_json() if self.last_error else None,
            "problem": self.problem,
        }

    def maybe_reload(self) -> bool:
        """Reload if the file changed; cheap enough to call per request."""
        if self._clock() - self._checked_at < self._interval:
            return False
        return self.check()

    def check(self) -> bool:
        """Reload now if the file changed since the last look."""
        if not self._lock.acquire(blocking=False):
            return False  # another thread is reloading right now
        try:
            self._checked_at = self._clock()
            if _signature(self.path) == self._signature:
                return False
            return self._reload_locked()
        finally:
            self._lock.release()

    def watch(self, interval: float = CHECK_INTERVAL) -> threading.Thread:
        """Check the file every ``interval`` seconds in a daemon thread of this process, so an edit
        is applied (or refused) and logged when it happens, not at the next delivery."""
        if self._watcher is not None and self._watcher.is_alive():
            return self._watcher
        self._stop.clear()
        # The thread holds the store weakly: a store nobody uses any more (an app built by a test)
        # is collected and its thread ends instead of polling forever.
        store, stop, path = weakref.ref(self), self._stop, self.path

        def loop() -> None:
            while not stop.wait(interval):
                current = store()
                if current is None:
                    return
                try:
                    current.check()
                except Exception:  # never let the watcher die: the next look may work
                    log.exception("rules %s: checking the file failed", path)
                del current

        self._watcher = threading.Thread(target=loop, name="rules-watcher", daemon=True)
        self._watcher.start()
        log.debug("rules %s: watching for changes every %.1f s (pid %d)", self.path, interval, os.getpid())
        return self._watcher

    def stop_watching(self) -> None:
        """End the watcher thread (tests; a process that exits needs not)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        self._watcher = None
