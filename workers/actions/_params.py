"""Small helpers the action modules share: parameter checks, ids from the event, per-call Redis keys."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from core.contract import ActionCall
from core.errors import PermanentError
from core.keys import ACTION_CALL_KEY
from workers.actions import COMMON_PARAMS

_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


def unknown_params(params: Mapping[str, Any], allowed: Iterable[str]) -> list[str]:
    """One problem per parameter the action does not know (a typo should fail at load time).

    The common parameters (``require_all_jobs``) are known to every action: the registry strips
    them before ``validate``, but a worker's ``ctx.params`` still holds them.
    """
    known = set(allowed)
    return [f"unknown parameter {name!r} (known: {', '.join(sorted(known))})"
            for name in params if name not in known and name not in COMMON_PARAMS]


def has_placeholder(value: Any) -> bool:
    """Whether an unrendered string still holds a ``{placeholder}`` (its value is known at run time)."""
    return isinstance(value, str) and bool(_PLACEHOLDER.search(value))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_id(value: Any, what: str) -> int:
    """A rendered id parameter (``"{job_id}"`` renders to a string of digits) as an int."""
    if is_int(value) and value > 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
        return int(value)
    raise PermanentError(f"{what} must be a positive id, not {value!r}")


def event_id(event: Mapping[str, Any], name: str) -> int | None:
    """An id (``job_id``, ``task_id``, ``project_id``) the event implies, if it implies one."""
    value = event.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def call_key(kind: str, call: ActionCall) -> str:
    """A Redis key unique to one run of one action of one rule for one delivery."""
    return ACTION_CALL_KEY.format(kind=kind, delivery_id=call.delivery_id, rule_id=call.rule_id, index=call.index,
                                  run=call.run)


def text(raw: bytes | str | None) -> str | None:
    """A Redis value as text, whether the client decodes responses or not (RQ's does not)."""
    return raw.decode() if isinstance(raw, bytes) else raw
