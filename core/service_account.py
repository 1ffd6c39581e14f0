"""Which CVAT user cvat-hooks acts as: its own changes come back as webhooks sent by that user.

Actions change CVAT, and CVAT reports each change to the webhooks with ``sender`` (or, for a
background request, ``request.owner``) set to the user who made it. The receiver needs that user's
name so a rule is not fired again by the change its own action made (``receiver.rules.own_events``).

- ``CVAT_HOOKS_SERVICE_ACCOUNT`` (or ``CVAT_USERNAME``) names it: nothing to ask.
- With a personal access token, the workers ask CVAT when they start (:func:`learn`, ``GET /api/users/self``)
  and leave the answer under :data:`KEY` for the receivers, which may run elsewhere.
- The receivers read it through :class:`ServiceAccount`: the setting first, else :data:`KEY`, kept
  in process for :data:`CACHE_SECONDS` so a delivery costs no Redis round trip for it.

Neither side lets a failure here spread: the account is then unknown, and the guard is off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from redis import Redis
from redis.exceptions import RedisError

from core.keys import SERVICE_ACCOUNT_KEY as KEY

log = logging.getLogger(__name__)

CACHE_SECONDS = 60.0
"""Seconds a receiver keeps the account it read from Redis."""
MISS_SECONDS = 10.0
"""Seconds a receiver keeps "unknown" (no key yet, or Redis failing) before it asks again: the
workers may be starting."""


class CurrentUser(Protocol):
    """What :func:`learn` needs of a gateway (``workers.cvat_client.CvatClient`` has it)."""

    def current_user(self) -> dict[str, Any]: ...


def learn(gateway: CurrentUser, redis: Redis, *, configured: str | None = None) -> str | None:
    """Ask CVAT who the workers are and store the username under :data:`KEY` (the job a worker queues
    when it starts, ``operations.worker_start.learn_now``).

    Returns the username, or ``None`` when CVAT or Redis could not be asked (logged, never raised: a
    worker without it still runs actions, only the loop guard is off until the next start). When a
    configured name (``CVAT_HOOKS_SERVICE_ACCOUNT``/``CVAT_USERNAME``) disagrees with CVAT, that is
    logged: the receivers trust the setting, so events of the real account would not be recognised.
    """
    try:
        user = gateway.current_user()
    except Exception as exc:  # whatever the gateway raises, the worker must still start
        log.warning("service account: could not ask CVAT who the workers are (%s: %s); "
                    "the loop guard stays off unless CVAT_HOOKS_SERVICE_ACCOUNT is set", type(exc).__name__, exc)
        return None
    username = user.get("username") if isinstance(user, dict) else None
    if not isinstance(username, str) or not username:
        log.warning("service account: CVAT's /api/users/self has no username; the loop guard stays off")
        return None
    if configured and configured.casefold() != username.casefold():
        log.warning("service account: configured as %r but the workers act in CVAT as %r; "
                    "set CVAT_HOOKS_SERVICE_ACCOUNT=%s", configured, username, username)
    try:
        redis.set(KEY, username)
    except RedisError as exc:
        log.warning("service account: could not store %r in Redis (%s)", username, exc)
        return None
    log.info("service account: the workers act in CVAT as %r", username)
    return username


def stored(redis: Redis) -> str | None:
    """The username :func:`learn` stored, if any (``RedisError`` passes through)."""
    raw = redis.get(KEY)
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text or None


class ServiceAccount:
    """The receiver's view of the account: the setting if there is one, else :data:`KEY`, cached.

    ``name()`` never raises: a Redis error means "unknown" (``None``) for :data:`MISS_SECONDS`, so a
    failing Redis costs a delivery nothing here (the delivery itself is journaled if need be).
    """

    def __init__(self, configured: str | None, redis: Redis, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.configured = configured
        self._redis = redis
        self._clock = clock
        self._cached: tuple[float, str | None] | None = None
        """``(valid until, name)``; replaced whole, so threads never see half an update."""

    def name(self) -> str | None:
        """The CVAT username cvat-hooks acts as, or ``None`` when it is not known."""
        if self.configured:
            return self.configured
        now = self._clock()
        cached = self._cached
        if cached is not None and now < cached[0]:
            return cached[1]
        try:
            found = stored(self._redis)
        except RedisError as exc:
            log.warning("service account: Redis error reading %s (%s); treated as unknown", KEY, exc)
            found = None
        self._cached = (now + (CACHE_SECONDS if found else MISS_SECONDS), found)
        return found

    @property
    def source(self) -> str:
        """Where :meth:`name` comes from, for people: the setting, or what the workers learned."""
        return "setting" if self.configured else "learned by the workers"
