"""Connect to Redis from a URL: ``redis://``, ``rediss://`` (TLS), ``unix://``, or Sentinel.

Sentinel URLs look like ``redis+sentinel://[:password@]host1:26379,host2:26379/<master>[/<db>]``;
the connection follows the current master after a failover.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from redis import Redis
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
