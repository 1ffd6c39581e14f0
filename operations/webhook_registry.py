"""The webhooks this deployment registered, remembered in its Redis.

Several cvat-hooks deployments may share one CVAT (staging and production, two teams). Each must
reconcile, ping and unregister only its own webhooks: reconciling another deployment's would redeliver
its whole history to it on every run (this deployment's Redis never saw those deliveries), and
``unregister`` would delete it. A URL ending in ``/webhooks/cvat`` or a ``cvat-hooks`` description
cannot tell deployments apart, so ``register`` remembers what it created or adopted here, in the
deployment's Redis (its shared truth: receivers and workers may run on different machines):

* ``cvat-hooks:deployment``: this deployment's id, generated once (``SET NX``), 12 hex characters.
  ``register`` writes it into the webhook's description in CVAT (``cvat-hooks <id>``), so ``webhooks
  list`` can tell this deployment's, another deployment's and plain (older) cvat-hooks webhooks apart.
* ``cvat-hooks:webhooks``: a hash, webhook id -> JSON ``{"type", "target_url", "project_id", "org",
  "registered_at"}``. Never expires: it lives as long as the webhooks. A remembered webhook deleted in
  CVAT is forgotten (by ``reconcile``, ``register`` and ``unregister``).

A webhook is this deployment's when its id is remembered with the same type and its description does
not name another deployment (one that adopted it since). If the Redis is reset, a new id is generated
and the old webhooks look like another deployment's: ``register`` again adopts them.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from core.keys import DEPLOYMENT_KEY, WEBHOOKS_KEY
from operations.cvat_webhooks import ORGANIZATION, PROJECT, SERVER, Scope, Webhook, description_for

if TYPE_CHECKING:
    from redis import Redis

ID_BYTES = 6
"""Random bytes of a deployment id (12 hex characters)."""


class Ownership(StrEnum):
    """Whose a CVAT webhook is, as this deployment sees it."""

    THIS = "this"
    """Registered (or adopted) by this deployment: reconciled, pinged, unregistered here."""
    OTHER = "other"
    """Marked ``cvat-hooks <id>`` by another cvat-hooks deployment: left alone."""
    UNADOPTED = "unadopted"
    """Looks like cvat-hooks' (plain ``cvat-hooks`` description, or a ``/webhooks/cvat`` URL), but this
    deployment never registered it (made before deployments were told apart): left alone until
    ``register`` adopts it."""
    NONE = "none"
    """Not cvat-hooks'."""

    def label(self, hook: Webhook) -> str:
        """What ``webhooks list``, ``doctor`` and ``reconcile`` say about it."""
        if self is Ownership.THIS:
            return "this deployment"
        if self is Ownership.OTHER:
            return f"another cvat-hooks deployment ({hook.description})"
        if self is Ownership.UNADOPTED:
            return "cvat-hooks, not registered by this deployment: run `cvat-hooks register` again to adopt it"
        return "not cvat-hooks"


@dataclass(frozen=True)
class Remembered:
    """What this deployment keeps about one webhook it registered."""

    id: int
    type: str
    target_url: str
    project_id: int | None = None
    org: str | None = None
    registered_at: str = ""

    @property
    def scope(self) -> Scope:
        if self.type == SERVER:
            return Scope(server=True)
        if self.type == PROJECT:
            return Scope(project_id=self.project_id)
        return Scope(org=self.org)

    def as_webhook(self) -> Webhook:
        """A stand-in ``Webhook`` for one CVAT does not list (to read its deliveries, or report it)."""
        return Webhook(id=self.id, type=self.type, target_url=self.target_url, project_id=self.project_id,
                       org_slug=self.org)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "target_url": self.target_url, "project_id": self.project_id,
                "org": self.org, "registered_at": self.registered_at}

    @classmethod
    def from_json(cls, webhook_id: int, data: dict[str, Any]) -> Remembered:
        return cls(id=webhook_id, type=str(data.get("type") or ""), target_url=str(data.get("target_url") or ""),
                   project_id=data.get("project_id"), org=data.get("org"),
                   registered_at=str(data.get("registered_at") or ""))


@dataclass(frozen=True)
class Known:
    """This deployment's id and webhooks, read once (``load``) for one command or run."""

    deployment_id: str | None
    webhooks: Mapping[int, Remembered] = field(default_factory=dict)

    def ownership(self, hook: Webhook) -> Ownership:
        """Whose ``hook`` is (see the module docstring)."""
        marker = hook.deployment
        remembered = self.webhooks.get(hook.id)
        if remembered is not None and remembered.type == hook.type and marker in (None, "", self.deployment_id):
            return Ownership.THIS
        if marker and marker != self.deployment_id:
            return Ownership.OTHER
        return Ownership.UNADOPTED if hook.is_cvat_hooks else Ownership.NONE

    def mine(self, hooks: Iterable[Webhook]) -> list[Webhook]:
        """The webhooks of ``hooks`` that are this deployment's."""
        return [w for w in hooks if self.ownership(w) is Ownership.THIS]


def load(redis: Redis) -> Known:
    """What this deployment remembers (nothing is created: a read for list, doctor, reconcile)."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.get(DEPLOYMENT_KEY)
        pipe.hgetall(WEBHOOKS_KEY)
        raw_id, raw_hooks = pipe.execute()
    hooks: dict[int, Remembered] = {}
    for key, value in (raw_hooks or {}).items():
        try:
            webhook_id, data = int(key), json.loads(value)
        except ValueError:
            continue  # not written by us: ignore rather than fail every command
        if isinstance(data, dict):
            hooks[webhook_id] = Remembered.from_json(webhook_id, data)
    return Known(raw_id.decode() if isinstance(raw_id, bytes) else raw_id, hooks)


def ensure_deployment(redis: Redis) -> str:
    """This deployment's id, generated the first time (every process then reads the same one)."""
    redis.set(DEPLOYMENT_KEY, secrets.token_hex(ID_BYTES), nx=True)
    value = redis.get(DEPLOYMENT_KEY)
    assert value is not None
    return value.decode() if isinstance(value, bytes) else str(value)


def description(deployment_id: str) -> str:
    """The description ``register`` gives this deployment's webhooks."""
    return description_for(deployment_id)


def remember(redis: Redis, hook: Webhook, scope: Scope) -> Remembered:
    """Note ``hook`` (just created or adopted in ``scope``) as this deployment's."""
    record = Remembered(id=hook.id, type=hook.type or scope.kind, target_url=hook.target_url,
                        project_id=scope.project_id, org=scope.org if scope.kind == ORGANIZATION else None,
                        registered_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    redis.hset(WEBHOOKS_KEY, str(hook.id), json.dumps(record.to_json()))
    return record


def forget(redis: Redis, webhook_ids: Iterable[int]) -> list[int]:
    """Stop treating these webhooks as this deployment's (deleted, or adopted by another deployment)."""
    ids = [int(i) for i in webhook_ids]
    if ids:
        redis.hdel(WEBHOOKS_KEY, *[str(i) for i in ids])
    return ids
