"""Evaluate a rule's ``if`` against an event: a pure function that also says *why*.

Missing fields are a non-match, never an error (CVAT's payloads differ between versions and
resources). The one exception is ``exists: false``, which is what it asks. ``not_equals`` and
``not_in`` on a missing field are false too: "the stage is not acceptance" should not fire for an
event that has no stage at all; write ``not: {path: {equals: ...}}`` to include missing fields.

Transitions (``changed``, ``became``, ``was``) compare with a :class:`~receiver.rules.model.Previous`
snapshot; when it is unknown they are all false, ``changed: false`` included: "we don't know"
never matches.

A condition is compiled once per rule (:func:`compile_condition`) into a judge that gives the
verdict at once and the reasons only when called. The receiver matches every delivery against
every rule but records reasons only for the rules that fire; ``rules test`` (``explain``) asks for
all of them. Both go through the same judge, so they cannot disagree. The reasons explain the whole
decision: a failed ``all`` gives the reasons of its failing items, a matched one all of them; a
matched ``any`` those of its matching items.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import lru_cache, partial
from typing import Any

import re2  # type: ignore[import-untyped]

from core.events import Event
from receiver.rules.model import All, AnyOf, Check, Condition, Not, Previous

_MISSING = object()

Reasons = Callable[[], tuple[str, ...]]
"""The reasons of a judgement, formatted only when called: a non-matching rule's reasons are never
needed on the receiver's hot path, and formatting them (``show``, f-strings) was most of its cost."""

Judgement = tuple[bool, Reasons]
"""Whether a condition held, and how to say why."""

Judge = Callable[[Mapping[str, Any], Previous | None], Judgement]
"""A condition compiled once (:func:`compile_condition`), applied to an event context and previous state."""


def _walk(data: Any, steps: tuple[tuple[str, bool], ...]) -> Any:
    """Follow a split path (each part, and whether it is all digits) through mappings and lists
    (digits index them); the ``_MISSING`` sentinel where it leads nowhere."""
    current = data
    for part, digits in steps:
        if isinstance(current, Mapping):
            if part not in current:
                return _MISSING
            current = current[part]
        elif isinstance(current, list) and digits and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


Getter = Callable[[Any], Any]
"""What :func:`getter` gives: data in, the value at its path (or ``_MISSING``) out."""


@lru_cache(maxsize=1024)
def getter(path: str) -> Getter:
    """A function giving the value at a dotted path, as :func:`lookup` does.

    Conditions and templates apply the same paths to event after event, so each is split once
    (and remembered), and walked quickly through plain dicts, which is what JSON gives; anything
    else on the way (a list, another mapping, a missing key) starts over with :func:`_walk`.
    """
    steps = tuple((part, part.isdigit()) for part in path.split("."))
    keys = tuple(part for part, _ in steps)

    def get(data: Any) -> Any:
        current = data
        for key in keys:
            if type(current) is not dict:
                return _walk(data, steps)
            current = current.get(key, _MISSING)
        return current
    return get


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted path (digits index lists), or the module's ``_MISSING`` sentinel."""
    return getter(path)(data)


def is_missing(value: Any) -> bool:
    """Whether :func:`lookup` found nothing."""
    return value is _MISSING


def show(value: Any, limit: int = 80) -> str:
    """A short, unambiguous rendering of a value for a reason: ``'text'``, ``null``, ``3``, ``true``."""
    if isinstance(value, str):
        text = repr(value)
    elif value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        try:  # an int is written as json.dumps writes it, without the encoder's overhead
            text = repr(value) if type(value) is int else _SHOW_JSON.encode(value)
        except ValueError:  # a circular structure cannot come from JSON, but stay total
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SHOW_JSON = json.JSONEncoder(sort_keys=True, default=str)
"""``json.dumps(value, sort_keys=True, default=str)``, built once: ``json.dumps`` with options builds
an encoder per call, which was most of the cost of a reason. It keeps no state between calls."""


def _shown(value: Any) -> str:
    """A looked-up value in a transition's reason: ``missing`` or :func:`show`."""
    return "missing" if value is _MISSING else show(value)


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


def _fixed(*reasons: str) -> Reasons:
    """Reasons known when the condition is compiled (they do not depend on the event)."""
    return lambda: reasons


# -- checks on the current value --------------------------------------------------------------------
# Each builder gets the check and its path's getter and returns the check's judge: what is fixed by
# the rule (the path, the operand, their rendering) is worked out once, here.

ScalarBuilder = Callable[[Check, Getter], Judge]


def _exists(check: Check, get: Getter) -> Judge:
    """``exists``: the one operator that can hold for a missing field."""
    present_why, missing_why = _fixed(f"{check.path} exists"), _fixed(f"{check.path} is missing")
    want = check.value

    def judge(ctx: Mapping[str, Any], previous: Previous | None) -> Judgement:
        present = get(ctx) is not _MISSING
        return present is want, present_why if present else missing_why
    return judge


def _equals(check: Check, get: Getter) -> Judge:
    """``equals`` and ``not_equals``: one comparison, read either way (both false for a missing field)."""
    path, want = check.path, check.value
    missing, equal = _fixed(f"{path} is missing from the event"), _fixed(f"{path} == {show(want)}")
    expect = check.op == "equals"

    def judge(ctx: Mapping[str, Any], previous: Previous | None) -> Judgement:
        value = get(ctx)
        if value is _MISSING:
            return False, missing
        if same(value, want):
            return expect, equal
        return not expect, lambda: (f"{path}: {show(value)} != {show(want)}",)
    return judge


def _in(check: Check, get: Getter) -> Judge:
    """``in`` and ``not_in``: membership by :func:`same`, read either way (both false for a missing field)."""
    path, want = check.path, check.value
    missing, listed = _fixed(f"{path} is missing from the event"), show(list(want))
    expect = check.op == "in"

    def judge(ctx: Mapping[str, Any], previous: Previous | None) -> Judgement:
        value = get(ctx)
        if value is _MISSING:
            return False, missing
        inside = any(same(value, item) for item in want)
        return inside is expect, lambda: (f"{path}: {show(value)} {'in' if inside else 'not in'} {listed}",)
    return judge


def _re2_options() -> Any:
    """RE2 options: errors are raised to the loader, not also logged to stderr by RE2 itself."""
    options = re2.Options()
    options.log_errors = False
    return options


_RE2_OPTIONS = _re2_options()


class RegexError(ValueError):
    """A ``regex`` operand RE2 cannot compile (backreferences, lookaround, bad syntax)."""


def compile_regex(pattern: str) -> Any:
    """Compile a rule's ``regex`` operand with RE2, whose searches take time linear in the text.

    Python's ``re`` backtracks: ``(a+)+$`` against a long signed payload field stalled every
    gunicorn worker (security issue, item 7). RE2 has no backreferences or lookaround; such a
    pattern is refused when the rules load (:class:`RegexError`), never evaluated slowly.
    """
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(f"{reason} (rules use RE2 syntax, which runs in linear time: no "
                         "backreferences or lookaround)") from None


def _regex(check: Check, get: Getter) -> Judge:
    """``regex``: a search (not a full match) in text; anything else does not match."""
    path, want, pattern = check.path, check.value, check.pattern
    missing = _fixed(f"{path} is missing from the event")

    def judge(ctx: Mapping[str, Any], previous: Previous | None) -> Judgement:
        value = get(ctx)
        if value is _MISSING:
            return False, missing
        if not isinstance(value, str):
            return False, lambda: (f"{path}: {show(value)} is not text, cannot match /{want}/",)
        ok = pattern is not None and pattern.search(value) is not None
        return ok, lambda: (f"{path}: {show(value)} {'matches' if ok else 'does not match'} /{want}/",)
    return judge


def _compare(check: Check, get: Getter) -> Judge:
    """``gt``/``gte``/``lt``/``lte``: numbers with numbers, text with text, anything else is false."""
    path, want = check.path, check.value
    missing = _fixed(f"{path} is missing from the event")
    sign, compare = _COMPARE[check.op]

    def judge(ctx: Mapping[str, Any], previous: Previous | None) -> Judgement:
        value = get(ctx)
        if value is _MISSING:
            return False, missing
        if not _comparable(value, want):
            return False, lambda: (f"{path}: cannot compare {show(value)} {sign} {show(want)}",)
        ok = bool(compare(value, want))
        return ok, lambda: (f"{path}: {show(value)} {sign if ok else 'not ' + sign} {show(want)}",)
    return judge


_SCALAR: dict[str, ScalarBuilder] = {
    "exists": _exists, "equals": _equals, "not_equals": _equals, "in": _in, "not_in": _in, "regex": _regex,
    "gt": _compare, "gte": _compare, "lt": _compare, "lte": _compare,
}


# -- transitions: the current value against the previous snapshot -----------------------------------

Decide = Callable[[Any, Any, str], Judgement]
"""A transition's verdict from the current value, the previous one and the previous state's source."""


def _changed_between(before: Any, current: Any) -> bool:
    """Whether a field changed: appeared, disappeared, or now holds something else."""
    return (before is _MISSING) != (current is _MISSING) or (current is not _MISSING and not same(before, current))


def _changed(check: Check) -> Decide:
    """``changed: true`` or ``changed: false``."""
    path, want = check.path, check.value

    def decide(current: Any, before: Any, source: str) -> Judgement:
        changed = _changed_between(before, current)

        def why() -> tuple[str, ...]:
            if changed:
                return (f"{path} changed from {_shown(before)} to {_shown(current)} (source: {source})",)
            return (f"{path} unchanged ({_shown(current)}) (source: {source})",)
        return changed is want, why
    return decide


def _became(check: Check) -> Decide:
    """``became``: changed, and now holds the value (a field that was already so did not become it)."""
    path, want = check.path, check.value
    wanted = show(want)

    def decide(current: Any, before: Any, source: str) -> Judgement:
        changed = _changed_between(before, current)
        if changed and current is not _MISSING and same(current, want):
            return True, lambda: (f"{path} became {wanted} (was {_shown(before)}, source: {source})",)

        def why() -> tuple[str, ...]:
            now = _shown(current)
            how = f"is {now}, was {_shown(before)}" if changed else f"still {now}"
            return (f"{path} did not become {wanted} ({how}, source: {source})",)
        return False, why
    return decide


def _was(check: Check) -> Decide:
    """``was``: the previous value, whatever it is now."""
    path, want = check.path, check.value
    wanted = show(want)

    def decide(current: Any, before: Any, source: str) -> Judgement:
        ok = before is not _MISSING and same(before, want)
        verb = "was" if ok else "was not"
        return ok, lambda: (f"{path} {verb} {wanted} (was {_shown(before)}, now {_shown(current)}, source: {source})",)
    return decide


_TRANSITION: dict[str, Callable[[Check], Decide]] = {"changed": _changed, "became": _became, "was": _was}


def _transition(check: Check) -> Judge:
    """``changed``/``became``/``was``: false, saying why, unless the previous snapshot has the field's resource."""
    path, op = check.path, check.op
    head, _, rest = path.partition(".")
    get_now, get_before = getter(path), getter(rest)
    decide = _TRANSITION[op](check)
    no_state = _fixed(f"{path}: previous value unknown (no previous state)")

    def judge(ctx: Mapping[str, Any], previous: Previous | None) -> Judgement:
        if previous is None or previous.resource is None:
            return False, no_state
        if head != previous.resource or not rest:
            resource = previous.resource
            return False, lambda: (f"{path}: {op} only applies to fields of the event's {resource}",)
        if previous.snapshot is None:
            source = previous.source
            return False, lambda: (f"{path}: previous value unknown (source: {source})",)
        return decide(get_now(ctx), get_before(previous.snapshot), previous.source)
    return judge


# -- combinators -------------------------------------------------------------------------------------


def _all(items: tuple[Judge, ...]) -> Judge:
    """True when every item holds. Stops at the first failure; its reasons (the failing items') are
    gathered only when asked, by judging the items after it too (judging is pure)."""
    def judge(ctx: Mapping[str, Any], previous: Previous | None) -> Judgement:
        whys: list[Reasons] = []
        for i, item in enumerate(items):
            ok, why = item(ctx, previous)
            if not ok:
                return False, partial(_reasons_of, why, items[i + 1:], ctx, previous, held=False)
            whys.append(why)
        return True, lambda: tuple(r for w in whys for r in w())
    return judge


def _any(items: tuple[Judge, ...]) -> Judge:
    """True when an item holds. Stops at the first that does; its reasons (the holding items') are
    gathered only when asked, by judging the items after it too."""
    def judge(ctx: Mapping[str, Any], previous: Previous | None) -> Judgement:
        whys: list[Reasons] = []
        for i, item in enumerate(items):
            ok, why = item(ctx, previous)
            if ok:
                return True, partial(_reasons_of, why, items[i + 1:], ctx, previous, held=True)
            whys.append(why)
        return False, lambda: ("none of any: " + "; ".join(r for w in whys for r in w()),)
    return judge


def _reasons_of(first: Reasons, rest: tuple[Judge, ...], ctx: Mapping[str, Any], previous: Previous | None,
                *, held: bool) -> tuple[str, ...]:
    """``first``'s reasons, then those of the items of ``rest`` whose verdict is ``held``."""
    reasons = list(first())
    for item in rest:
        ok, why = item(ctx, previous)
        if ok is held:
            reasons.extend(why())
    return tuple(reasons)


def _not(item: Judge) -> Judge:
    """The opposite verdict; the reasons are the item's, in ``not (...)``."""
    def judge(ctx: Mapping[str, Any], previous: Previous | None) -> Judgement:
        ok, why = item(ctx, previous)
        return not ok, lambda: ("not (" + "; ".join(why()) + ")",)
    return judge


_NO_CONDITIONS = _fixed("no conditions")


def compile_condition(cond: Condition | None) -> Judge:
    """Turn a condition tree into one judge, once per rule (see :attr:`Rule.judge`).

    Matching many events against the same rules then pays neither for the type and operator
    dispatch nor for formatting reasons nobody reads.
    """
    if cond is None:
        return lambda ctx, previous: (True, _NO_CONDITIONS)
    if isinstance(cond, Check):
        if cond.op in _TRANSITION:
            return _transition(cond)
        if cond.op not in _SCALAR:
            raise ValueError(f"unknown operator {cond.op!r}")  # the loader rejects these: a bug if reached
        return _SCALAR[cond.op](cond, getter(cond.path))
    if isinstance(cond, All):
        return _all(tuple(compile_condition(item) for item in cond.items))
    if isinstance(cond, AnyOf):
        return _any(tuple(compile_condition(item) for item in cond.items))
    if isinstance(cond, Not):
        return _not(compile_condition(cond.item))
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
