"""Learn what CVAT's projects, tasks and jobs look like now, so transitions work from the first event.

CVAT 2.76 and newer (PR #11104) send ``update:*`` without ``before_update`` and ``changes``: the old
state of a resource is then only what the receiver saw last, and a job it never saw has none, so its
first ``became: completed`` could not fire. Installed on a CVAT with existing jobs, cvat-hooks would
miss the first completion of each. So the workers ask CVAT's API what it has now and keep that as the
last-seen state of every resource the receiver holds no state for (``StateStore.learn``): at
``register``, a minute after a worker starts and then on the reconcile schedule; never in the request
path, which must answer CVAT fast.

It stays cheap after the first time: lists are read most recently updated first
(``sort=-updated_date``) and a walk stops below the newest ``updated_date`` the last one saw, less
:data:`OVERLAP`. Once a day (:data:`FULL_EVERY`) it reads everything again, for resources whose state
expired (``CVAT_HOOKS_STATE_DAYS``). A server that ignores ``sort`` is read whole every time.

What the account can see is what is learned: with ``CVAT_ORG`` set, that organization's resources.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from core.keys import STATE_SYNC_KEY as SYNC_KEY
from core.state import StateStore
from workers.gateway import Resource

log = logging.getLogger(__name__)

RESOURCES = (Resource.PROJECT, Resource.TASK, Resource.JOB)
"""What is learned, parents first (a rule on a job often reads its task's state too)."""
OVERLAP = timedelta(minutes=5)
"""How far below the newest ``updated_date`` already learned a walk still reads: CVAT commits an update
before its webhook goes out, and two updates may commit out of ``updated_date`` order."""
FULL_EVERY = 86400.0
"""Seconds between walks through every resource."""
PAGE_SIZE = 100
"""Items asked per page."""
MAX_PAGES = 10_000
"""A guard against a server whose ``next`` never ends."""


class StateGateway(Protocol):
    """What learning needs from CVAT (``workers.cvat_client.CvatClient`` has it)."""

    def newest_first(self, resource: Resource, *, page: int = 1, page_size: int = PAGE_SIZE) -> dict[str, Any]: ...


@dataclass
class Learned:
    """What one walk through one resource type did."""

    resource: str
    read: int = 0
    learned: int = 0
    pages: int = 0
    full: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "learned": self.learned, "pages": self.pages, "full": self.full}


def learn_states(gateway: StateGateway, store: StateStore, *, full: bool = False,
                 now: float | None = None) -> dict[str, dict[str, Any]]:
    """Walk CVAT's projects, tasks and jobs and learn those the receiver has no state for.

    Raises what the gateway raises (``ActionError``): the caller decides whether that fails a
    command or is only logged.
    """
    now = time.time() if now is None else now
    report = {}
    for resource in RESOURCES:
        done = _learn(gateway, store, resource, full=full, now=now)
        report[resource.value] = done.to_json()
        if done.learned:
            log.info("state: learned %d %s(s) from CVAT (%d read, %d page(s)%s)", done.learned, resource.value,
                     done.read, done.pages, ", full walk" if done.full else "")
    return report


def _learn(gateway: StateGateway, store: StateStore, resource: Resource, *, full: bool, now: float) -> Learned:
    key = SYNC_KEY.format(resource=resource.value)
    progress = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                for k, v in store.redis.hgetall(key).items()}
    newest = _date(progress.get("newest"))
    full_at = float(progress.get("full_at") or 0)
    done = Learned(resource.value, full=full or newest is None or now - full_at >= FULL_EVERY)
    horizon = None if done.full or newest is None else newest - OVERLAP
    ordered, last = True, None
    for page in range(1, MAX_PAGES + 1):
        answer = gateway.newest_first(resource, page=page, page_size=PAGE_SIZE) or {}
        items = [item for item in answer.get("results") or [] if isinstance(item, dict)]
        done.pages += 1
        done.read += len(items)
        done.learned += store.learn(resource.value, items)
        dates = [_date(item.get("updated_date")) for item in items]
        for date in dates:
            if date is None or (last is not None and date > last):
                ordered = False  # not newest-first: the horizon cannot end this walk
            last = date if date is not None else last
            if date is not None and (newest is None or date > newest):
                newest = date
        if not answer.get("next"):
            break
        if horizon is not None and ordered and last is not None and last < horizon:
            break
    if newest is not None:
        store.redis.hset(key, "newest", newest.isoformat())
    if done.full:
        store.redis.hset(key, "full_at", repr(now))
    return done


def _date(value: Any) -> datetime | None:
    """CVAT's ``updated_date`` (``2026-11-22T17:39:11.960910Z``) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
