"""Conditions and transitions: pure evaluation of a rule's ``if``, with the reasons it gives."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from core.events import Event, parse_event
from receiver.rules import (
    All,
    AnyOf,
    Check,
    Not,
    Previous,
    lookup,
    previous_from_payload,
    previous_without_state,
)
from receiver.rules.conditions import compile_condition, is_missing, same, show
from tests.judging import evaluate

PAYLOADS = Path(__file__).resolve().parent / "payloads"
"""Real CVAT deliveries (a copy of ``shared/cvat-payloads``)."""


def real_body(name: str) -> bytes:
    """The exact body of a delivery captured from CVAT 2.73."""
    return json.loads((PAYLOADS / "cvat-2.73" / f"{name}.json").read_text())["body_raw"].encode()


def real_event(name: str, *, strip_previous: bool = False) -> Event:
    """A captured delivery, optionally without ``before_update``/``changes`` (as newer CVAT sends)."""
    if not strip_previous:
        return parse_event(real_body(name))
    payload = json.loads(real_body(name))
    payload.pop("before_update", None)
    payload.pop("changes", None)
    return parse_event(json.dumps(payload).encode())


def check(path: str, op: str, value: Any) -> Check:
    """A single-operator condition, as the loader would build it."""
    return Check(path, op, value, re.compile(value) if op == "regex" else None)


CTX = {
    "event": "update:job",
    "job_id": 1,
    "job": {"state": "completed", "stage": "acceptance", "assignee": None, "frame_count": 5,
            "updated_date": "2026-11-22T17:39:11.960910Z", "resolved": False},
    "labels": [{"name": "car"}, {"name": "person"}],
}

SCALAR_CASES = [
    # (id, condition, expected)
    ("equals-hit", check("job.stage", "equals", "acceptance"), True),
    ("equals-miss", check("job.stage", "equals", "annotation"), False),
    ("equals-null", check("job.assignee", "equals", None), True),
    ("equals-bool-is-not-int", check("job.resolved", "equals", 0), False),
    ("equals-top-level-id", check("job_id", "equals", 1), True),
    ("equals-list-index", check("labels.1.name", "equals", "person"), True),
    ("not-equals-hit", check("job.stage", "not_equals", "annotation"), True),
    ("not-equals-miss", check("job.stage", "not_equals", "acceptance"), False),
    ("in-hit", check("job.state", "in", ("completed", "rejected")), True),
    ("in-miss", check("job.state", "in", ("new",)), False),
    ("not-in-hit", check("job.state", "not_in", ("new",)), True),
    ("not-in-miss", check("job.state", "not_in", ("completed",)), False),
    ("regex-search", check("job.stage", "regex", "^acc"), True),
    ("regex-miss", check("job.stage", "regex", "^ann"), False),
    ("regex-non-text", check("job.frame_count", "regex", "5"), False),
    ("exists-true", check("job.stage", "exists", True), True),
    ("exists-null-counts", check("job.assignee", "exists", True), True),
    ("exists-false-on-present", check("job.stage", "exists", False), False),
    ("gt-number", check("job.frame_count", "gt", 4), True),
    ("gte-number-equal", check("job.frame_count", "gte", 5), True),
    ("lt-number", check("job.frame_count", "lt", 5), False),
    ("lte-number", check("job.frame_count", "lte", 5), True),
    ("gt-iso-date", check("job.updated_date", "gt", "2026-11-22T00:00:00Z"), True),
    ("lt-iso-date", check("job.updated_date", "lt", "2026-01-01"), False),
    ("gt-type-mismatch", check("job.frame_count", "gt", "4"), False),
]


@pytest.mark.parametrize(("cond", "expected"), [c[1:] for c in SCALAR_CASES],
                         ids=[c[0] for c in SCALAR_CASES])
def test_scalar_operators(cond: Check, expected: bool) -> None:
    """Each operator compares the current value at its path as documented."""
    assert evaluate(cond, CTX).matched is expected


MISSING_CASES = [
    ("equals", None, False),
    ("not_equals", "x", False),
    ("in", ("x",), False),
    ("not_in", ("x",), False),
    ("regex", ".*", False),
    ("gt", 0, False),
    ("exists", True, False),
    ("exists", False, True),
]


@pytest.mark.parametrize(("op", "value", "expected"), MISSING_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in MISSING_CASES])
@pytest.mark.parametrize("path", ["job.nothing", "nothing.at.all", "labels.7.name", "job.stage.deeper"],
                         ids=["missing-key", "missing-root", "index-out-of-range", "through-a-string"])
def test_missing_path_is_a_non_match(path: str, op: str, value: Any, expected: bool) -> None:
    """A missing path never matches and never raises; only ``exists: false`` is true for it."""
    verdict = evaluate(check(path, op, value), CTX)
    assert verdict.matched is expected
    assert verdict.reasons


COMBINATOR_CASES = [
    ("all-true", All((check("job.stage", "equals", "acceptance"), check("job_id", "equals", 1))), True),
    ("all-one-false", All((check("job.stage", "equals", "acceptance"), check("job_id", "equals", 2))), False),
    ("any-one-true", AnyOf((check("job.stage", "equals", "x"), check("job_id", "equals", 1))), True),
    ("any-none-true", AnyOf((check("job.stage", "equals", "x"), check("job_id", "equals", 2))), False),
    ("not-false", Not(check("job.stage", "equals", "x")), True),
    ("not-true", Not(check("job.stage", "equals", "acceptance")), False),
    ("not-missing-includes-missing", Not(check("job.nothing", "equals", "x")), True),
    ("nested", All((AnyOf((check("job_id", "equals", 9), Not(check("job.state", "equals", "new")))),
                    check("labels.0.name", "in", ("car",)))), True),
    ("no-condition", None, True),
]


@pytest.mark.parametrize(("cond", "expected"), [c[1:] for c in COMBINATOR_CASES],
                         ids=[c[0] for c in COMBINATOR_CASES])
def test_all_any_not(cond: Any, expected: bool) -> None:
    """``all``/``any``/``not`` combine their items as boolean AND/OR/NOT."""
    assert evaluate(cond, CTX).matched is expected


REASON_CASES = [
    ("equals-miss", check("job.stage", "equals", "annotation"), "job.stage: 'acceptance' != 'annotation'"),
    ("equals-hit", check("job.stage", "equals", "acceptance"), "job.stage == 'acceptance'"),
    ("missing", check("job.nothing", "equals", 1), "job.nothing is missing from the event"),
    ("in", check("job.state", "in", ("new",)), "job.state: 'completed' not in [\"new\"]"),
    ("gt", check("job.frame_count", "gt", 9), "job.frame_count: 5 not > 9"),
]


@pytest.mark.parametrize(("cond", "reason"), [c[1:] for c in REASON_CASES], ids=[c[0] for c in REASON_CASES])
def test_reasons_say_why(cond: Check, reason: str) -> None:
    """A verdict carries a human-readable reason naming the path and the values compared."""
    assert evaluate(cond, CTX).reasons == (reason,)


MORE_REASON_CASES = [
    # Reasons are formatted lazily (only when asked for): these pin every operator's wording.
    ("exists", check("job.stage", "exists", True), ("job.stage exists",)),
    ("exists-missing", check("job.nothing", "exists", False), ("job.nothing is missing",)),
    ("not-equals", check("job.stage", "not_equals", "x"), ("job.stage: 'acceptance' != 'x'",)),
    ("regex-non-text", check("job.frame_count", "regex", "5"), ("job.frame_count: 5 is not text, cannot match /5/",)),
    ("regex-hit", check("job.stage", "regex", "^acc"), ("job.stage: 'acceptance' matches /^acc/",)),
    ("cannot-compare", check("job.frame_count", "gt", "4"), ("job.frame_count: cannot compare 5 > '4'",)),
    ("lte-hit", check("job.frame_count", "lte", 5), ("job.frame_count: 5 <= 5",)),
    ("all-fail-pass-fail", All((check("job_id", "equals", 2), check("job.stage", "equals", "acceptance"),
                                check("job.state", "equals", "new"))),
     ("job_id: 1 != 2", "job.state: 'completed' != 'new'")),
    ("any-fail-pass-pass", AnyOf((check("job_id", "equals", 2), check("job.stage", "equals", "acceptance"),
                                  check("job.frame_count", "gt", 1))),
     ("job.stage == 'acceptance'", "job.frame_count: 5 > 1")),
    ("any-none", AnyOf((check("job_id", "equals", 2), check("job.nothing", "equals", 1))),
     ("none of any: job_id: 1 != 2; job.nothing is missing from the event",)),
    ("not-all", Not(All((check("job_id", "equals", 2), check("job.stage", "equals", "x")))),
     ("not (job_id: 1 != 2; job.stage: 'acceptance' != 'x')",)),
    ("no-condition", None, ("no conditions",)),
]


@pytest.mark.parametrize(("cond", "reasons"), [c[1:] for c in MORE_REASON_CASES],
                         ids=[c[0] for c in MORE_REASON_CASES])
def test_reasons_of_every_operator_and_group(cond: Any, reasons: tuple[str, ...]) -> None:
    """Each operator's reason, and what ``all``/``any``/``not`` keep: an ``all`` that fails early still
    names every failing item, an ``any`` that holds early every holding one."""
    assert evaluate(cond, CTX).reasons == reasons


def test_failed_all_reports_only_the_failing_items() -> None:
    """A failed ``all`` explains itself by the items that failed, not the ones that held."""
    verdict = evaluate(All((check("job_id", "equals", 1), check("job.stage", "equals", "x"))), CTX)
    assert verdict.reasons == ("job.stage: 'acceptance' != 'x'",)


# -- transitions ------------------------------------------------------------------------------


def job_was(**fields: Any) -> Previous:
    """A last-seen snapshot of job 1 with the given fields."""
    return Previous("job", {"id": 1, "state": "new", "stage": "annotation", **fields}, "last-seen")


DONE, DATE, NEW_TASK = "update_job_completed", "update_job_only_updated_date", "create_task"
STALE, UNKNOWN = Previous("job", None, "stale"), Previous("job", None, "unknown")
CREATED = Previous("task", {}, "created")

TRANSITION_CASES = [
    # (id, payload, strip before_update/changes?, previous ("payload" = built from it), condition, expected)
    ("payload-became", DONE, False, "payload", check("job.state", "became", "completed"), True),
    ("payload-became-other", DONE, False, "payload", check("job.state", "became", "new"), False),
    ("payload-was", DONE, False, "payload", check("job.state", "was", "new"), True),
    ("payload-changed", DONE, False, "payload", check("job.stage", "changed", True), True),
    ("payload-unchanged-field", DONE, False, "payload", check("job.frame_count", "changed", False), True),
    ("only-date-no-became", DATE, False, "payload", check("job.state", "became", "new"), False),
    ("only-date-state-unchanged", DATE, False, "payload", check("job.state", "changed", False), True),
    ("only-date-date-changed", DATE, False, "payload", check("job.updated_date", "changed", True), True),
    ("last-seen-became", DONE, True, job_was(), check("job.state", "became", "completed"), True),
    ("last-seen-already-completed", DONE, True, job_was(state="completed"),
     check("job.state", "became", "completed"), False),
    ("last-seen-was", DONE, True, job_was(stage="validation"), check("job.stage", "was", "validation"), True),
    ("last-seen-only-date", DATE, True, job_was(), check("job.state", "changed", True), False),
    ("stale-no-became", DONE, True, STALE, check("job.state", "became", "completed"), False),
    ("stale-no-unchanged", DONE, True, STALE, check("job.state", "changed", False), False),
    ("unknown-no-changed", DONE, True, UNKNOWN, check("job.state", "changed", True), False),
    ("unknown-no-was", DONE, True, UNKNOWN, check("job.state", "was", "new"), False),
    ("no-previous-at-all", DONE, True, None, check("job.state", "became", "completed"), False),
    ("other-resource-path", DONE, False, "payload", check("task.status", "changed", True), False),
    ("top-level-id-not-a-field", DONE, False, "payload", check("job_id", "changed", False), False),
    ("created-became", NEW_TASK, False, CREATED, check("task.status", "became", "annotation"), True),
    ("created-was-nothing", NEW_TASK, False, CREATED, check("task.status", "was", "annotation"), False),
    ("created-null-field-changed", NEW_TASK, False, CREATED, check("task.assignee", "changed", True), True),
]


@pytest.mark.parametrize(("payload", "strip", "previous", "cond", "expected"),
                         [c[1:] for c in TRANSITION_CASES], ids=[c[0] for c in TRANSITION_CASES])
def test_transitions(payload: str, strip: bool, previous: Any, cond: Check, expected: bool) -> None:
    """``changed``/``became``/``was`` compare with the previous snapshot; unknown never matches."""
    event = real_event(payload, strip_previous=strip)
    if previous == "payload":
        previous = previous_from_payload(event)
        assert previous is not None
    assert evaluate(cond, event.context(), previous).matched is expected


def test_became_reason_names_old_value_and_source() -> None:
    """The reason of a transition tells the old value and which source decided."""
    event = real_event("update_job_completed")
    became = check("job.state", "became", "completed")
    verdict = evaluate(became, event.context(), previous_from_payload(event))
    assert verdict.reasons == ("job.state became 'completed' (was 'new', source: payload)",)


SEEN = Previous("job", {"state": "new", "stage": "acceptance", "frame_count": 5}, "last-seen")

TRANSITION_REASON_CASES = [
    ("changed", check("job.state", "changed", True), SEEN,
     "job.state changed from 'new' to 'completed' (source: last-seen)"),
    ("unchanged", check("job.stage", "changed", True), SEEN, "job.stage unchanged ('acceptance') (source: last-seen)"),
    ("became", check("job.state", "became", "completed"), SEEN,
     "job.state became 'completed' (was 'new', source: last-seen)"),
    ("not-became-still", check("job.stage", "became", "acceptance"), SEEN,
     "job.stage did not become 'acceptance' (still 'acceptance', source: last-seen)"),
    ("not-became-other", check("job.state", "became", "rejected"), SEEN,
     "job.state did not become 'rejected' (is 'completed', was 'new', source: last-seen)"),
    ("was", check("job.state", "was", "new"), SEEN,
     "job.state was 'new' (was 'new', now 'completed', source: last-seen)"),
    ("was-not", check("job.stage", "was", "annotation"), SEEN,
     "job.stage was not 'annotation' (was 'acceptance', now 'acceptance', source: last-seen)"),
    ("appeared", check("job.assignee", "changed", True), SEEN,
     "job.assignee changed from missing to null (source: last-seen)"),
    ("other-resource", check("task.status", "changed", True), SEEN,
     "task.status: changed only applies to fields of the event's job"),
    ("no-previous", check("job.state", "changed", True), None, "job.state: previous value unknown (no previous state)"),
    ("stale", check("job.state", "changed", True), STALE, "job.state: previous value unknown (source: stale)"),
]


@pytest.mark.parametrize(("cond", "previous", "reason"), [c[1:] for c in TRANSITION_REASON_CASES],
                         ids=[c[0] for c in TRANSITION_REASON_CASES])
def test_transition_reasons(cond: Check, previous: Previous | None, reason: str) -> None:
    """Every transition's reason names the old and new values, or why they are not known."""
    assert evaluate(cond, CTX, previous).reasons == (reason,)


def test_unknown_previous_reason_names_source() -> None:
    """When the previous state is unknown, the reason says so and names the source."""
    event = real_event("update_job_completed", strip_previous=True)
    verdict = evaluate(check("job.state", "became", "completed"), event.context(), STALE)
    assert "unknown" in verdict.reasons[0] and "stale" in verdict.reasons[0]


PREVIOUS_CASES = [
    # (id, payload dict, expected snapshot fields (None = no Previous))
    ("changes-and-before", "real:update_job_completed", {"state": "new", "stage": "annotation", "id": 1}),
    ("only-before-update", {"event": "update:task", "task": {"id": 3, "name": "new"},
                            "before_update": {"name": "old"}}, {"name": "old", "id": 3}),
    ("only-changes", {"event": "update:job", "job": {"id": 1, "state": "completed"},
                      "changes": {"state": {"from": "new", "to": "completed"}}}, {"state": "new", "id": 1}),
    ("changes-win", {"event": "update:job", "job": {"id": 1, "state": "completed"},
                     "before_update": {"state": "rejected"}, "changes": {"state": {"from": "new"}}},
     {"state": "new"}),
    ("neither", {"event": "update:job", "job": {"id": 1, "state": "completed"}}, None),
    ("create-has-none", "real:create_task", None),
    ("no-object", {"event": "update:job", "changes": {"state": {"from": "new"}}}, None),
]


@pytest.mark.parametrize(("payload", "expected"), [c[1:] for c in PREVIOUS_CASES],
                         ids=[c[0] for c in PREVIOUS_CASES])
def test_previous_from_payload(payload: Any, expected: dict[str, Any] | None) -> None:
    """CVAT's ``before_update``/``changes`` become a snapshot of the object as it was."""
    if isinstance(payload, str):
        event = real_event(payload.removeprefix("real:"))
    else:
        event = parse_event(json.dumps(payload).encode())
    previous = previous_from_payload(event)
    if expected is None:
        assert previous is None
        return
    assert previous is not None and previous.source == "payload" and previous.resource == event.resource
    assert previous.snapshot is not None
    assert {k: previous.snapshot.get(k) for k in expected} == expected


def test_previous_from_payload_does_not_touch_the_event() -> None:
    """Building the snapshot copies the object: the event's payload is unchanged."""
    event = real_event("update_job_completed")
    before = json.dumps(event.payload, sort_keys=True)
    previous_from_payload(event)
    assert json.dumps(event.payload, sort_keys=True) == before


WITHOUT_STATE_CASES = [
    ("update-with-payload", "update_job_completed", False, "payload"),
    ("update-without", "update_job_completed", True, "unknown"),
    ("create", "create_task", False, "created"),
]


@pytest.mark.parametrize(("payload", "strip", "source"), [c[1:] for c in WITHOUT_STATE_CASES],
                         ids=[c[0] for c in WITHOUT_STATE_CASES])
def test_previous_without_state(payload: str, strip: bool, source: str) -> None:
    """Without the receiver's own state: the payload's previous values, empty for a create, else unknown."""
    assert previous_without_state(real_event(payload, strip_previous=strip)).source == source


LOOKUP_CASES = [
    ("nested", "job.state", "completed"),
    ("index", "labels.0.name", "car"),
    ("null-value", "job.assignee", None),
    ("missing", "job.nope", "MISSING"),
    ("index-into-dict", "job.0", "MISSING"),
]


@pytest.mark.parametrize(("path", "expected"), [c[1:] for c in LOOKUP_CASES],
                         ids=[c[0] for c in LOOKUP_CASES])
def test_lookup(path: str, expected: Any) -> None:
    """Dotted paths walk dicts by key and lists by digit; anything else is missing."""
    value = lookup(CTX, path)
    assert ("MISSING" if is_missing(value) else value) == expected


class Frozen(Mapping[str, Any]):
    """A mapping that is not a dict: lookups must not rely on the fast path for plain dicts."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


@pytest.mark.parametrize("path", ["job.state", "labels.1.name", "labels.9.name", "labels.x", "job.state.x",
                                  "job.nothing", "nothing", "job_id", "job.0", "wrapped.job.stage",
                                  "wrapped.labels.0.name", "wrapped.nothing"])
def test_lookup_through_any_mapping_and_lists(path: str) -> None:
    """Paths walk plain dicts, other mappings and lists alike (the fast path for dicts changes nothing)."""
    ctx = {**CTX, "wrapped": Frozen({"job": Frozen(CTX["job"]), "labels": CTX["labels"]})}
    plain = lookup(CTX, path.removeprefix("wrapped."))
    value = lookup(ctx, path)
    assert (is_missing(value), value if not is_missing(value) else None) == \
           (is_missing(plain), plain if not is_missing(plain) else None)
    assert evaluate(check(path, "exists", True), ctx).matched is not is_missing(value)


@pytest.mark.parametrize("value", [None, True, False, 0, -7, 2 ** 62, 1.5, float("nan"), "text", [1, "a", None],
                                   {"b": 1, "a": [True]}, "x" * 100, list(range(40))],
                         ids=lambda v: type(v).__name__)
def test_show_writes_values_as_json(value: Any) -> None:
    """A value in a reason reads as JSON (text as a Python literal), cut at 80 characters."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    assert show(value) == (text if len(text) <= 80 else text[:77] + "...")


def test_compiled_condition_gives_every_reason_once_asked() -> None:
    """A rule's compiled judge gives the verdict at once and the whole decision's reasons when asked."""
    cond = All((AnyOf((check("job_id", "equals", 9), Not(check("job.state", "equals", "new")))),
                check("labels.0.name", "in", ("car",)), check("job.state", "changed", True)))
    ok, why = compile_condition(cond)(CTX, job_was())
    assert ok and why() == (
        "not (job.state: 'completed' != 'new')",
        "labels.0.name: 'car' in [\"car\"]",
        "job.state changed from 'new' to 'completed' (source: last-seen)",
    )


@pytest.mark.parametrize(("a", "b", "expected"), [(True, 1, False), (1, 1.0, True), (None, None, True),
                                                   (False, False, True), ("1", 1, False)],
                         ids=["bool-vs-int", "int-vs-float", "nulls", "bools", "text-vs-number"])
def test_same_keeps_booleans_apart(a: Any, b: Any, expected: bool) -> None:
    """Rule equality does not treat ``true`` as ``1`` the way Python does."""
    assert same(a, b) is expected
