"""Receiver configuration, read from ``CVAT_HOOKS_*`` environment variables in one place."""

from __future__ import annotations

import os
import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from workers.settings import WorkerSettings, _bool, _list

DEFAULT_MAX_BODY = 1024 * 1024
"""Bytes: the largest body accepted (413 above). CVAT's largest payloads are a few KB."""
DEFAULT_DEDUPE_DAYS = 7
"""Days a delivery id is remembered; CVAT retries a failed delivery for about 4 days."""
DEFAULT_STATE_DAYS = 90
"""Days the last-seen state of a project, task or job is kept after its last event."""
SECRET_FILE = "webhook-secret"
"""Name of the file in the data directory holding the trial secret the run command generates."""


class ConfigError(RuntimeError):
    """The configuration cannot start a safe receiver; the message says what to set."""


@dataclass(frozen=True)
class Settings:
    """Everything the receiver needs; ``workers`` holds what it shares with the workers."""

    secrets: tuple[str, ...] = field(default=(), repr=False)
    """Accepted webhook secrets (the first is the current one; others are being rotated out)."""
    insecure_no_signature: bool = False
    """Accept unsigned deliveries. For local experiments only; never in production."""
    rules_path: Path = Path("rules.yaml")
    max_body: int = DEFAULT_MAX_BODY
    dedupe_seconds: int = DEFAULT_DEDUPE_DAYS * 86400
    state_seconds: int = DEFAULT_STATE_DAYS * 86400
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    journal_max_bytes: int = 256 * 1024 * 1024
    """Bytes of deliveries kept on local disk while Redis is unreachable (503 beyond that)."""
    admin_token: str | None = field(default=None, repr=False)
    log_format: str = "text"

    @property
    def redis_url(self) -> str | None:
        return self.workers.redis_url

    @property
    def data_dir(self) -> Path:
        return self.workers.data_dir

    def sensitive_values(self) -> tuple[str, ...]:
        """Every value that must never appear in a log line, a record or an answer."""
        values = (*self.secrets, *(v for v in (self.admin_token,) if v), *self.workers.secrets())
        return tuple(v for v in values if v)

    def require_secret(self) -> None:
        """Refuse to start without a secret, unless insecure mode was asked for explicitly."""
        if not self.secrets and not self.insecure_no_signature:
            raise ConfigError(
                "no webhook secret configured: set CVAT_HOOKS_SECRET to the secret entered in CVAT's "
                "webhook form (or CVAT_HOOKS_INSECURE_NO_SIGNATURE=1 for local experiments only)"
            )

    def with_trial_secret(self) -> tuple[Settings, bool]:
        """For the trial run: use the secret kept in the data directory, generating it once.

        Returns the settings and whether the secret was generated now (so it can be printed).
        """
        if self.secrets:
            return self, False
        path = self.data_dir / SECRET_FILE
        created = False
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(_secrets.token_urlsafe(32) + "\n")
            created = True
        secret = path.read_text().strip()
        return replace(self, secrets=(secret,)), created

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the environment (``CVAT_HOOKS_SECRET`` is a comma list for rotation)."""
        env = os.environ if env is None else env
        secrets = _list(env.get("CVAT_HOOKS_SECRET"))
        secret_file = env.get("CVAT_HOOKS_SECRET_FILE")
        if secret_file and Path(secret_file).exists():
            secrets = secrets + _list(Path(secret_file).read_text().replace("\n", ","))
        return cls(
            secrets=secrets,
            insecure_no_signature=_bool(env.get("CVAT_HOOKS_INSECURE_NO_SIGNATURE"), False),
            rules_path=Path(env.get("CVAT_HOOKS_RULES") or "rules.yaml"),
            max_body=int(env.get("CVAT_HOOKS_MAX_BODY") or DEFAULT_MAX_BODY),
            dedupe_seconds=int(float(env.get("CVAT_HOOKS_DEDUPE_DAYS") or DEFAULT_DEDUPE_DAYS) * 86400),
            state_seconds=int(float(env.get("CVAT_HOOKS_STATE_DAYS") or DEFAULT_STATE_DAYS) * 86400),
            workers=WorkerSettings.from_env(env),
            journal_max_bytes=int(env.get("CVAT_HOOKS_JOURNAL_MAX_BYTES") or 256 * 1024 * 1024),
            admin_token=env.get("CVAT_HOOKS_ADMIN_TOKEN") or None,
            log_format=(env.get("CVAT_HOOKS_LOG_FORMAT") or "text").lower(),
        )
