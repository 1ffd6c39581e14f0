"""Connect to Redis from a URL: ``redis://``, ``rediss://`` (TLS), ``unix://``, or Sentinel.

Sentinel URLs look like ``redis+sentinel://[:password@]host1:26379,host2:26379/<master>[/<db>]``;
the connection follows the current master after a failover.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from redis import Redis
from redis.exceptions import RedisError, ResponseError
from redis.sentinel import Sentinel

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SOCKET_TIMEOUT = 5.0
"""Seconds a Redis call may take before the receiver answers 503 instead of hanging CVAT's sender."""


class RedisConfigError(ValueError):
    """The Redis URL cannot be used."""


def connect(url: str | None, *, socket_timeout: float = SOCKET_TIMEOUT) -> Redis:
    """A client for ``url`` (raises :class:`RedisConfigError` for ``None`` or a bad URL)."""
    if not url:
        raise RedisConfigError("no Redis configured: set CVAT_HOOKS_REDIS_URL (or use `cvat-hooks serve`, "
                               "which starts an embedded Redis)")
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        hosts = []
        for item in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = item.partition(":")
            hosts.append((host, int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise RedisConfigError("a Sentinel URL needs the master name: redis+sentinel://host:26379/mymaster")
        db = int(path[1]) if len(path) > 1 else 0
        password = unquote(parts.password) if parts.password else None
        sentinel = Sentinel(hosts, socket_timeout=socket_timeout,
                            ssl=parts.scheme.startswith("rediss"), password=password)
        return sentinel.master_for(path[0], db=db, password=password, socket_timeout=socket_timeout)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise RedisConfigError(f"unsupported Redis URL scheme {parts.scheme!r} "
                               "(redis://, rediss://, unix:// or redis+sentinel://)")
    return Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                          health_check_interval=30)


# -- can this Redis lose what we acknowledged? ---------------------------------------------------

FIX_EVICTION = ("CONFIG SET maxmemory-policy noeviction (and `maxmemory-policy noeviction` in redis.conf, "
                "or `--maxmemory-policy noeviction`)")
FIX_PERSISTENCE = ("CONFIG SET appendonly yes (and `appendonly yes` in redis.conf, or `--appendonly yes`; "
                   "`appendfsync everysec` or `always`)")
DURABILITY_CHECK_SECONDS = 60.0
"""Seconds a durability verdict is reused: ``/readyz`` never adds a Redis round trip per delivery."""


@dataclass(frozen=True)
class Durability:
    """What Redis says about keeping our data: ``None`` fields could not be checked.

    Any evicting ``maxmemory-policy`` (every policy but ``noeviction``) can drop queued jobs and the
    dedupe keys of acknowledged deliveries once memory fills (``volatile-*`` too: dedupe keys expire),
    so it is refused whatever ``maxmemory`` is now. Without AOF or RDB save points a restart loses
    everything: a loud warning, since a cache-only Redis may be a deliberate choice for a trial.
    """

    policy: str | None = None
    aof: bool | None = None
    save: str | None = None
    unchecked: str | None = None
    """Why (part of) the check could not be made, e.g. a managed Redis refusing ``CONFIG GET``."""

    @property
    def evicting(self) -> bool | None:
        return None if self.policy is None else self.policy != "noeviction"

    @property
    def persistent(self) -> bool | None:
        if self.aof or (self.save or "").strip():
            return True
        if self.aof is None or self.save is None:
            return None
        return False

    def eviction_problem(self) -> str | None:
        """Why the receiver is not ready, or ``None``."""
        if self.evicting:
            return (f"maxmemory-policy {self.policy} evicts queued jobs and dedupe keys of acknowledged "
                    f"deliveries: {FIX_EVICTION}")
        return None

    def persistence_problem(self) -> str | None:
        """Why a restart of this Redis would lose acknowledged work, or ``None``."""
        if self.persistent is False:
            return f"no persistence (appendonly no, no RDB save points): a restart loses queued jobs: {FIX_PERSISTENCE}"
        return None


def check_durability(redis: Redis) -> Durability:
    """Ask Redis (``CONFIG GET``, else ``INFO``) how it keeps data; raises only ``ConnectionError``-like
    :class:`RedisError`\\ s of an unreachable server, never for a refused command."""
    try:
        pipe = redis.pipeline(transaction=False)
        for name in ("maxmemory-policy", "appendonly", "save"):
            pipe.config_get(name)
        policy, appendonly, save = pipe.execute()
        return Durability(policy=policy.get("maxmemory-policy"), aof=appendonly.get("appendonly") == "yes",
                          save=save.get("save"))
    except ResponseError as exc:  # managed Redis: CONFIG is often renamed or forbidden
        refused = f"CONFIG GET refused ({exc})"
    try:
        memory, persistence = redis.info("memory"), redis.info("persistence")
    except ResponseError as exc:
        return Durability(unchecked=f"{refused}; INFO refused ({exc})")
    aof = persistence.get("aof_enabled")
    return Durability(policy=memory.get("maxmemory_policy"), aof=None if aof is None else bool(int(aof)),
                      unchecked=f"{refused}; RDB save points unknown")


class DurabilityCheck:
    """:func:`check_durability`, remembered for :data:`DURABILITY_CHECK_SECONDS` (thread-safe enough:
    at worst two threads ask at once)."""

    def __init__(self, redis: Redis, *, seconds: float = DURABILITY_CHECK_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.seconds = seconds
        self._clock = clock
        self._verdict: Durability | None = None
        self._at = 0.0

    def get(self) -> Durability:
        """The cached verdict; an unreachable Redis gives an unchecked one (not cached)."""
        now = self._clock()
        if self._verdict is not None and now - self._at < self.seconds:
            return self._verdict
        try:
            verdict = check_durability(self.redis)
        except RedisError as exc:
            return Durability(unchecked=f"Redis unreachable ({type(exc).__name__})")
        self._verdict, self._at = verdict, now
        return verdict
