"""Turn a verified body into a typed event, and give it an identity CVAT does not send.

CVAT sends no delivery id. Its automatic retries repeat the bytes, but a manual redelivery sends
the same content with the keys in another order (see ``shared/cvat-payloads/README.md``), so the
delivery id is a hash of a canonical form of the parsed payload, not of the raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_DEPTH = 64
"""Deepest JSON nesting accepted; CVAT's payloads are about 4 levels deep."""

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate (valid in pairs, for characters beyond U+FFFF)."""
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGITS = b"0" * 19
"""As many digits in a row as an integer beyond 64 bits needs (2**63 has 19), once every digit reads
``0`` (``bytes.translate`` and ``find``: ten times quicker than a regular expression here)."""
_EVENT_NAME = re.compile(r"^(?P<action>[a-z_]+)(?::(?P<resource>[a-z_]+)(?:\[(?P<op>[a-z_]+:[a-z_]+)\])?)?$")

ID_NAMES = ("project_id", "task_id", "job_id", "org_id")
"""The ids every event exposes directly to rules and templates when it implies them."""


class BadEvent(ValueError):
    """The body is not a CVAT event we can read (answered with 400)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    """A JSON number as a float, refusing one too large for it (``1e400``), as orjson does."""
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number {text[:20]} is infinite as a float")
    return number


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, without recursion (a hostile body cannot blow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > deepest:
            deepest = level
            if deepest > limit:
                return deepest
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def parse_json(body: bytes) -> dict[str, Any]:
    """Decode a body as a JSON object, refusing what CVAT never sends (NaN, too deep, not an object).

    orjson reads it, three times quicker than ``json.loads`` and as strict (it refuses NaN, invalid
    UTF-8 and a lone surrogate itself), but it reads an integer beyond 64 bits as a float: a body
    with 19 digits in a row, which such an integer needs, is read by ``json.loads`` instead, so
    every value is what CVAT sent (and the delivery id, a hash of the values, the same).
    """
    try:
        if body.translate(_DIGITS_AS_ZERO).find(_LONG_DIGITS) < 0:
            data = orjson.loads(body)
        else:
            data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError as exc:
        raise BadEvent("JSON nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadEvent(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadEvent("body is not a JSON object")
    # Nesting needs an opening bracket per level: a body with few of them (CVAT's have about 20)
    # needs no walk.
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise BadEvent(f"JSON nested deeper than {MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(body):
        # JSON may escape half of a UTF-16 pair alone ("\ud800"): Python reads it into a str that
        # cannot be encoded, and Redis would fail on it later (a 500). CVAT's payloads come from
        # PostgreSQL, which refuses such strings, so they never hold one.
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadEvent("body holds a lone UTF-16 surrogate escape, which is not text") from exc
    return data


def canonical(payload: Any) -> bytes:
    """One byte string per JSON value, whatever the key order or spacing of the bytes it came from."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def delivery_id_of(payload: dict[str, Any]) -> str:
    """The idempotency key of a delivery: hex SHA-256 of its canonical payload."""
    return hashlib.sha256(canonical(payload)).hexdigest()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _org_id(obj: dict[str, Any]) -> int | None:
    """CVAT sends ``organization`` as an id (newer) or an object (some resources), or ``organization_id``."""
    org = obj.get("organization", obj.get("organization_id"))
    if isinstance(org, dict):
        return _int(org.get("id"))
    return _int(org)


@dataclass(frozen=True)
class Event:
    """One CVAT delivery, parsed. ``payload`` is the body as CVAT sent it (never re-keyed)."""

    name: str
    """The event name, e.g. ``update:job`` or ``completed:request[export:annotations]``."""
    action: str
    """``create``, ``update``, ``delete``, ``completed`` or ``ping``."""
    resource: str | None
    """The payload key holding the object: ``job``, ``task``, ``request``, ``webhook``..."""
    payload: dict[str, Any]
    delivery_id: str
    ids: dict[str, int] = field(default_factory=dict)
    """``project_id``, ``task_id``, ``job_id``, ``org_id`` where the event implies them."""

    @property
    def obj(self) -> dict[str, Any] | None:
        """The resource object (``payload["job"]`` for ``update:job``), if present and an object."""
        value = self.payload.get(self.resource) if self.resource else None
        return value if isinstance(value, dict) else None

    @property
    def resource_id(self) -> int | None:
        obj = self.obj
        return _int(obj.get("id")) if obj else None

    @property
    def updated_date(self) -> str | None:
        """When CVAT last changed the resource (ISO 8601, UTC): orders events of one resource."""
        obj = self.obj
        value = obj.get("updated_date") if obj else None
        return value if isinstance(value, str) else None

    @property
    def webhook_id(self) -> int | None:
        hook = self.payload.get("webhook")
        return _int(self.payload.get("webhook_id")) or (_int(hook.get("id")) if isinstance(hook, dict) else None)

    @property
    def is_ping(self) -> bool:
        return self.name == "ping"

    def context(self) -> dict[str, Any]:
        """What rules and templates see: the payload, plus the implied ids and ``event`` on top."""
        ctx = dict(self.payload)
        for name, value in self.ids.items():
            ctx.setdefault(name, value)
        ctx["event"] = self.name
        return ctx

    def essentials(self) -> dict[str, Any]:
        """The small, JSON-only summary handed to workers and shown in the delivery log."""
        return {
            "event": self.name,
            "resource": self.resource,
            "resource_id": self.resource_id,
            "updated_date": self.updated_date,
            "webhook_id": self.webhook_id,
            **{name: self.ids.get(name) for name in ID_NAMES},
            "object": self.obj,
        }


def implied_ids(resource: str | None, payload: dict[str, Any]) -> dict[str, int]:
    """The project, task, job and organization ids an event implies (None-valued ones left out)."""
    obj = payload.get(resource) if resource else None
    if not isinstance(obj, dict):
        return {}
    found: dict[str, int | None] = {}
    if resource == "request":
        op = obj.get("operation")
        if isinstance(op, dict):
            found = {name: _int(op.get(name)) for name in ID_NAMES}
    elif resource == "job":
        found = {"job_id": _int(obj.get("id")), "task_id": _int(obj.get("task_id")),
                 "project_id": _int(obj.get("project_id")), "org_id": _org_id(obj)}
    elif resource == "task":
        found = {"task_id": _int(obj.get("id")), "project_id": _int(obj.get("project_id")),
                 "org_id": _org_id(obj)}
    elif resource == "project":
        found = {"project_id": _int(obj.get("id")), "org_id": _org_id(obj)}
    elif resource == "issue":
        found = {"job_id": _int(obj.get("job")), "org_id": _org_id(obj)}
    elif resource == "organization":
        found = {"org_id": _int(obj.get("id"))}
    elif resource in ("membership", "invitation", "comment", "webhook"):
        found = {"org_id": _org_id(obj), "project_id": _int(obj.get("project_id") or obj.get("project"))}
    return {name: value for name, value in found.items() if value is not None}


def parse_event(body: bytes) -> Event:
    """Parse a verified body into an :class:`Event` (``BadEvent`` if it is not one)."""
    payload = parse_json(body)
    name = payload.get("event")
    if not isinstance(name, str) or not name:
        raise BadEvent("payload has no 'event' name")
    m = _EVENT_NAME.match(name)
    if not m:
        raise BadEvent(f"malformed event name {name[:80]!r}")
    action = m["action"]
    resource = m["resource"]
    if action == "ping":
        resource = "webhook"
    elif action == "completed" and resource == "request":
        resource = "request"
    return Event(
        name=name,
        action=action,
        resource=resource,
        payload=payload,
        delivery_id=delivery_id_of(payload),
        ids=implied_ids(resource, payload),
    )
