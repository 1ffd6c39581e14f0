"""CVAT's webhooks as cvat-hooks sees them: which are ours, where they live, what they delivered.

Registration, ping, doctor and reconcile (in ``receiver``) share these plain functions over the
webhook methods of ``workers.cvat_client.CvatClient`` (the ``WebhookGateway`` protocol below, so a
test may hand in anything with those methods). No cvat_sdk here: JSON in, small values out.

Organizations, and why lists are asked per context: CVAT filters every list by the request's
organization context (``X-Organization``), and in the personal workspace a non-admin only sees
webhooks outside organizations. So "every webhook visible to the token" is the personal workspace's
list plus each organization's, merged by id. A project webhook lives in its project's organization:
its list and creation are made in that context (``org_id``), or CVAT would not show or accept it.
A server webhook (CVAT 2.76+, PR #11106: user and organization life-cycle events, admin only)
belongs to no organization: it is listed and created without an organization context.

Which webhooks are this deployment's is not decided here: several cvat-hooks deployments may share
one CVAT, so ``Webhook.is_cvat_hooks`` only says a webhook *looks* like some cvat-hooks deployment's;
``operations.webhook_registry`` knows the ones this deployment registered.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from workers.gateway import Resource

DESCRIPTION = "cvat-hooks"
"""The start of the ``description`` of the webhooks ``cvat-hooks register`` makes: ``cvat-hooks <deployment
id>`` since deployments are told apart, plain ``cvat-hooks`` before (see :func:`description_for`)."""
RECEIVER_PATH = "/webhooks/cvat"
"""The receiver's delivery endpoint, appended to a public URL."""
PROJECT = "project"
ORGANIZATION = "organization"
SERVER = "server"
"""CVAT 2.76+'s server-wide webhook type (PR #11106)."""
SERVER_SINCE = (2, 76)
"""The first CVAT version with server webhooks."""


class WebhookGateway(Protocol):
    """What these functions need from CVAT (``workers.cvat_client.CvatClient`` has it)."""

    def get_resource(self, resource: Resource, resource_id: int) -> dict[str, Any]: ...
    def list_organizations(self) -> list[dict[str, Any]]: ...
    def list_webhooks(self, *, org: str | None = None, org_id: int | None = None,
                      project_id: int | None = None,
                      webhook_type: str | None = None) -> list[dict[str, Any]]: ...
    def create_webhook(self, fields: dict[str, Any], *, org: str | None = None,
                       org_id: int | None = None) -> dict[str, Any]: ...
    def update_webhook(self, webhook_id: int, fields: dict[str, Any]) -> dict[str, Any]: ...
    def delete_webhook(self, webhook_id: int) -> None: ...
    def ping_webhook(self, webhook_id: int) -> dict[str, Any]: ...
    def webhook_deliveries(self, webhook_id: int, *, page: int = 1,
                           page_size: int = 100) -> dict[str, Any]: ...
    def redeliver(self, webhook_id: int, delivery_id: int) -> None: ...
    def webhook_events(self, webhook_type: str) -> list[str] | None: ...
    def server_about(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Scope:
    """Where a webhook hears events: one project, one organization (by slug), or the whole server."""

    project_id: int | None = None
    org: str | None = None
    server: bool = False

    def __post_init__(self) -> None:
        if [self.project_id is not None, self.org is not None, self.server].count(True) != 1:
            raise ValueError("give exactly one of a project id, an organization slug and the server")

    @property
    def kind(self) -> str:
        """CVAT's webhook ``type``."""
        if self.server:
            return SERVER
        return PROJECT if self.project_id is not None else ORGANIZATION

    def __str__(self) -> str:
        if self.server:
            return "the server"
        return f"project {self.project_id}" if self.project_id is not None else f"organization {self.org}"


@dataclass(frozen=True)
class Context:
    """The organization context a scope's webhooks are listed and created in."""

    org: str | None = None
    """Organization slug (``X-Organization``)."""
    org_id: int | None = None
    """Organization id (``?org_id=``), for a project of an organization; both ``None``: personal workspace."""


@dataclass(frozen=True)
class Webhook:
    """One CVAT webhook (``WebhookRead``), as the commands show it. CVAT never returns the secret."""

    id: int
    type: str
    target_url: str
    description: str = ""
    is_active: bool = True
    enable_ssl: bool = True
    events: tuple[str, ...] = ()
    project_id: int | None = None
    organization_id: int | None = None
    org_slug: str | None = None
    """Known when the webhook was listed in its organization's context."""
    last_status: int | None = None
    last_delivery_date: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any], *, org_slug: str | None = None) -> Webhook:
        return cls(
            id=int(data["id"]), type=str(data.get("type") or ""),
            target_url=str(data.get("target_url") or ""),
            description=str(data.get("description") or ""), is_active=bool(data.get("is_active", True)),
            enable_ssl=bool(data.get("enable_ssl", True)), events=tuple(sorted(data.get("events") or ())),
            project_id=data.get("project_id"), organization_id=_id_of(data.get("organization")),
            org_slug=org_slug, last_status=data.get("last_status"),
            last_delivery_date=data.get("last_delivery_date"), raw=data,
        )

    @property
    def is_cvat_hooks(self) -> bool:
        """Made by some ``cvat-hooks register`` (description), or pointing at a cvat-hooks receiver (path).
        Not necessarily this deployment's: ``operations.webhook_registry`` knows those."""
        path = urllib.parse.urlsplit(self.target_url).path.rstrip("/")
        return self.deployment is not None or path.endswith(RECEIVER_PATH)

    @property
    def deployment(self) -> str | None:
        """The deployment id in a ``cvat-hooks <id>`` description, ``""`` for a plain ``cvat-hooks``
        one (registered before deployments were told apart), ``None`` for any other description."""
        return deployment_in(self.description)

    @property
    def where(self) -> str:
        """``project 3``, ``organization acme`` (or ``organization #2`` when the slug is unknown), ``server``."""
        if self.type == PROJECT:
            return f"project {self.project_id}"
        if self.type == SERVER:
            return "server"
        return f"organization {self.org_slug or f'#{self.organization_id}'}"

    def to_json(self) -> dict[str, Any]:
        """The fields ``webhooks list --json`` and ``doctor --json`` show."""
        return {"id": self.id, "type": self.type, "where": self.where, "target_url": self.target_url,
                "description": self.description, "is_active": self.is_active, "events": list(self.events),
                "project_id": self.project_id, "organization_id": self.organization_id,
                "last_status": self.last_status, "last_delivery_date": self.last_delivery_date,
                "cvat_hooks": self.is_cvat_hooks}


_MARKED = re.compile(re.escape(DESCRIPTION) + r"(?: (\S+))?")


def description_for(deployment_id: str) -> str:
    """The description that marks a webhook as this deployment's in CVAT: ``cvat-hooks <id>``."""
    return f"{DESCRIPTION} {deployment_id}"


def deployment_in(description: str) -> str | None:
    """The deployment id a description names (see ``Webhook.deployment``)."""
    found = _MARKED.fullmatch(description.strip())
    if found is None:
        return None
    return found.group(1) or ""


def receiver_url(public_url: str) -> str:
    """The target URL CVAT should POST to: ``public_url`` + ``/webhooks/cvat`` unless already there."""
    url = public_url.strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{public_url!r} is not an http(s) URL CVAT can reach, e.g. https://hooks.example.com")
    if parts.query or parts.fragment:
        raise ValueError(f"{public_url!r}: give the receiver's base URL, without a query or fragment")
    path = parts.path.rstrip("/")
    if not path.endswith(RECEIVER_PATH):
        path += RECEIVER_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def is_success(status: int | None) -> bool:
    """A delivery CVAT counts as delivered: a 2xx answer (``None``: no answer recorded)."""
    return status is not None and 200 <= status < 300


def version_of(about: dict[str, Any]) -> tuple[int, ...] | None:
    """``(2, 76, 0)`` from ``GET /api/server/about``'s ``version`` (``2.76.0``, ``2.76.0-dev``...)."""
    numbers = re.findall(r"\d+", str(about.get("version") or "").split("-", 1)[0])
    return tuple(int(n) for n in numbers[:3]) if numbers else None


def context_of(gateway: WebhookGateway, scope: Scope) -> Context:
    """The context a scope's webhooks live in (a project's organization is read from the project; a
    server webhook lives in none)."""
    if scope.server:
        return Context()
    if scope.org is not None:
        return Context(org=scope.org)
    assert scope.project_id is not None
    project = gateway.get_resource(Resource.PROJECT, scope.project_id)
    return Context(org_id=_id_of(project.get("organization")))


def webhooks_in(gateway: WebhookGateway, scope: Scope, context: Context | None = None) -> list[Webhook]:
    """The webhooks of one project or organization, oldest first."""
    context = context or context_of(gateway, scope)
    found = gateway.list_webhooks(org=context.org, org_id=context.org_id, project_id=scope.project_id,
                                  webhook_type=scope.kind)
    hooks = [Webhook.from_json(w, org_slug=scope.org) for w in found]
    # Filter again here: a server may ignore a filter it does not know rather than refuse it.
    return sorted((w for w in hooks if w.type == scope.kind
                   and (scope.project_id is None or w.project_id == scope.project_id)), key=lambda w: w.id)


def visible_webhooks(gateway: WebhookGateway) -> list[Webhook]:
    """Every webhook the credentials can see: the personal workspace's and each organization's."""
    slugs = {o["id"]: o["slug"] for o in gateway.list_organizations() if o.get("id") and o.get("slug")}
    found = {int(data["id"]): data for data in gateway.list_webhooks()}
    for slug in slugs.values():
        try:
            found.update({int(data["id"]): data for data in gateway.list_webhooks(org=slug)})
        except Exception as exc:
            if not is_not_found(exc):
                raise  # an organization deleted since the list was read has no webhooks left
    return [Webhook.from_json(data, org_slug=slugs.get(_id_of(data.get("organization"))))
            for _, data in sorted(found.items())]


def deliveries_since(gateway: WebhookGateway, webhook_id: int, since: datetime | None = None, *,
                     page_size: int = 100) -> Iterator[dict[str, Any]]:
    """A webhook's deliveries, newest first, back to ``since`` (by ``created_date``).

    CVAT orders them by ``-updated_date``, nearly the same order: paging stops after the first page
    that ends before ``since``, and only deliveries from ``since`` on are yielded.
    """
    page = 1
    while True:
        answer = gateway.webhook_deliveries(webhook_id, page=page, page_size=page_size) or {}
        results = answer.get("results") or []
        for delivery in results:
            created = parse_time(delivery.get("created_date"))
            if since is None or created is None or created >= since:
                yield delivery
        last = parse_time(results[-1].get("created_date")) if results else None
        if not answer.get("next") or not results or (since is not None and last is not None and last < since):
            return
        page += 1


def parse_time(value: Any) -> datetime | None:
    """CVAT's ISO 8601 time (``2026-11-22T17:38:10.123456Z``) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _id_of(value: Any) -> int | None:
    """CVAT sends an organization as an id, or (some versions, some resources) an object with one."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None




def is_not_found(exc: Exception) -> bool:
    """Whether a gateway error is CVAT's 404 (the webhook, or the organization, is gone)."""
    return getattr(exc, "status", None) == 404
