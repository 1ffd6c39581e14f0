"""Receiver configuration, read from ``CVAT_HOOKS_*`` environment variables in one place."""

from __future__ import annotations

import logging
import os
import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from core.settings import SettingError, WorkerSettings, comma_list, number, switch, whole_number
from core.settings import use_process_settings as core_use_process_settings
from receiver.secrets_store import add_secret, read_secrets, take_in_legacy

DEFAULT_MAX_BODY = 1024 * 1024
"""Bytes: the largest body accepted (413 above). CVAT's largest payloads are a few KB."""
DEFAULT_BODY_SECONDS = 10.0
"""Seconds a client may take to send a body once its headers arrived (CVAT sends a few KB at once)."""
DEFAULT_DEDUPE_DAYS = 7
"""Days a delivery id is remembered; CVAT retries a failed delivery for about 4 days."""
DEFAULT_STATE_DAYS = 90
"""Days the last-seen state of a project, task or job is kept after its last event."""
LEGACY_TRIAL_SECRET_FILE = "webhook-secret"
"""Where the trial kept its secret before it joined the store: moved into it at the next trial start."""
SECRETS_FILE = "webhook-secrets"
"""Name of the file in the data directory where ``cvat-hooks register`` appends webhook secrets, and
the trial keeps the one it generates (unless ``CVAT_HOOKS_SECRET_FILE`` names another file); receivers
always read it too."""
CVAT_MISSING = ("CVAT_URL is not set (with CVAT_ACCESS_TOKEN, or CVAT_USERNAME and CVAT_PASSWORD): "
                "deliveries are received and recorded, but every action that calls CVAT will fail "
                "permanently")
"""What ``serve``, ``worker`` and ``/readyz`` say when the workers cannot reach CVAT."""
DEFAULT_RECONCILE_MINUTES = 5
"""Minutes between two periodic ``reconcile`` runs on the workers' scheduler (0: never)."""

log = logging.getLogger(__name__)


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices``, in any case (``default`` when unset or empty)."""
    raw = env.get(name) or ""
    word = raw.strip().lower() or default
    if word not in choices:
        raise SettingError(name, f"one of {', '.join(choices)}", raw)
    return word


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
    body_seconds: float = DEFAULT_BODY_SECONDS
    """``CVAT_HOOKS_BODY_SECONDS``: a body not received by then is cut off (408), freeing the thread."""
    dedupe_seconds: int = DEFAULT_DEDUPE_DAYS * 86400
    state_seconds: int = DEFAULT_STATE_DAYS * 86400
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    journal_max_bytes: int = 256 * 1024 * 1024
    """Bytes of deliveries kept on local disk while Redis is unreachable (503 beyond that)."""
    admin_token: str | None = field(default=None, repr=False)
    log_format: str = "text"
    """``CVAT_HOOKS_LOG_FORMAT``: ``text`` or ``json`` (``core.logs``)."""
    log_level: str = "info"
    """``CVAT_HOOKS_LOG_LEVEL``: ``debug`` also shows RQ's registry maintenance every 30 s."""
    secret_file: Path | None = None
    """``CVAT_HOOKS_SECRET_FILE``: where ``register`` appends secrets (``None``: the data directory's)."""
    reconcile_minutes: float = DEFAULT_RECONCILE_MINUTES
    """``CVAT_HOOKS_RECONCILE_MINUTES``: period of the workers' reconcile run; 0 disables it."""

    def __post_init__(self) -> None:
        """With a secret, the insecure flag is void: it may only admit unsigned deliveries when there
        is nothing to check them against (security issue, item 9)."""
        if self.secrets and self.insecure_no_signature:
            object.__setattr__(self, "insecure_no_signature", False)
            object.__setattr__(self, "insecure_flag_ignored", True)

    insecure_flag_ignored: bool = field(default=False, init=False, repr=False, compare=False)
    """The insecure flag was set but voided by a configured secret (logged at start)."""

    @property
    def redis_url(self) -> str | None:
        return self.workers.redis_url

    @property
    def data_dir(self) -> Path:
        return self.workers.data_dir

    @property
    def registered_secrets_file(self) -> Path:
        """The file ``cvat-hooks register`` appends new secrets to."""
        return self.secret_file or self.data_dir / SECRETS_FILE

    @property
    def secret_files(self) -> tuple[Path, ...]:
        """Files of secrets a running receiver re-reads: ``CVAT_HOOKS_SECRET_FILE`` and, always, the
        data directory's ``webhook-secrets`` (so a receiver started with another file, as the trial
        does, still accepts what ``register`` wrote with the defaults)."""
        return tuple(dict.fromkeys((self.registered_secrets_file, self.data_dir / SECRETS_FILE)))

    def sensitive_values(self) -> tuple[str, ...]:
        """Every value that must never appear in a log line, a record or an answer."""
        values = (*self.secrets, *(v for v in (self.admin_token,) if v), *self.workers.secrets())
        return tuple(v for v in values if v)

    def require_secret(self) -> None:
        """Refuse to start without a secret, unless insecure mode was asked for explicitly (and say so:
        the flag is logged as a warning at every start)."""
        if self.insecure_no_signature or self.insecure_flag_ignored:
            log.warning("CVAT_HOOKS_INSECURE_NO_SIGNATURE is set: %s", "a webhook secret is configured, so "
                        "every delivery must still carry a valid signature" if self.secrets else
                        "unsigned deliveries are accepted while no webhook secret exists (never in production)")
        if self.admin_token:
            from receiver.admin.auth import disabled_reason

            if reason := disabled_reason(self):
                log.warning("%s", reason)
        if not self.secrets and not self.insecure_no_signature:
            raise ConfigError(
                "no webhook secret configured: set CVAT_HOOKS_SECRET to the secret entered in CVAT's "
                "webhook form (or CVAT_HOOKS_INSECURE_NO_SIGNATURE=1 for local experiments only)"
            )

    @property
    def cvat_problem(self) -> str | None:
        """Why actions that call CVAT cannot succeed, or ``None`` when CVAT is configured."""
        return None if self.workers.cvat.configured else CVAT_MISSING

    def with_trial_secret(self) -> tuple[Settings, bool]:
        """For the trial run: a secret in the store (``registered_secrets_file``, where ``register``
        writes too), generated there once, so ``doctor``, ``send`` and every receiver find it.

        A secret an older trial kept in ``<data dir>/webhook-secret`` moves into the store first.
        Returns the settings and whether the secret was generated now (so it can be printed).
        """
        store = self.registered_secrets_file
        moved = take_in_legacy(self.data_dir / LEGACY_TRIAL_SECRET_FILE, store)
        if moved:
            log.info("secrets: moved the trial secret from %s into %s", LEGACY_TRIAL_SECRET_FILE, store)
        created = False
        if not self.secrets and not moved:
            add_secret(store, _secrets.token_urlsafe(32), "trial secret generated by cvat-hooks serve")
            created = True
        secrets = tuple(dict.fromkeys((*self.secrets, *read_secrets(self.secret_files))))
        return replace(self, secrets=secrets), created

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the environment (``CVAT_HOOKS_SECRET`` is a comma list for rotation); a bad value
        raises :class:`core.settings.SettingError` naming its variable (the first one found)."""
        env = os.environ if env is None else env
        workers = WorkerSettings.from_env(env)
        secret_file = Path(env["CVAT_HOOKS_SECRET_FILE"]) if env.get("CVAT_HOOKS_SECRET_FILE") else None
        default_file = workers.data_dir / SECRETS_FILE
        files = dict.fromkeys((secret_file or default_file, default_file))
        secrets = tuple(dict.fromkeys((*comma_list(env.get("CVAT_HOOKS_SECRET")), *read_secrets(files))))
        return cls(
            secrets=secrets,
            secret_file=secret_file,
            reconcile_minutes=number(env, "CVAT_HOOKS_RECONCILE_MINUTES", DEFAULT_RECONCILE_MINUTES, zero=True,
                                     what="a number of minutes"),
            insecure_no_signature=switch(env, "CVAT_HOOKS_INSECURE_NO_SIGNATURE", False),
            rules_path=Path(env.get("CVAT_HOOKS_RULES") or "rules.yaml"),
            max_body=whole_number(env, "CVAT_HOOKS_MAX_BODY", DEFAULT_MAX_BODY, minimum=1,
                                  what="a whole number of bytes"),
            body_seconds=number(env, "CVAT_HOOKS_BODY_SECONDS", DEFAULT_BODY_SECONDS, what="a number of seconds"),
            dedupe_seconds=_days(env, "CVAT_HOOKS_DEDUPE_DAYS", DEFAULT_DEDUPE_DAYS),
            state_seconds=_days(env, "CVAT_HOOKS_STATE_DAYS", DEFAULT_STATE_DAYS),
            workers=workers,
            journal_max_bytes=whole_number(env, "CVAT_HOOKS_JOURNAL_MAX_BYTES", 256 * 1024 * 1024,
                                           what="a whole number of bytes"),
            admin_token=env.get("CVAT_HOOKS_ADMIN_TOKEN") or None,
            log_format=_choice(env, "CVAT_HOOKS_LOG_FORMAT", LOG_FORMATS, "text"),
            log_level=_choice(env, "CVAT_HOOKS_LOG_LEVEL", LOG_LEVELS, "info"),
        )


def _days(env: Mapping[str, str], name: str, default: int) -> int:
    """A number of days (fractions allowed) as whole seconds, at least one."""
    days = number(env, name, default, what="a number of days")
    if days * 86400 < 1:
        raise SettingError(name, "a number of days of at least one second", env.get(name) or "")
    return int(days * 86400)


_process_settings: Settings | None = None


def use_process_settings(settings: Settings | None) -> None:
    """Hand the settings a process parsed at its start to everything that later asks
    :func:`process_settings` in it and in the processes it forks (the worker part to
    ``core.settings.process_settings`` too), so a process reads its environment once. ``None``
    forgets them."""
    global _process_settings
    _process_settings = settings
    core_use_process_settings(None if settings is None else settings.workers)


def process_settings() -> Settings:
    """This process's settings: those its start handed over (``cvat-hooks worker``, gunicorn's
    logger set-up), else the environment's, read now."""
    return _process_settings if _process_settings is not None else Settings.from_env()
