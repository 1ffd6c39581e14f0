"""The webhook secrets file: where ``cvat-hooks register`` keeps secrets, and how receivers re-read it.

Format: one secret a line; blank lines and lines starting with ``#`` are ignored (``register``
writes a ``#`` note above each secret saying which webhook it is for, so an old secret can be
found and deleted after a rotation).

Why receivers re-read it: ``register --rotate-secret`` must add the new secret to every running
receiver *before* CVAT signs with it, without a restart. A receiver checks the files' modification
stamp at most once a second, and again at once whenever a signature does not verify, so a delivery
signed with a secret written a moment ago is never rejected because of the one-second throttle.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from receiver.signature import Verdict, verify

if TYPE_CHECKING:
    from receiver.settings import Settings

CHECK_SECONDS = 1.0
"""Seconds between two checks of the files' modification stamps (on the delivery path)."""
HEADER = "# cvat-hooks webhook secrets: one a line; lines starting with # are notes.\n"


def parse_secrets(text: str) -> tuple[str, ...]:
    """The secrets in a file's text, in order, without notes, blanks or repeats."""
    found: dict[str, None] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            found.setdefault(line, None)
    return tuple(found)


def read_secrets(paths: Iterable[Path]) -> tuple[str, ...]:
    """Every secret of the files that exist (a missing file holds none)."""
    found: dict[str, None] = {}
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        for secret in parse_secrets(text):
            found.setdefault(secret, None)
    return tuple(found)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock next to ``path`` so two ``register`` runs cannot lose a secret."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_secret(path: Path, secret: str, note: str) -> None:
    """Append ``secret`` (with a ``# note`` line above it) to the secrets file, atomically.

    The new content is written to a temporary file of mode 0600 in the same directory, flushed
    to disk and renamed over the old file: a receiver reading it sees the old or the new version,
    never half of one, and a crash leaves the old file whole.
    """
    if not secret or secret != secret.strip() or "\n" in secret or secret.startswith("#"):
        raise ValueError("a webhook secret must be one line, without surrounding spaces or a leading #")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            old = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            old = HEADER
        if old and not old.endswith("\n"):
            old += "\n"
        note = " ".join(note.split())
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(f"{old}# {note}\n{secret}\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def take_in_legacy(old: Path, store: Path) -> tuple[str, ...]:
    """Move the secrets of a file the trial used to keep apart (``var/webhook-secret``) into the
    store, once, and delete that file: the webhook a trial user set up with it keeps working, and
    ``doctor``, ``serve``, ``register`` and ``send`` read one place. Returns the secrets moved."""
    try:
        text = old.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    have = set(read_secrets([store]))
    moved = tuple(s for s in parse_secrets(text) if s not in have)
    for secret in moved:
        add_secret(store, secret, f"trial secret, moved here from {old.name}")
    old.unlink()
    return moved


def _stamp(paths: Sequence[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when a file is rewritten: inode (a rename), size and modification time."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            stamps.append(None)
            continue
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


class SecretStore:
    """The secrets a receiver accepts: fixed ones (``CVAT_HOOKS_SECRET``) plus the files' current lines.

    Thread-safe; one per receiver app. Removing a secret from a file stops accepting it too.
    """

    def __init__(self, secrets: Sequence[str], files: Sequence[Path], *, check_every: float = CHECK_SECONDS,
                 clock: Callable[[], float] = time.monotonic, allow_unsigned: bool = False) -> None:
        self.files = tuple(files)
        self.allow_unsigned = allow_unsigned
        """``CVAT_HOOKS_INSECURE_NO_SIGNATURE``: admit deliveries only while *no* secret exists at all."""
        self.check_every = check_every
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = _stamp(self.files)
        from_files = read_secrets(self.files)
        # ``secrets`` (from Settings) already holds what the files said at startup: keep only the
        # others as fixed, so a secret later deleted from a file is no longer accepted.
        self._fixed = tuple(s for s in secrets if s not in from_files)
        self._current = tuple(dict.fromkeys((*self._fixed, *from_files)))
        self._checked = clock()

    @classmethod
    def for_settings(cls, settings: Settings) -> SecretStore:
        return cls(settings.secrets, settings.secret_files, allow_unsigned=settings.insecure_no_signature)

    def current(self) -> tuple[str, ...]:
        """The accepted secrets, re-reading the files if they changed (checked at most once a second)."""
        if self._clock() - self._checked >= self.check_every:
            self.refresh()
        return self._current

    def refresh(self) -> bool:
        """Check the files now; True if they changed (and were re-read)."""
        with self._lock:
            self._checked = self._clock()
            stamp = _stamp(self.files)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            self._current = tuple(dict.fromkeys((*self._fixed, *read_secrets(self.files))))
            return True

    def verify(self, body: bytes, signature: str | None) -> Verdict:
        """``receiver.signature.verify`` against the accepted secrets; a mismatch re-checks the
        files first (a secret added a moment ago by ``register --rotate-secret``).

        The insecure flag never weakens a configured secret (security issue, item 9): with a secret,
        the signature is always checked; only with none at all (nothing to check against) is a
        delivery let in, and only when the flag asks for it."""
        current = self.current()
        if not current and self.allow_unsigned and not self.refresh():
            return Verdict.VALID
        verdict = verify(body, signature, self._current)
        if verdict is Verdict.MISMATCH and self.refresh():
            verdict = verify(body, signature, self._current)
        return verdict
