"""Evaluate a rule's ``if`` against an event: a pure function that also says *why*.

Missing fields are a non-match, never an error (CVAT's payloads differ between versions and
resources). The one exception is ``exists: false``, which is what it asks. ``not_equals`` and
``not_in`` on a missing field are false too: "the stage is not acceptance" should not fire for an
event that has no stage at all; write ``not: {path: {equals: ...}}`` to include missing fields.

Transitions (``changed``, ``became``, ``was``) compare with a :class:`~receiver.rules.model.Previous`
snapshot; when it is unknown they are all false, ``changed: false`` included: "we don't know"
never matches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from receiver.events import Event
from receiver.rules.model import All, AnyOf, Check, Condition, Not, Previous

_MISSING = object()


@dataclass(frozen=True)
class Verdict:
    """Whether a condition held, and the human-readable reasons (for the delivery log, ``rules test``)."""

    matched: bool
    reasons: tuple[str, ...] = ()


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted path (digits index lists), or the module's ``_MISSING`` sentinel."""
    current = data
    for part in path.split("."):
        if isinstance(current, Mapping):
            if part not in current:
                return _MISSING
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


def is_missing(value: Any) -> bool:
    """Whether :func:`lookup` found nothing."""
    return value is _MISSING


def show(value: Any, limit: int = 80) -> str:
    """A short, unambiguous rendering of a value for a reason: ``'text'``, ``null``, ``3``, ``true``."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, sort_keys=True, default=str)
        except ValueError:  # a circular structure cannot come from JSON, but stay total
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def same(a: Any, b: Any) -> bool:
    """Equality as a rule author means it: ``true`` is not ``1`` (Python says it is)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def _comparable(a: Any, b: Any) -> bool:
    """Numbers with numbers, strings with strings (ISO dates compare correctly as strings)."""
    def number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    return (number(a) and number(b)) or (isinstance(a, str) and isinstance(b, str))


_COMPARE = {
    "gt": (">", lambda a, b: a > b),
    "gte": (">=", lambda a, b: a >= b),
    "lt": ("<", lambda a, b: a < b),
    "lte": ("<=", lambda a, b: a <= b),
}


def _scalar(check: Check, value: Any) -> Verdict:
    """Apply a non-transition operator to the current value of its path."""
    path, op, want = check.path, check.op, check.value
    if op == "exists":
        present = not is_missing(value)
        return Verdict(present is want, (f"{path} {'exists' if present else 'is missing'}",))
    if is_missing(value):
        return Verdict(False, (f"{path} is missing from the event",))
    if op == "equals":
        ok = same(value, want)
        return Verdict(ok, (f"{path} == {show(want)}" if ok else f"{path}: {show(value)} != {show(want)}",))
    if op == "not_equals":
        ok = not same(value, want)
        return Verdict(ok, (f"{path}: {show(value)} != {show(want)}" if ok else f"{path} == {show(want)}",))
    if op in ("in", "not_in"):
        inside = any(same(value, item) for item in want)
        ok = inside if op == "in" else not inside
        verb = "in" if inside else "not in"
        return Verdict(ok, (f"{path}: {show(value)} {verb} {show(list(want))}",))
    if op == "regex":
        if not isinstance(value, str):
            return Verdict(False, (f"{path}: {show(value)} is not text, cannot match /{want}/",))
        ok = check.pattern is not None and check.pattern.search(value) is not None
        return Verdict(ok, (f"{path}: {show(value)} {'matches' if ok else 'does not match'} /{want}/",))
    if op in _COMPARE:
        sign, compare = _COMPARE[op]
        if not _comparable(value, want):
            return Verdict(False, (f"{path}: cannot compare {show(value)} {sign} {show(want)}",))
        ok = bool(compare(value, want))
        return Verdict(ok, (f"{path}: {show(value)} {sign if ok else 'not ' + sign} {show(want)}",))
    raise ValueError(f"unknown operator {op!r}")  # the loader rejects these: a bug if reached


def _transition(check: Check, current: Any, previous: Previous | None) -> Verdict:
    """Apply ``changed``/``became``/``was`` using the previous snapshot of the event's resource."""
    path, op, want = check.path, check.op, check.value
    if previous is None or previous.resource is None:
        return Verdict(False, (f"{path}: previous value unknown (no previous state)",))
    head, _, rest = path.partition(".")
    if head != previous.resource or not rest:
        return Verdict(False, (f"{path}: {op} only applies to fields of the event's {previous.resource}",))
    if previous.snapshot is None:
        return Verdict(False, (f"{path}: previous value unknown (source: {previous.source})",))
    before = lookup(previous.snapshot, rest)
    now_text, was_text = ("missing" if is_missing(v) else show(v) for v in (current, before))
    changed = (is_missing(before) != is_missing(current)) or (
        not is_missing(current) and not same(before, current)
    )
    src = f"source: {previous.source}"
    if op == "changed":
        ok = changed is want
        if changed:
            text = f"{path} changed from {was_text} to {now_text}"
        else:
            text = f"{path} unchanged ({now_text})"
        return Verdict(ok, (f"{text} ({src})",))
    if op == "became":
        ok = changed and not is_missing(current) and same(current, want)
        if ok:
            return Verdict(True, (f"{path} became {show(want)} (was {was_text}, {src})",))
        why = f"still {now_text}" if not changed else f"is {now_text}, was {was_text}"
        return Verdict(False, (f"{path} did not become {show(want)} ({why}, {src})",))
    if op == "was":
        ok = not is_missing(before) and same(before, want)
        verb = "was" if ok else "was not"
        return Verdict(ok, (f"{path} {verb} {show(want)} (was {was_text}, now {now_text}, {src})",))
    raise ValueError(f"unknown transition operator {op!r}")


def evaluate(cond: Condition | None, ctx: Mapping[str, Any], previous: Previous | None = None) -> Verdict:
    """Evaluate a condition tree against an event context (:meth:`Event.context`).

    Every branch is evaluated (it is cheap and pure) so the reasons explain the whole decision:
    a failed ``all`` gives the reasons of its failing items, a matched one all of them.
    """
    if cond is None:
        return Verdict(True, ("no conditions",))
    if isinstance(cond, Check):
        value = lookup(ctx, cond.path)
        if cond.op in ("changed", "became", "was"):
            return _transition(cond, value, previous)
        return _scalar(cond, value)
    if isinstance(cond, All):
        verdicts = [evaluate(item, ctx, previous) for item in cond.items]
        ok = all(v.matched for v in verdicts)
        return Verdict(ok, tuple(r for v in verdicts if ok or not v.matched for r in v.reasons))
    if isinstance(cond, AnyOf):
        verdicts = [evaluate(item, ctx, previous) for item in cond.items]
        if any(v.matched for v in verdicts):
            return Verdict(True, tuple(r for v in verdicts if v.matched for r in v.reasons))
        return Verdict(False, ("none of any: " + "; ".join(r for v in verdicts for r in v.reasons),))
    if isinstance(cond, Not):
        inner = evaluate(cond.item, ctx, previous)
        return Verdict(not inner.matched, ("not (" + "; ".join(inner.reasons) + ")",))
    raise TypeError(f"not a condition: {cond!r}")


def previous_from_payload(event: Event) -> Previous | None:
    """The previous state CVAT itself sent (``before_update`` and/or ``changes``), or ``None``.

    The snapshot is the current object with the old values put back, so fields CVAT did not list
    count as unchanged. ``changes[field]["from"]`` wins over ``before_update`` where both are given
    (they agree on every CVAT seen so far).
    """
    before = event.payload.get("before_update")
    changes = event.payload.get("changes")
    if not isinstance(before, Mapping) and not isinstance(changes, Mapping):
        return None
    obj = event.obj
    if obj is None:
        return None
    snapshot = dict(obj)  # shallow: values are only read, and the payload is never changed
    if isinstance(before, Mapping):
        snapshot.update(before)
    if isinstance(changes, Mapping):
        for name, change in changes.items():
            if isinstance(change, Mapping) and "from" in change:
                snapshot[name] = change["from"]
    return Previous(event.resource, snapshot, "payload")


def previous_without_state(event: Event) -> Previous:
    """The best previous state knowable from the event alone (``rules test``, or no Redis state yet).

    What CVAT sent if it sent it; empty for a ``create:*`` event (everything it has is new);
    otherwise unknown, so no transition matches.
    """
    from_payload = previous_from_payload(event)
    if from_payload is not None:
        return from_payload
    if event.action == "create":
        return Previous(event.resource, {}, "created")
    return Previous(event.resource, None, "unknown")
