"""Loading ``rules.yaml``: every problem reported at once, with file, line and rule id."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from core.retry import DEFAULT_BACKOFF, RetryPolicy
from receiver.rules import (
    All,
    AnyOf,
    Check,
    Not,
    RulesError,
    RuleSet,
    load_rules,
    parse_rules,
)

REPO = Path(__file__).resolve().parents[1]

FAKE_ACTIONS = {
    "export": {"required": {"to"}, "allowed": {"to", "resource", "format", "include_images"}},
    "check_labels": {"required": {"require"}, "allowed": {"require", "on_mismatch"}},
    "notify": {"required": {"url"}, "allowed": {"url", "message", "style"}},
    "update_job": {"required": set(), "allowed": {"stage", "state", "assignee"}},
}


def fake_validate(name: str, params: Mapping[str, Any]) -> list[str]:
    """Stands in for ``workers.actions.validate_params`` (the action modules are the workers')."""
    spec = FAKE_ACTIONS.get(name)
    if spec is None:
        return [f"unknown action {name!r} (known: {', '.join(sorted(FAKE_ACTIONS))})"]
    problems = [f"missing required parameter {p!r}" for p in sorted(spec["required"] - set(params))]
    problems += [f"unknown parameter {p!r}" for p in sorted(set(params) - spec["allowed"])]
    return problems


def load(text: str) -> RuleSet:
    """Parse rules text as ``rules.yaml`` with the fake action validator."""
    return parse_rules(text, "rules.yaml", validate_action=fake_validate)


def problems_of(text: str) -> RulesError:
    """The ``RulesError`` a text must raise."""
    with pytest.raises(RulesError) as info:
        load(text)
    return info.value


ISSUE_EXAMPLE = """\
version: 1
rules:
  - id: export-finished-jobs
    on: update:job
    if:
      job.state: {became: completed}
      job.stage: acceptance
    do:
      - action: export
        resource: job
        format: CVAT for images 1.1
        to: exports/{project_id}/{task_id}/job-{job_id}.zip
  - id: check-new-task-labels
    on: create:task
    do:
      - action: check_labels
        require: [car, person]
        on_mismatch: report
"""


@pytest.mark.parametrize("source", ["shipped", "issue"], ids=["shipped-rules-yaml", "issue-example"])
def test_example_rules_load_clean(source: str) -> None:
    """The shipped ``rules.yaml`` and the issue's example load with no problem and mean what they say."""
    if source == "shipped":
        rules = load_rules(REPO / "rules.yaml", validate_action=fake_validate)
    else:
        rules = load(ISSUE_EXAMPLE)
    assert rules.warnings == ()
    assert [r.id for r in rules.rules] == ["export-finished-jobs", "check-new-task-labels"]
    export, labels = rules.rules
    assert export.on == ("update:job",)
    assert export.condition == All((Check("job.state", "became", "completed"),
                                    Check("job.stage", "equals", "acceptance")))
    assert export.actions[0].action == "export"
    assert export.actions[0].params["to"] == "exports/{project_id}/{task_id}/job-{job_id}.zip"
    assert labels.condition is None
    assert labels.actions[0].params == {"require": ["car", "person"], "on_mismatch": "report"}
    assert rules.events_needed() == {"update:job", "create:job", "create:task"}
    assert len(rules.digest) == 64


# Each case: (id, text, line, message fragment). The rule is always 'r' unless the case is about ids.
HEAD = "version: 1\nrules:\n  - id: r\n    on: update:job\n"
DO = "    do:\n      - action: notify\n        url: http://x\n"


def when(cond: str) -> str:
    """Rule 'r' with ``if: {cond}`` (the condition is on line 6)."""
    return HEAD + f"    if:\n      {cond}\n" + DO


def doing(params: str) -> str:
    """Rule 'r' whose only action is notify with the given parameter lines (from line 7)."""
    return HEAD + "    do:\n      - action: notify\n" + params


ERROR_CASES = [
    ("unknown-top-key", "version: 1\nrules: []\nextra: 1\n", 3, "unknown top-level key 'extra'"),
    ("version-2", "version: 2\nrules: []\n", 1, "unsupported version 2"),
    ("version-true", "version: true\nrules: []\n", 1, "unsupported version True"),
    ("missing-version", "rules: []\n", 1, "missing 'version: 1'"),
    ("missing-rules", "version: 1\n", 1, "missing 'rules'"),
    ("rules-not-list", "version: 1\nrules: {a: 1}\n", 2, "'rules' must be a list"),
    ("not-a-mapping", "- 1\n", 1, "the file must be a mapping"),
    ("empty-file", "", None, "empty file"),
    ("rule-not-mapping", "version: 1\nrules:\n  - just text\n", 3, "rule #1: a rule must be a mapping"),
    ("unknown-rule-key", HEAD + DO + "    when: now\n", 8, "rule 'r': unknown key 'when'"),
    ("missing-id", "version: 1\nrules:\n  - on: update:job\n" + DO, 3, "rule #1: missing 'id'"),
    ("bad-slug", "version: 1\nrules:\n  - id: Bad Id\n    on: update:job\n" + DO, 3,
     "rule #1: id 'Bad Id' is not a slug"),
    ("missing-on", "version: 1\nrules:\n  - id: r\n" + DO, 3, "rule 'r': missing 'on'"),
    ("missing-do", HEAD, 3, "rule 'r': missing 'do'"),
    ("empty-do", HEAD + "    do: []\n", 5, "'do' must be a non-empty list"),
    ("empty-on-list", HEAD.replace("update:job", "[]") + DO, 4, "'on' must name at least one event"),
    ("duplicate-key", HEAD + "    on: create:task\n" + DO, 5, "duplicate key 'on' (first at line 4)"),
    ("action-not-mapping", HEAD + "    do:\n      - notify\n", 6, "action #1 must be a mapping"),
    ("missing-action", HEAD + "    do:\n      - url: http://x\n", 6, "action #1: missing 'action'"),
    ("unknown-action", HEAD + "    do:\n      - action: explode\n", 6,
     "action #1 (explode): unknown action 'explode'"),
    ("bad-action-params", HEAD + "    do:\n      - action: export\n        format: COCO 1.0\n", 6,
     "action #1 (export): missing required parameter 'to'"),
    ("unknown-operator", when("job.state: {eq: completed}"), 6,
     "rule 'r': unknown operator 'eq' on 'job.state' (known: equals, not_equals, in, not_in, regex, exists, "
     "gt, gte, lt, lte, changed, became, was)"),
    ("bad-regex", when("job.state: {regex: '(unclosed'}"), 6,
     "'regex' on 'job.state': bad regex '(unclosed'"),
    ("in-needs-list", when("job.state: {in: completed}"), 6, "'in' on 'job.state': expects a list"),
    ("exists-needs-bool", when("job.state: {exists: maybe}"), 6, "expects true or false"),
    ("changed-needs-bool", when("job.state: {changed: 1}"), 6, "expects true or false"),
    ("gt-needs-number", when("job.frame_count: {gt: [1]}"), 6,
     "expects a number or an ISO date string"),
    ("no-operator", when("job.state: {}"), 6, "no operator given for 'job.state'"),
    ("empty-if", HEAD + "    if: {}\n" + DO, 5, "a condition must be a non-empty mapping"),
    ("any-not-list", when("any: {job.state: new}"), 6, "'any' must be a non-empty list"),
    ("all-empty", when("all: []"), 6, "'all' must be a non-empty list"),
    ("not-not-mapping", when("not: [1]"), 6, "a condition must be a non-empty mapping"),
    ("bad-path", when("'job..state': new"), 6, "bad path 'job..state'"),
    ("nested-unknown-operator", when("any:\n        - not:\n            job.state: {is: new}"), 8,
     "unknown operator 'is' on 'job.state'"),
    ("transition-other-resource", when("task.status: {became: completed}"), 6,
     "'became' on 'task.status' can never match: the rule's events are about job"),
    ("bad-template", doing("        url: http://x/{job.__class__}\n"), 7,
     "action #1: url: placeholder {job.__class__}"),
    ("template-call", doing("        url: 'x'\n        message: ['{job.id()}']\n"), 8,
     "action #1: message: placeholder {job.id()} is not a dotted path"),
    ("template-nested-dict", doing("        url: x\n        style: {a: '{x:>3}'}\n"), 8,
     "action #1: style.a: placeholder {x:>3}"),
    ("retry-negative-attempts", HEAD + DO + "    retry: {attempts: -1}\n", 8,
     "retry attempts must be a whole number"),
    ("retry-bad-delay", HEAD + DO + "    retry: {attempts: 2, backoff: [5, -1]}\n", 8,
     "retry backoff delays must be numbers of seconds >= 0"),
    ("retry-backoff-not-list", HEAD + DO + "    retry: {backoff: 5}\n", 8, "retry backoff must be a list"),
    ("retry-unknown-key", HEAD + DO + "    retry: {attempts: 1, jitter: 0.5}\n", 8,
     "unknown retry key 'jitter'"),
    ("retry-not-mapping", HEAD + DO + "    retry: 3\n", 8, "'retry' must be a mapping"),
    ("retry-no-delays", HEAD + DO + "    retry: {attempts: 2, backoff: []}\n", 8, "at least one delay"),
]


@pytest.mark.parametrize(("text", "line", "message"), [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_errors_are_reported_with_line_and_rule(text: str, line: int | None, message: str) -> None:
    """Each kind of mistake is an error located at its line, with the rule it belongs to."""
    error = problems_of(text)
    where = f"rules.yaml:{line}: " if line is not None else "rules.yaml: "
    lines = str(error).splitlines()
    assert any(entry.startswith(where) and message in entry for entry in lines), lines


def test_duplicate_ids_name_the_first() -> None:
    """A second rule with an existing id is an error pointing at the first definition."""
    text = "version: 1\nrules:\n" + ("  - id: same\n    on: update:job\n" + DO) * 2
    error = problems_of(text)
    assert str(error) == "rules.yaml:8: rule 'same': duplicate id 'same' (first defined at line 3)"


MANY_PROBLEMS = """\
version: 1
rules:
  - id: export-finished-jobs
    on: update:job
    if:
      job.state: {eq: completed}
      job.stage: {regex: '[unclosed'}
    do:
      - action: export
        format: CVAT for images 1.1
  - id: second
    on: update:jbo
    do: []
  - id: export-finished-jobs
    on: create:task
    do:
      - action: teleport
"""


def test_every_problem_is_reported_at_once() -> None:
    """One load reports all errors (and the warnings) in line order, each with its rule id."""
    error = problems_of(MANY_PROBLEMS)
    assert [(p.line, p.rule_id, p.severity) for p in error.problems] == [
        (6, "export-finished-jobs", "error"),
        (7, "export-finished-jobs", "error"),
        (9, "export-finished-jobs", "error"),
        (12, "second", "error"),
        (13, "second", "error"),
        (14, "export-finished-jobs", "error"),
        (17, "export-finished-jobs", "error"),
    ]
    assert len(error.errors) == 7
    text = str(error).splitlines()
    assert text[0].startswith(
        "rules.yaml:6: rule 'export-finished-jobs': unknown operator 'eq' on 'job.state' (known: ")
    assert text[3] == "rules.yaml:12: rule 'second': on 'update:jbo' matches no CVAT event (did you mean 'update:job'?)"
    assert text[6] == ("rules.yaml:17: rule 'export-finished-jobs': action #1 (teleport): unknown action "
                       "'teleport' (known: check_labels, export, notify, update_job)")


SYNTAX_CASES = [
    ("bad-indent", "version: 1\nrules:\n  - id: r\n   on: x\n", 4),
    ("unclosed-flow", "version: 1\nrules: [\n", 3),
    ("tab", "version: 1\nrules:\n\t- id: r\n", 3),
    ("two-documents", "version: 1\n---\nversion: 1\n", 2),
]


@pytest.mark.parametrize(("text", "line"), [c[1:] for c in SYNTAX_CASES], ids=[c[0] for c in SYNTAX_CASES])
def test_yaml_syntax_error_is_a_rules_error_with_its_line(text: str, line: int) -> None:
    """Broken YAML is reported like any other problem: file, line, what is wrong."""
    error = problems_of(text)
    assert len(error.problems) == 1
    assert str(error).startswith(f"rules.yaml:{line}: YAML error: ")


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['true']", "!!python/name:os.system ''",
                                 "!custom x"], ids=["python-apply", "python-name", "custom-tag"])
def test_unsafe_tags_are_refused(tag: str) -> None:
    """Only safe YAML is read: Python tags and unknown tags are load errors, never executed."""
    error = problems_of(f"version: 1\nrules: []\nx: {tag}\n")
    assert str(error).startswith("rules.yaml:3: YAML error: ")


UNKNOWN_EVENTS = [
    ("typo", "created:taks", "(did you mean 'create:task'?)"),
    ("plural", "create:tasks", "(did you mean 'create:task' or 'create:issue'?)"),
    ("request-form", "completed:request[create_task]", "(did you mean 'completed:request[create:task]'"),
    ("ping-typo", "pong", "(did you mean 'ping'?)"),
    ("nothing-close", "zzz", "(see README.md, Rules reference: Events)"),
]


@pytest.mark.parametrize(("pattern", "hint"), [c[1:] for c in UNKNOWN_EVENTS], ids=[c[0] for c in UNKNOWN_EVENTS])
def test_unknown_event_is_an_error_with_the_closest_names(pattern: str, hint: str) -> None:
    """An ``on`` name that matches no CVAT event is refused, located, with the closest known names."""
    error = problems_of(HEAD.replace("update:job", f"[update:job, '{pattern}']") + DO)
    assert [p.severity for p in error.problems] == ["error"]
    assert str(error).startswith(f"rules.yaml:4: rule 'r': on '{pattern}' matches no CVAT event {hint}")


def test_broken_validator_is_reported_not_raised() -> None:
    """An action module that cannot be imported is a located problem, not a crash of the loader."""
    def broken(name: str, params: Mapping[str, Any]) -> list[str]:
        raise ImportError("No module named 'workers.actions.export'")

    with pytest.raises(RulesError) as info:
        parse_rules(HEAD + DO, "rules.yaml", validate_action=broken)
    expected = "rules.yaml:6: rule 'r': action #1 (notify): parameters could not be checked (ImportError"
    assert expected in str(info.value)


def test_validator_gets_params_without_action_key() -> None:
    """The action validator sees the parameters only, the ``action`` key removed."""
    seen: list[tuple[str, dict[str, Any]]] = []

    def spy(name: str, params: Mapping[str, Any]) -> list[str]:
        seen.append((name, dict(params)))
        return []

    parse_rules(HEAD + DO, "rules.yaml", validate_action=spy)
    assert seen == [("notify", {"url": "http://x"})]


CONDITION_CASES = [
    ("plain-value-is-equals", "job.stage: acceptance", Check("job.stage", "equals", "acceptance")),
    ("null", "job.assignee: null", Check("job.assignee", "equals", None)),
    ("several-operators-anded", "job.frame_count: {gt: 1, lt: 9}",
     All((Check("job.frame_count", "gt", 1), Check("job.frame_count", "lt", 9)))),
    ("in-list", "job.state: {in: [new, completed]}", Check("job.state", "in", ("new", "completed"))),
    ("any-and-not", "any:\n        - job.state: new\n        - not: {job.stage: annotation}",
     AnyOf((Check("job.state", "equals", "new"), Not(Check("job.stage", "equals", "annotation"))))),
    ("all", "all:\n        - job.state: new\n        - job_id: 1",
     All((Check("job.state", "equals", "new"), Check("job_id", "equals", 1)))),
]


@pytest.mark.parametrize(("cond", "expected"), [c[1:] for c in CONDITION_CASES],
                         ids=[c[0] for c in CONDITION_CASES])
def test_conditions_build_the_expected_tree(cond: str, expected: Any) -> None:
    """``if`` mappings become a tree of checks and ``all``/``any``/``not`` groups."""
    rules = load(when(cond))
    assert rules.rules[0].condition == expected


def test_regex_is_compiled_at_load() -> None:
    """A ``regex`` operand is compiled once, when the rules load."""
    rules = load(when("job.stage: {regex: '^acc'}"))
    condition = rules.rules[0].condition
    assert isinstance(condition, Check) and condition.pattern is not None
    assert condition.pattern.search("acceptance")


RETRY_CASES = [
    ("default", "", RetryPolicy()),
    ("both", "    retry: {attempts: 3, backoff: [5, 30, 120]}\n", RetryPolicy(3, (5, 30, 120))),
    ("backoff-only", "    retry: {backoff: [1, 2]}\n", RetryPolicy(2, (1, 2))),
    ("attempts-only", "    retry: {attempts: 2}\n", RetryPolicy(2, DEFAULT_BACKOFF)),
    ("no-retries", "    retry: {attempts: 0}\n", RetryPolicy(0)),
]


@pytest.mark.parametrize(("retry", "expected"), [c[1:] for c in RETRY_CASES], ids=[c[0] for c in RETRY_CASES])
def test_retry_policy(retry: str, expected: RetryPolicy) -> None:
    """``retry`` builds a ``RetryPolicy``; with only ``backoff``, one retry per listed delay."""
    assert load(HEAD + DO + retry).rules[0].retry == expected


ON_CASES = [
    ("wildcard-request", "'completed:request[export:*]'", {"completed:request[export:annotations]",
                                                           "completed:request[export:backup]",
                                                           "completed:request[export:dataset]"}),
    ("unquoted-brackets", "completed:request[export:*]", {"completed:request[export:annotations]",
                                                          "completed:request[export:backup]",
                                                          "completed:request[export:dataset]"}),
    ("list", "[update:job, create:task]", {"update:job", "create:task"}),
    ("ping-excluded", "[ping, delete:task]", {"delete:task"}),
    ("star-job", "'*:job'", {"create:job", "update:job", "delete:job"}),
]


TRANSITION_CASES = [
    ("became-job", "update:job", "job.state: {became: completed}", {"update:job", "create:job"}),
    ("changed-task-under-not", "update:task", "not: {task.status: {changed: true}}", {"update:task", "create:task"}),
    ("was-in-any", "update:project", "any: [{project.name: {was: a}}, {project.status: done}]",
     {"update:project", "create:project"}),
    ("plain-equals", "update:job", "job.state: completed", {"update:job"}),
    ("untracked-resource", "update:issue", "issue.resolved: {became: true}", {"update:issue"}),
]


@pytest.mark.parametrize(("on", "cond", "expected"), [c[1:] for c in TRANSITION_CASES],
                         ids=[c[0] for c in TRANSITION_CASES])
def test_a_watched_transition_subscribes_to_the_resources_creation(on: str, cond: str, expected: set[str]) -> None:
    """A rule comparing a job's (task's, project's) state with the previous one also needs its
    create:* event, so the state it was created in is known on CVAT 2.76+ (no before_update)."""
    assert load(when(cond).replace("update:job", on)).events_needed() == expected


@pytest.mark.parametrize(("on", "expected"), [c[1:] for c in ON_CASES], ids=[c[0] for c in ON_CASES])
def test_events_needed(on: str, expected: set[str]) -> None:
    """``events_needed`` is the union of the ``on`` patterns expanded to known events, ``ping`` left out."""
    rules = load(HEAD.replace("update:job", on) + DO)
    assert rules.warnings == ()
    assert rules.events_needed() == expected


def test_unquoted_on_key_is_read_as_on() -> None:
    """``on`` is YAML 1.1's boolean true to PyYAML; the loader still reads it as the ``on`` key."""
    rules = load(HEAD + DO)
    assert rules.rules[0].on == ("update:job",)


def test_missing_file_is_a_rules_error(tmp_path: Path) -> None:
    """A rules file that cannot be read fails like an invalid one, naming the path."""
    with pytest.raises(RulesError, match="cannot read the rules file"):
        load_rules(tmp_path / "absent.yaml", validate_action=fake_validate)


def test_default_validator_is_the_action_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an injected validator, ``workers.actions.validate_params`` checks the actions."""
    import workers.actions

    calls: list[str] = []

    def spy(name: str, params: Mapping[str, Any]) -> list[str]:
        calls.append(name)
        return []

    monkeypatch.setattr(workers.actions, "validate_params", spy)
    parse_rules(HEAD + DO, "rules.yaml")
    assert calls == ["notify"]
