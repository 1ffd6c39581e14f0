"""The settings every process shares (the workers' part, which the receiver's ``Settings`` holds as
``.workers``), read from the environment in one place: this module and ``receiver.settings`` are the
only readers of ``os.environ`` (``tests/test_settings_environ.py``).

Names follow cvat-sdk and cvat-cli where they exist (``CVAT_URL``, ``CVAT_ACCESS_TOKEN``), and AWS's
usual variables for S3 (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...), read by boto3 itself.
Everything of our own is ``CVAT_HOOKS_*``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = "var"
DEFAULT_RETENTION_DAYS = 30
"""Days a delivery record is kept."""
DEFAULT_MAX_RSS_MB = 512
"""A child of the split worker starts at about 60-70 MB of RSS, most of it pages shared with its
parent, which preloaded cvat-sdk and boto3; an export adds a few MB (bench/). A child past 512 MB
holds memory some action left behind. The Kubernetes manifest limits the whole worker to 1 GiB."""
DEFAULT_LIGHT_PROCESSES = 2
"""Light children of a split worker. With one, a notification to a slow host holds up every label
check and job update behind it, and a host slower than usual leaves the one child behind at 100
events/s (bench/latency.py: p99 60-400 ms in slow minutes, 9-23 ms with two). A second child costs
about 9 MB of private memory at start: it shares the parent's preloaded pages."""


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class SettingError(ValueError):
    """One environment variable holds a value no setting can come from. The message starts with the
    variable's name and says what it must be; the value is shown (cut short) only for settings that
    hold no secret."""

    def __init__(self, variable: str, rule: str, raw: str) -> None:
        self.variable = variable
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        super().__init__(f"{variable} must be {rule}, not {shown!r}")


def switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A yes/no switch: a word that is neither (a typo of ``true`` turning TLS checks off) is refused."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    word = raw.strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise SettingError(name, f"one of {', '.join(TRUE_WORDS)} or {', '.join(FALSE_WORDS)}", raw)
    return word in TRUE_WORDS


def whole_number(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0,
                 what: str = "a whole number") -> int:
    """A whole number of at least ``minimum`` (``default`` when unset or empty)."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise SettingError(name, f"{what} of at least {minimum}", raw)
    return value


def number(env: Mapping[str, str], name: str, default: float, *, zero: bool = False,
           what: str = "a number") -> float:
    """A finite number above 0 (or 0 too, with ``zero``: where 0 turns a thing off)."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise SettingError(name, f"{what} {'of at least 0' if zero else 'above 0'}", raw)
    return value


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    """A count of processes: a whole number of at least 1."""
    return whole_number(env, name, default, minimum=1)


def _username(env: Mapping[str, str], name: str) -> str | None:
    """One CVAT username (Django's rule: letters, digits and ``@.+-_``)."""
    raw = (env.get(name) or "").strip()
    if raw and not re.fullmatch(r"[\w.@+-]{1,150}", raw):
        raise SettingError(name, "one CVAT username (letters, digits, @ . + - _)", raw)
    return raw or None


def comma_list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def run_dirs(env: Mapping[str, str] | None = None) -> tuple[Path, ...] | None:
    """``CVAT_HOOKS_RUN_DIRS`` (``os.pathsep``-separated absolute directories, symlinks resolved), or
    ``None`` when unset: the receiver then cannot tell at load whether a ``run`` command may run."""
    env = os.environ if env is None else env
    raw = env.get("CVAT_HOOKS_RUN_DIRS")
    if raw is None or not raw.strip():
        return None
    dirs = []
    for item in raw.split(os.pathsep):
        if not item.strip():
            continue
        path = Path(item.strip())
        if not path.is_absolute():
            raise SettingError("CVAT_HOOKS_RUN_DIRS", "a list of absolute directories", item.strip())
        dirs.append(path.resolve())
    return tuple(dirs)


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
    service_account: str | None = None
    """The CVAT username the workers act as (``CVAT_HOOKS_SERVICE_ACCOUNT``, else ``CVAT_USERNAME``):
    events it caused do not re-fire the rule whose action caused them. ``None`` with a token: the
    workers ask CVAT at start and leave it in Redis (``core.service_account``)."""

    @property
    def configured(self) -> bool:
        return bool(self.url and (self.access_token or (self.username and self.password)))

    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in logs or records."""
        return tuple(s for s in (self.access_token, self.password) if s)


@dataclass(frozen=True)
class Recycle:
    """Limits after which an in-process worker ends after its current job, to be replaced by a fresh
    process. Memory an action leaves behind (a leak in an export library, or pages Python's allocator
    keeps after a large export) would otherwise stay with the long-lived child that runs every action
    of its queue; the forking worker got that for free from a new work-horse per job."""

    max_rss_mb: int = DEFAULT_MAX_RSS_MB
    """Resident memory after a job above which the process is replaced (0: never)."""
    max_jobs: int = 0
    """Jobs after which the process is replaced (0: never)."""

    def due(self, jobs_done: int, rss_bytes: int) -> str | None:
        """Why the process should be replaced now, or ``None``."""
        if self.max_rss_mb and rss_bytes > self.max_rss_mb * 1024 * 1024:
            return f"RSS {rss_bytes / 1024 / 1024:.0f} MB over CVAT_HOOKS_WORKER_MAX_RSS_MB={self.max_rss_mb}"
        if self.max_jobs and jobs_done >= self.max_jobs:
            return f"{jobs_done} jobs done (CVAT_HOOKS_WORKER_MAX_JOBS={self.max_jobs})"
        return None


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
    run_dirs: tuple[Path, ...] = ()
    """``CVAT_HOOKS_RUN_DIRS``: the only directories whose executables the ``run`` action may start
    (resolved; none: ``run`` starts nothing)."""
    maintenance_seconds: int = 30
    """Seconds between two rounds of RQ maintenance in a worker, idle or not: retrying the jobs of
    workers that died (once RQ deems them abandoned) and taking over the scheduler (delayed retries)
    from a dead worker's. RQ's default of 10 minutes left delayed retries stalled that long after a
    worker was killed and restarted (issue 6)."""
    recycle: Recycle = field(default_factory=Recycle)
    """When a child of the default ``split`` worker is replaced by a fresh one (``workers.supervisor``)."""
    protected_files: tuple[Path, ...] = ()
    """Files of the service outside the data directory that no export may replace: the secrets file
    (``CVAT_HOOKS_SECRET_FILE``) and the rules file (``CVAT_HOOKS_RULES``)."""
    light_processes: int = DEFAULT_LIGHT_PROCESSES
    """Children of the default ``split`` worker that run light actions. Each runs one action at a
    time, and light actions mostly wait on CVAT or a notified host: more children run more of them
    at once, sharing the parent's preloaded pages, where another container would load its own."""

    aws_environment: tuple[tuple[str, str], ...] | None = field(default=None, repr=False, compare=False)
    """The ``AWS_*`` variables boto3 reads itself (endpoint, credentials, region, files) as read at
    start, sorted: the process's shared S3 client is made under them (``workers.storage``), and a
    worker's start warms one up only when there are some. ``None`` (settings not read from an
    environment): every ``Storage`` makes an S3 client of its own, since nothing says which
    environment a shared one would have been made under."""
    environment: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    """The process environment as read at start: where ``${NAME}`` references in rules come from
    (``core.rule_secrets``)."""

    def rule_secret(self, name: str) -> str | None:
        """The value a rule's ``${name}`` stands for (``None`` when unset or empty)."""
        return self.environment.get(name) or None

    @property
    def retention_seconds(self) -> int:
        return self.retention_days * 86400

    def secrets(self) -> tuple[str, ...]:
        return self.cvat.secrets()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read the ``CVAT_HOOKS_*``, ``CVAT_*`` variables; a bad value raises :class:`SettingError`
        naming its variable (the first one found)."""
        env = os.environ if env is None else env
        data_dir = Path(env.get("CVAT_HOOKS_DATA_DIR") or DEFAULT_DATA_DIR)
        return cls(
            redis_url=env.get("CVAT_HOOKS_REDIS_URL") or None,
            data_dir=data_dir,
            storage_roots=tuple(Path(p) for p in comma_list(env.get("CVAT_HOOKS_STORAGE_ROOTS"))),
            retention_days=whole_number(env, "CVAT_HOOKS_RETENTION_DAYS", DEFAULT_RETENTION_DAYS, minimum=1,
                                        what="a whole number of days"),
            cvat=CvatSettings(
                url=env.get("CVAT_URL") or None,
                access_token=env.get("CVAT_ACCESS_TOKEN") or None,
                username=env.get("CVAT_USERNAME") or None,
                password=env.get("CVAT_PASSWORD") or None,
                organization=env.get("CVAT_ORG") or env.get("CVAT_HOOKS_CVAT_ORG") or None,
                verify_tls=switch(env, "CVAT_HOOKS_CVAT_VERIFY_TLS", True),
                status_check_period=number(env, "CVAT_HOOKS_CVAT_POLL_SECONDS", 0.5, what="a number of seconds"),
                service_account=(_username(env, "CVAT_HOOKS_SERVICE_ACCOUNT")
                                 or (env.get("CVAT_USERNAME") or "").strip() or None),
            ),
            notify_allowed_hosts=comma_list(env.get("CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS")),
            notify_timeout=number(env, "CVAT_HOOKS_NOTIFY_TIMEOUT", 10.0, what="a number of seconds"),
            run_dirs=run_dirs(env) or (),
            maintenance_seconds=whole_number(env, "CVAT_HOOKS_WORKER_MAINTENANCE_SECONDS", 30, minimum=1,
                                             what="a whole number of seconds"),
            recycle=Recycle(max_rss_mb=whole_number(env, "CVAT_HOOKS_WORKER_MAX_RSS_MB", DEFAULT_MAX_RSS_MB,
                                                    what="a whole number of megabytes"),
                            max_jobs=whole_number(env, "CVAT_HOOKS_WORKER_MAX_JOBS", 0)),
            light_processes=_positive(env, "CVAT_HOOKS_LIGHT_PROCESSES", DEFAULT_LIGHT_PROCESSES),
            environment=dict(env),
            aws_environment=tuple(sorted((k, v) for k, v in env.items() if k.startswith("AWS_"))),
            protected_files=tuple(Path(p) for p in (env.get("CVAT_HOOKS_SECRET_FILE"),
                                                    env.get("CVAT_HOOKS_RULES") or "rules.yaml") if p),
        )


_process_settings: WorkerSettings | None = None


def use_process_settings(settings: WorkerSettings | None) -> None:
    """Hand the settings a process parsed at its start (``cvat-hooks worker``) to everything that
    later asks :func:`process_settings` in it and in the processes it forks, so a worker reads its
    environment once. ``None`` forgets them."""
    global _process_settings
    _process_settings = settings


def process_settings() -> WorkerSettings:
    """This process's worker settings: those its start handed over, else the environment's, read now
    (a worker started without ``cvat-hooks worker``, e.g. by a test or a benchmark)."""
    return _process_settings if _process_settings is not None else WorkerSettings.from_env()
