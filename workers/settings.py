"""Worker-side configuration, read from the environment in one place.

Names follow cvat-sdk and cvat-cli where they exist (``CVAT_URL``, ``CVAT_ACCESS_TOKEN``), and AWS's
usual variables for S3 (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...), read by boto3 itself.
Everything of our own is ``CVAT_HOOKS_*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = "var"
DEFAULT_RETENTION_DAYS = 30
"""Days a delivery record is kept."""


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


@dataclass(frozen=True)
class CvatSettings:
    """How to reach CVAT. The token and password are never logged or recorded."""

    url: str | None = None
    access_token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    organization: str | None = None
    """Organization slug sent as ``X-Organization``; ``None`` for the personal workspace."""
    verify_tls: bool = True
    status_check_period: float = 0.5
    """Upper bound of the pause between export status checks, in seconds. Polling starts faster and
    backs off to this, so a quick export is not held back by the SDK's 5-second default."""

    @property
    def configured(self) -> bool:
        return bool(self.url and (self.access_token or (self.username and self.password)))

    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in logs or records."""
        return tuple(s for s in (self.access_token, self.password) if s)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker process needs to know."""

    redis_url: str | None = None
    """``redis://``, ``rediss://`` (TLS) or ``unix://``; ``None`` means the embedded Redis."""
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    storage_roots: tuple[Path, ...] = ()
    """Extra absolute directories exports may be written to (the data directory always may)."""
    retention_days: int = DEFAULT_RETENTION_DAYS
    cvat: CvatSettings = field(default_factory=CvatSettings)
    notify_allowed_hosts: tuple[str, ...] = ()
    """If set, ``notify`` may only POST to these hosts (stops rules from reaching internal hosts)."""
    notify_timeout: float = 10.0
    """Seconds a notification POST may take."""
    maintenance_seconds: int = 30
    """Seconds between two rounds of RQ maintenance in a worker, idle or not: retrying the jobs of
    workers that died (once RQ deems them abandoned) and taking over the scheduler (delayed retries)
    from a dead worker's. RQ's default of 10 minutes left delayed retries stalled that long after a
    worker was killed and restarted (issue 6)."""

    @property
    def retention_seconds(self) -> int:
        return self.retention_days * 86400

    def secrets(self) -> tuple[str, ...]:
        return self.cvat.secrets()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read the ``CVAT_HOOKS_*``, ``CVAT_*`` variables."""
        env = os.environ if env is None else env
        data_dir = Path(env.get("CVAT_HOOKS_DATA_DIR") or DEFAULT_DATA_DIR)
        return cls(
            redis_url=env.get("CVAT_HOOKS_REDIS_URL") or None,
            data_dir=data_dir,
            storage_roots=tuple(Path(p) for p in _list(env.get("CVAT_HOOKS_STORAGE_ROOTS"))),
            retention_days=int(env.get("CVAT_HOOKS_RETENTION_DAYS") or DEFAULT_RETENTION_DAYS),
            cvat=CvatSettings(
                url=env.get("CVAT_URL") or None,
                access_token=env.get("CVAT_ACCESS_TOKEN") or None,
                username=env.get("CVAT_USERNAME") or None,
                password=env.get("CVAT_PASSWORD") or None,
                organization=env.get("CVAT_ORG") or env.get("CVAT_HOOKS_CVAT_ORG") or None,
                verify_tls=_bool(env.get("CVAT_HOOKS_CVAT_VERIFY_TLS"), True),
                status_check_period=float(env.get("CVAT_HOOKS_CVAT_POLL_SECONDS") or 0.5),
            ),
            notify_allowed_hosts=_list(env.get("CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS")),
            notify_timeout=float(env.get("CVAT_HOOKS_NOTIFY_TIMEOUT") or 10),
            maintenance_seconds=int(env.get("CVAT_HOOKS_WORKER_MAINTENANCE_SECONDS") or 30),
        )
