"""The one place that knows which event names CVAT's webhooks send, and how ``on:`` patterns match them.

The list follows CVAT's server (``cvat/apps/webhooks/event_type.py`` and the generated SDK enum of
``Webhook.events``): project webhooks get the project-scoped events, organization webhooks add the
organization, membership, invitation and ``create:project`` events. Since CVAT PR #10897 the old
``create:export``/``create:backup`` events are ``completed:request[export:*]``; since PR #11106 a
server-wide webhook type adds user events and ``create``/``delete:organization``. ``ping`` is sent
when a webhook is tested; it is never subscribed to, but a rule may match it.

Patterns use ``*`` as their only wildcard (any run of characters, ``:`` included). ``[`` and ``]``
are literal, unlike :mod:`fnmatch`, because they are part of names such as
``completed:request[export:annotations]``.
"""

from __future__ import annotations

import re
from functools import lru_cache

PROJECT_EVENTS: tuple[str, ...] = (
    "completed:request[calculate:quality]",
    "completed:request[create:task]",
    "completed:request[export:annotations]",
    "completed:request[export:backup]",
    "completed:request[export:dataset]",
    "completed:request[merge:job]",
    "completed:request[merge:task]",
    "create:comment",
    "create:issue",
    "create:job",
    "create:task",
    "delete:comment",
    "delete:issue",
    "delete:job",
    "delete:project",
    "delete:task",
    "update:comment",
    "update:issue",
    "update:job",
    "update:project",
    "update:task",
)
"""What a project webhook can subscribe to (exactly the ``webhook.events`` of a CVAT 2.73 ping)."""

ORGANIZATION_EVENTS: tuple[str, ...] = (
    *PROJECT_EVENTS,
    "create:project",
    "update:organization",
    "create:membership",
    "update:membership",
    "delete:membership",
    "create:invitation",
    "delete:invitation",
)
"""What an organization webhook can subscribe to: the project events plus organization-level ones."""

SERVER_EVENTS: tuple[str, ...] = (
    "create:user",
    "update:user",
    "delete:user",
    "create:organization",
    "delete:organization",
)
"""Events of CVAT's newer server-wide webhooks (and ``delete:organization`` of older organization ones)."""

PING = "ping"

TRACKED_RESOURCES = ("project", "task", "job")
"""Resources whose state cvat-hooks remembers between events (``core.state``): a rule may compare
their fields with the previous state."""

EVENT_NAMES: tuple[str, ...] = tuple(sorted({*ORGANIZATION_EVENTS, *SERVER_EVENTS, PING}))
"""Every event name a CVAT webhook can send, sorted."""


@lru_cache(maxsize=512)
def _compile(pattern: str) -> re.Pattern[str]:
    """A pattern as an anchored regex: ``*`` is any run of characters, everything else is literal."""
    parts = re.split(r"(\*)", pattern)
    return re.compile("".join(".*" if part == "*" else re.escape(part) for part in parts))


def matches(pattern: str, name: str) -> bool:
    """Whether an event name matches an ``on:`` pattern (exact name or ``*`` wildcards)."""
    if "*" not in pattern:
        return pattern == name
    return _compile(pattern).fullmatch(name) is not None


def expand(pattern: str) -> list[str]:
    """The known event names a pattern matches, in :data:`EVENT_NAMES` order (empty if none)."""
    return [name for name in EVENT_NAMES if matches(pattern, name)]


def resource_of(name: str) -> str | None:
    """The payload key an event's object sits under: ``job`` for ``update:job``, ``request`` for
    ``completed:request[...]``, ``webhook`` for ``ping`` (as :func:`core.events.parse_event` does)."""
    if name == PING:
        return "webhook"
    _, sep, rest = name.partition(":")
    if not sep:
        return None
    return rest.split("[", 1)[0] or None
