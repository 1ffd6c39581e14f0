"""Matching real CVAT deliveries against rules: which rules fire, why, and the actions they plan."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import cvat_events
from core.events import Event, parse_event
from core.retry import RetryPolicy
from receiver.rules import (
    ActionDecl,
    All,
    AnyOf,
    Check,
    Not,
    Previous,
    Rule,
    RuleSet,
    explain,
    load_rules,
    match,
    parse_rules,
    previous_from_payload,
)
from tests.judging import evaluate

REPO = Path(__file__).resolve().parents[1]
PAYLOADS = Path(__file__).resolve().parent / "payloads"
"""Real CVAT deliveries (a copy of ``shared/cvat-payloads``)."""
NOW = datetime(2026, 11, 22, 17, 40, tzinfo=UTC)


@dataclass(frozen=True)
class FakeSpec:
    """What matching reads of an action: its queue and its path parameters."""

    queue: str
    path_params: frozenset[str] = frozenset()
    secret_params: frozenset[str] = frozenset()


ACTIONS = {
    "export": FakeSpec("exports", frozenset({"to"})),
    "check_labels": FakeSpec("light"),
    "notify": FakeSpec("light"),
    "update_job": FakeSpec("light"),
}


def fake_validate(name: str, params: Mapping[str, Any]) -> list[str]:
    """Knows the four actions; ``export`` requires ``to``."""
    if name not in ACTIONS:
        return [f"unknown action {name!r}"]
    return ["missing required parameter 'to'"] if name == "export" and "to" not in params else []


def shipped() -> RuleSet:
    """The repository's ``rules.yaml``."""
    return load_rules(REPO / "rules.yaml", validate_action=fake_validate)


def rules(text: str) -> RuleSet:
    """Rules from text, validated with the fake validator."""
    return parse_rules(text, "rules.yaml", validate_action=fake_validate)


def real_event(name: str, *, strip_previous: bool = False, **job: Any) -> Event:
    """A delivery captured from CVAT 2.73, optionally without its old values or with job fields changed."""
    body = json.loads((PAYLOADS / "cvat-2.73" / f"{name}.json").read_text())["body_raw"].encode()
    if not strip_previous and not job:
        return parse_event(body)
    payload = json.loads(body)
    if strip_previous:
        payload.pop("before_update", None)
        payload.pop("changes", None)
    payload.get("job", {}).update(job)
    return parse_event(json.dumps(payload).encode())


def last_seen(**fields: Any) -> Previous:
    """What the receiver last saw of job 1 (in annotation, new, unless told otherwise)."""
    return Previous("job", {"id": 1, "stage": "annotation", "state": "new", **fields}, "last-seen")


SHIPPED_CASES = [
    # (id, payload, strip before_update/changes?, previous ("payload" = from the payload), rules matched)
    ("completed-via-payload-changes", "update_job_completed", False, "payload", ["export-finished-jobs"]),
    ("only-updated-date", "update_job_only_updated_date", False, "payload", []),
    ("completed-via-last-seen", "update_job_completed", True, last_seen(), ["export-finished-jobs"]),
    ("completed-again-last-seen", "update_job_completed", True, last_seen(state="completed"), []),
    ("only-date-via-last-seen", "update_job_only_updated_date", True, last_seen(), []),
    ("stale", "update_job_completed", True, Previous("job", None, "stale"), []),
    ("unknown", "update_job_completed", True, Previous("job", None, "unknown"), []),
    ("no-previous", "update_job_completed", True, None, []),
    ("create-task", "create_task", False, Previous("task", {}, "created"), ["check-new-task-labels"]),
    ("ping", "ping", False, None, []),
    ("issue", "create_issue", False, Previous("issue", {}, "created"), []),
    ("request", "completed_request_create_task", False, None, []),
]


@pytest.mark.parametrize(("payload", "strip", "previous", "expected"), [c[1:] for c in SHIPPED_CASES],
                         ids=[c[0] for c in SHIPPED_CASES])
def test_shipped_rules_on_real_deliveries(payload: str, strip: bool, previous: Any,
                                          expected: list[str]) -> None:
    """The shipped rules fire exactly when the issue says, from CVAT's old values or the receiver's own."""
    event = real_event(payload, strip_previous=strip)
    if previous == "payload":
        previous = previous_from_payload(event)
    assert [m.rule_id for m in match(shipped(), event, previous, NOW, actions=ACTIONS)] == expected


def test_export_action_is_planned_rendered() -> None:
    """A matched rule's actions come rendered, with their queue, index and the rule's retry policy."""
    event = real_event("update_job_completed")
    [found] = match(shipped(), event, previous_from_payload(event), NOW, actions=ACTIONS)
    assert found.errors == ()
    assert found.reasons == (
        "event update:job matches on 'update:job'",
        "job.state became 'completed' (was 'new', source: payload)",
        "job.stage == 'acceptance'",
    )
    [action] = found.actions
    assert action.index == 0 and action.action == "export" and action.queue == "exports"
    assert action.params == {
        "resource": "job", "format": "CVAT for images 1.1", "to": "exports/1/2/job-1.zip"}
    assert action.retry == RetryPolicy(3, (5, 30, 120))


def test_explain_covers_every_rule() -> None:
    """``explain`` gives every rule's verdict and reasons, including rules whose ``on`` did not match."""
    event = real_event("update_job_only_updated_date")
    verdicts = explain(shipped(), event, previous_from_payload(event), NOW, actions=ACTIONS)
    assert [(v.rule_id, v.matched, v.match) for v in verdicts] == [
        ("export-finished-jobs", False, None), ("check-new-task-labels", False, None)]
    assert verdicts[0].reasons == (
        "event update:job matches on 'update:job'",
        "job.state did not become 'completed' (still 'new', source: payload)",
        "job.stage: 'annotation' != 'acceptance'",
    )
    assert verdicts[1].reasons[0].startswith("event update:job not in on")


MULTI = """\
version: 1
rules:
  - id: first
    on: ['update:*']
    do:
      - action: notify
        url: http://hooks.example/{job.id}
      - action: export
        to: exports/{job.nope}/x.zip
      - action: export
        to: exports/{job.task_name}/{date}/{event}.zip
  - id: never
    on: delete:task
    do:
      - action: notify
        url: http://x
  - id: exports-done
    on: 'completed:request[export:*]'
    if:
      request.status: finished
      request.operation.format: {regex: '^CVAT'}
    do:
      - action: notify
        url: http://x/{request.operation.task_id}/{delivery_id}
  - id: pinged
    on: ping
    do:
      - action: notify
        url: http://x/{webhook.id}
  - id: last
    on: '*'
    if:
      any:
        - job_id: 1
        - task_id: 2
        - project_id: 1
    do:
      - action: update_job
"""


def test_one_bad_placeholder_fails_only_its_action() -> None:
    """A placeholder missing from the event is an error of its action; the rule's other actions go ahead."""
    event = real_event("update_job_completed")
    found = match(rules(MULTI), event, None, NOW, actions=ACTIONS)
    assert [m.rule_id for m in found] == ["first", "last"]
    first = found[0]
    assert [a.index for a in first.actions] == [0, 2]
    assert first.errors == ("action #2 (export): placeholder {job.nope} not found in the event",)
    assert first.actions[0].params == {"url": "http://hooks.example/1"}
    assert first.actions[1].params == {"to": "exports/wh-task-1-renamed/2026-11-22/update:job.zip"}


TRAVERSAL_CASES = [
    ("dotdot", "../../etc", "exports/.._.._etc/2026-11-22/update:job.zip"),
    ("absolute", "/etc/cron.d", "exports/_etc_cron.d/2026-11-22/update:job.zip"),
    ("dot", ".", "exports/_/2026-11-22/update:job.zip"),
    ("nul", "a\x00/b", "exports/a_b/2026-11-22/update:job.zip"),
]


@pytest.mark.parametrize(("name", "expected"), [c[1:] for c in TRAVERSAL_CASES],
                         ids=[c[0] for c in TRAVERSAL_CASES])
def test_payload_cannot_escape_a_path_param(name: str, expected: str) -> None:
    """A hostile value in the payload is neutralised when rendered into a path parameter."""
    event = real_event("update_job_completed", task_name=name)
    first = match(rules(MULTI), event, None, NOW, actions=ACTIONS)[0]
    assert first.actions[1].params["to"] == expected


EVENT_CASES = [
    ("export-request", "completed_request_export_annotations", ["exports-done", "last"]),
    ("create-request", "completed_request_create_task", ["last"]),
    ("ping", "ping", ["pinged", "last"]),
    ("create-task", "create_task", ["last"]),
    ("create-issue", "create_issue", ["last"]),
]


@pytest.mark.parametrize(("payload", "expected"), [c[1:] for c in EVENT_CASES],
                         ids=[c[0] for c in EVENT_CASES])
def test_patterns_and_order(payload: str, expected: list[str]) -> None:
    """Wildcards (``[``/``]`` literal), ``ping`` and ``*`` select rules, reported in file order."""
    found = match(rules(MULTI), real_event(payload), None, NOW, actions=ACTIONS)
    assert [m.rule_id for m in found] == expected
    assert all(m.errors == () for m in found if m.rule_id != "first")


def test_request_rule_renders_delivery_id() -> None:
    """``{delivery_id}`` and ids nested in a request's operation render into parameters."""
    event = real_event("completed_request_export_annotations")
    found = match(rules(MULTI), event, None, NOW, actions=ACTIONS)[0]
    assert found.actions[0].params == {"url": f"http://x/2/{event.delivery_id}"}


def test_unregistered_action_is_an_error_of_the_match() -> None:
    """An action the registry does not know (yet) is recorded against its match, not raised."""
    event = real_event("create_task")
    [found] = match(shipped(), event, Previous("task", {}, "created"), NOW, actions={})
    assert found.actions == ()
    assert found.errors == ("action #1 (check_labels): no such action is registered",)


def test_default_registry_gives_queues_and_path_params() -> None:
    """Without an injected registry, ``workers.actions.REGISTRY`` supplies queues and path params."""
    from workers.actions import REGISTRY

    event = real_event("update_job_completed", task_name="../x")
    first = match(rules(MULTI), event, None, NOW)[0]
    assert first.actions[1].queue == REGISTRY["export"].queue
    assert first.actions[1].params["to"].startswith("exports/.._x/")


PATTERN_CASES = [
    ("exact", "update:job", "update:job", True),
    ("exact-other", "update:job", "update:task", False),
    ("star-action", "update:*", "update:job", True),
    ("star-crosses-colon", "completed:*", "completed:request[export:backup]", True),
    ("brackets-literal", "completed:request[export:*]", "completed:request[export:annotations]", True),
    ("brackets-not-a-class", "completed:request[e]", "completed:requeste", False),
    ("question-mark-literal", "update:jo?", "update:job", False),
    ("star-resource", "*:task", "delete:task", True),
    ("star-all", "*", "ping", True),
    ("anchored", "update:*", "xupdate:job", False),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), [c[1:] for c in PATTERN_CASES],
                         ids=[c[0] for c in PATTERN_CASES])
def test_on_patterns(pattern: str, name: str, expected: bool) -> None:
    """``*`` is the only wildcard; ``[``, ``]`` and ``?`` are literal characters of event names."""
    assert cvat_events.matches(pattern, name) is expected


EXPAND_CASES = [
    ("exports", "completed:request[export:*]", ["completed:request[export:annotations]",
                                                "completed:request[export:backup]",
                                                "completed:request[export:dataset]"]),
    ("organization", "*:organization", ["create:organization", "delete:organization", "update:organization"]),
    ("invitations", "*:invitation", ["create:invitation", "delete:invitation"]),
    ("memberships", "*:membership", ["create:membership", "delete:membership", "update:membership"]),
    ("ping", "ping", ["ping"]),
    ("typo", "update:jbo", []),
]


@pytest.mark.parametrize(("pattern", "expected"), [c[1:] for c in EXPAND_CASES],
                         ids=[c[0] for c in EXPAND_CASES])
def test_expand(pattern: str, expected: list[str]) -> None:
    """A pattern expands to the known CVAT event names it covers."""
    assert cvat_events.expand(pattern) == expected


def test_event_names_cover_a_real_project_webhook() -> None:
    """Every event a real CVAT 2.73 project webhook subscribes to (its ping lists them) is known."""
    ping = json.loads(json.loads((PAYLOADS / "cvat-2.73" / "ping.json").read_text())["body_raw"])
    subscribed = ping["webhook"]["events"]
    assert subscribed and set(subscribed) <= set(cvat_events.EVENT_NAMES)
    assert set(subscribed) == set(cvat_events.PROJECT_EVENTS)
    assert "ping" in cvat_events.EVENT_NAMES and "update:*" not in cvat_events.EVENT_NAMES


# -- match is explain's matches, over generated rules -----------------------------------------------

GEN_PATHS = ["job.state", "job.stage", "job.type", "job.frame_count", "job.assignee", "job.assignee.username",
             "job_id", "project_id", "task_id", "event", "job.task_name", "job.updated_date", "job.nothing",
             "job.issues.count", "job.0", "task.name", "task.status", "request.status", "request.operation.format",
             "webhook.id", "issue.resolved", "nothing.at.all"]
GEN_VALUES = [None, True, False, 0, 1, 2, 5, 500, 1.0, "completed", "new", "acceptance", "annotation", "rejected",
              "in progress", "ground_truth", "2026-11-22T00:00:00Z", "", "finished", "x", [1, 2], {"a": 1}]
GEN_REGEXES = ["^acc", "comp", "", "^$", "[0-9]+", "renamed$"]
GEN_ON = ["update:job", "update:*", "*", "create:task", "completed:request[export:*]", "ping", "*:task",
          "update:task", "create:issue", "completed:*"]
GEN_DO = [("notify", {"url": "http://x/{job_id}", "text": "{job.state} {event} {date}"}),
          ("export", {"to": "exports/{task_id}/{job.task_name}.zip", "format": "CVAT"}),
          ("update_job", {}), ("check_labels", {"require": ["car", "{job.nope}"]}), ("unknown", {})]
GEN_CAPTURES = ["update_job_completed", "update_job_only_updated_date", "create_task", "create_issue", "ping",
                "completed_request_export_annotations", "completed_request_create_task"]

paths, values = st.sampled_from(GEN_PATHS), st.sampled_from(GEN_VALUES)
gen_checks = st.one_of(
    st.builds(Check, paths, st.sampled_from(["equals", "not_equals", "gt", "gte", "lt", "lte", "became", "was"]),
              values),
    st.builds(lambda p, op, vs: Check(p, op, tuple(vs)), paths, st.sampled_from(["in", "not_in"]),
              st.lists(values, max_size=3)),
    st.builds(lambda p, r: Check(p, "regex", r, re.compile(r)), paths, st.sampled_from(GEN_REGEXES)),
    st.builds(Check, paths, st.sampled_from(["exists", "changed"]), st.booleans()),
)
gen_conditions = st.recursive(gen_checks, lambda inner: st.one_of(
    st.builds(All, st.lists(inner, max_size=3).map(tuple)),
    st.builds(AnyOf, st.lists(inner, max_size=3).map(tuple)),
    st.builds(Not, inner),
), max_leaves=8)
gen_rules = st.builds(
    lambda i, on, cond, do: Rule(f"r{i}", tuple(on), cond,
                                 tuple(ActionDecl(n, name, params) for n, (name, params) in enumerate(do))),
    st.integers(0, 99), st.lists(st.sampled_from(GEN_ON), min_size=1, max_size=2, unique=True),
    st.none() | gen_conditions, st.lists(st.sampled_from(GEN_DO), max_size=3))
gen_job_fields = st.fixed_dictionaries({}, optional={
    "state": st.sampled_from(["new", "in progress", "completed", "rejected"]),
    "stage": st.sampled_from(["annotation", "validation", "acceptance"]),
    "type": st.sampled_from(["annotation", "ground_truth"]),
    "frame_count": st.sampled_from([5, 500, "5"]),
    "assignee": st.sampled_from([None, {"username": "alice"}]),
})


@st.composite
def gen_previous(draw: st.DrawFn, event: Event) -> Previous | None:
    """Every kind of previous state the receiver can hand to matching."""
    kind = draw(st.sampled_from(["none", "payload", "created", "stale", "no-resource", "last-seen"]))
    if kind == "none":
        return None
    if kind == "payload":
        return previous_from_payload(event)
    if kind == "last-seen":
        return Previous(event.resource, draw(gen_job_fields), "last-seen")
    resource = None if kind == "no-resource" else event.resource
    return Previous(resource, {} if kind == "created" else None, kind)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rule_list=st.lists(gen_rules, min_size=1, max_size=6), capture=st.sampled_from(GEN_CAPTURES),
       strip=st.booleans(), job=gen_job_fields, data=st.data())
def test_match_is_what_explain_reports(rule_list: list[Rule], capture: str, strip: bool, job: dict[str, Any],
                                       data: st.DataObject) -> None:
    """``match`` (no reasons for rules that do not fire, rules filtered by event name) gives exactly
    the matches ``explain`` reports, reasons and rendered actions included, and each explanation's
    reasons are its condition's :func:`evaluate` reasons after the ``on`` line."""
    event = real_event(capture, strip_previous=strip, **job)
    previous = data.draw(gen_previous(event))
    ruleset = RuleSet(1, tuple(rule_list), "generated")
    explained = explain(ruleset, event, previous, NOW, actions=ACTIONS)
    assert match(ruleset, event, previous, NOW, actions=ACTIONS) == [e.match for e in explained if e.match]
    for rule, verdict in zip(ruleset.rules, explained, strict=True):
        if rule.matching_pattern(event.name) is not None:
            expected = evaluate(rule.condition, event.context(), previous)
            assert (verdict.matched, verdict.reasons[1:]) == (expected.matched, expected.reasons)


def test_rules_for_is_remembered_per_event_name() -> None:
    """``RuleSet.rules_for`` lists the rules whose ``on`` covers a name, with the pattern, and reuses it."""
    ruleset = rules(MULTI)
    found = ruleset.rules_for("update:job")
    assert [(r.id, p) for r, p in found] == [("first", "update:*"), ("last", "*")]
    assert ruleset.rules_for("update:job") is found
    assert [r.id for r, _ in ruleset.rules_for("ping")] == ["pinged", "last"]
    assert [r.id for r, _ in ruleset.rules_for("made:up")] == ["last"]
    assert ruleset == rules(MULTI), "the memo is not part of the rule set's value"
