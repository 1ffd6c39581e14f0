"""``rules check`` refuses what used to load silently: paths CVAT's payloads lack, formats CVAT lacks,
events CVAT never sends (issue 18, item 6)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from core.cvat_formats import format_problem, known_formats
from core.events import parse_event
from operations.cli import main
from receiver.rules import RulesError, load_rules, parse_rules
from receiver.rules.shapes import ADDED, TEMPLATE_ONLY, path_problem, shapes
from receiver.rules.templating import template_variables
from tests import make_cvat_formats, make_payload_shapes
from tests.conftest import PAYLOADS, ROOT
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer


def rules_text(on: str, condition: str = "", action: str = "{action: notify, url: 'http://x/', text: hi}") -> str:
    """A one-rule file listening to ``on`` with an optional ``if`` line and one action."""
    cond = f"    if: {{{condition}}}\n" if condition else ""
    return f"version: 1\nrules:\n  - id: r\n    on: {on}\n{cond}    do: [{action}]\n"


PATHS = [
    # (id, on, condition, severity or None, what the message says)
    ("without-resource", "update:job", "state: completed", "error", "(did you mean 'job.state'?"),
    ("typo-in-field", "update:job", "job.staet: completed", "error", "(did you mean 'job.state'?)"),
    ("below-a-value", "update:job", "job.state.name: x", "error", "a single value"),
    ("list-without-index", "update:task", "task.segments.jobs: x", "error", "task.segments.0.jobs"),
    ("other-resource", "update:job", "task.name: x", "error", "is not in CVAT's update:job payload"),
    ("unknown-new-field", "update:job", "job.review_round: 2", "warning", "ignore this only if your CVAT sends it"),
    ("typo-in-transition", "update:job", "job.stge: {became: acceptance}", "error", "'job.stage'"),
    ("typo-inside-not", "update:job", "not: {jobs.state: new}", "error", "is not in CVAT's update:job payload"),
    ("field", "update:job", "job.state: completed", None, ""),
    ("transition", "update:job", "job.state: {became: completed}", None, ""),
    ("nested-user", "update:job", "job.assignee.username: alice", None, ""),
    ("before-update-anything", "update:job", "before_update.assignee_id: 3", None, ""),
    ("changes-anything", "update:task", "changes.name.from: a", None, ""),
    ("request-of-completed", "'completed:request[export:*]'", "request.operation.format: COCO 1.0", None, ""),
    ("request-status", "'completed:request[create:task]'", "request.status: finished", None, ""),
    ("implied-ids", "update:job", "project_id: 1", None, ""),
    ("event-name", "'*'", "event: ping", None, ""),
    ("own-echo-flag", "update:job", "caused_by_cvat_hooks: false", None, ""),
    ("fits-one-of-the-events", "[update:job, update:task]", "job.state: completed", None, ""),
    ("wildcard-union", "'update:*'", "project.name: x", None, ""),
    ("labels-as-list-or-link", "create:task", "task.labels.0.name: car", None, ""),
    ("issue-job-id", "create:issue", "issue.job: 1", None, ""),
    ("ping-webhook", "ping", "webhook.events.0: create:task", None, ""),
]


@pytest.mark.parametrize(("on", "condition", "severity", "says"), [c[1:] for c in PATHS], ids=[c[0] for c in PATHS])
def test_condition_paths_are_held_to_the_payloads_cvat_sends(on: str, condition: str, severity: str | None,
                                                              says: str) -> None:
    """A path the rule's events do not carry is an error (a warning for a field a newer CVAT may add)."""
    text = rules_text(on, condition)
    if severity == "error":
        with pytest.raises(RulesError) as info:
            parse_rules(text)
        (problem,) = info.value.problems
        assert (problem.line, problem.rule_id, problem.severity) == (5, "r", "error")
        assert says in problem.message
    else:
        ruleset = parse_rules(text)
        assert [(w.line, w.message) for w in ruleset.warnings if says and says in w.message] == \
            ([(5, ruleset.warnings[0].message)] if severity == "warning" else [])
        assert len(ruleset.warnings) == (1 if severity == "warning" else 0)


def test_template_placeholders_are_checked_like_paths() -> None:
    """A placeholder the event cannot fill fails the load, with its action and parameter named."""
    action = "{action: notify, url: 'http://x/', text: 'job {job.task_nme} done on {date}'}"
    with pytest.raises(RulesError) as info:
        parse_rules(rules_text("update:job", action=action))
    assert str(info.value).startswith("rules.yaml:5: rule 'r': action #1: text: placeholder: path 'job.task_nme'")
    assert "(did you mean 'job.task_name'?)" in str(info.value)


def test_template_only_names_are_what_templates_add_to_conditions() -> None:
    """The names the checker lets only templates use are exactly those templating adds."""
    body = json.loads((PAYLOADS / "cvat-2.73" / "update_job_completed.json").read_text())["body_raw"]
    event = parse_event(body.encode())
    added = set(template_variables(event, now=datetime(2026, 1, 1, tzinfo=UTC))) - set(event.context())
    assert added == set(TEMPLATE_ONLY)
    assert set(event.context()) - set(event.payload) <= set(ADDED)


def test_template_only_names_and_environment_references_are_accepted() -> None:
    """``{delivery_id}``, ``{date}`` and ``${NAME}`` references load; ``{date}`` is no condition path."""
    action = ("{action: notify, url: '${SLACK_URL}', text: '{delivery_id} {date} {job_id}', "
              "headers: {Authorization: 'Bearer ${API_TOKEN}'}}")
    assert parse_rules(rules_text("update:job", action=action)).warnings == ()
    assert path_problem("date", ["update:job"]) is not None
    assert path_problem("date", ["update:job"], template=True) is None


FORMATS = [
    ("missing-version", "COCO", "(did you mean 'COCO 1.0' or 'COCO Keypoints 1.0'?)"),
    ("case", "cvat for images 1.1", "(did you mean 'CVAT for images 1.1'?)"),
    ("import-name-for-export", "CVAT 1.1", "not an export format of CVAT 2.73.0"),
]


@pytest.mark.parametrize(("fmt", "says"), [c[1:] for c in FORMATS], ids=[c[0] for c in FORMATS])
def test_export_format_cvat_lacks_is_a_load_error(fmt: str, says: str) -> None:
    """An export format name CVAT does not have fails the load with the closest names."""
    action = f"{{action: export, format: '{fmt}', to: 'exports/{{job_id}}.zip'}}"
    with pytest.raises(RulesError) as info:
        parse_rules(rules_text("update:job", action=action))
    assert str(info.value).startswith(f"rules.yaml:5: rule 'r': action #1 (export): format '{fmt}' is not an export")
    assert says in str(info.value)


def test_format_check_knows_import_from_export() -> None:
    """Import and export names differ in CVAT, so the one check takes the kind."""
    assert format_problem("export", "CVAT for images 1.1") is None
    assert format_problem("import", "CVAT 1.1") is None
    assert "(did you mean 'CVAT 1.1'?)" in str(format_problem("import", "CVAT for images 1.1"))
    assert "this CVAT server" in str(format_problem("export", "COCO 1.0", offered=["YOLO 1.1"]))
    with pytest.raises(ValueError, match="format kind"):
        format_problem("backup", "x")  # type: ignore[arg-type]


def test_shipped_rules_files_load_with_no_path_warnings() -> None:
    """The shipped rules.yaml and the benchmark's rules hold only paths CVAT sends."""
    for path in (ROOT / "rules.yaml", ROOT / "bench" / "rules_20.yaml"):
        ruleset = load_rules(path)
        assert [w for w in ruleset.warnings if "path " in w.message] == [], path


def test_payload_shapes_file_is_what_the_samples_give() -> None:
    """The shipped shapes are regenerated from tests/payloads (run tests/make_payload_shapes.py)."""
    shipped = (ROOT / "receiver" / "rules" / "payload_shapes.json").read_text(encoding="utf-8")
    assert shipped == make_payload_shapes.render()


def test_every_real_delivery_fits_its_shape() -> None:
    """Every path of every delivery in tests/payloads is a valid path for its event."""
    def leaves(value: Any, prefix: str = "") -> list[str]:
        if isinstance(value, dict) and value:
            return [p for k, v in value.items() for p in leaves(v, f"{prefix}{k}.")]
        if isinstance(value, list) and value:
            return [p for v in value for p in leaves(v, f"{prefix}0.")]
        return [prefix.rstrip(".")]

    bodies = make_payload_shapes.samples()
    assert len(bodies) >= 10
    for body in bodies:
        assert body["event"] in shapes()
        assert [p for p in leaves(body) if path_problem(p, [body["event"]]) is not None] == [], body["event"]


def test_shipped_formats_are_a_real_cvat_list() -> None:
    """The offline list is CVAT's: versioned names, import and export kept apart."""
    data = json.loads(make_cvat_formats.TARGET.read_text(encoding="utf-8"))
    assert data["cvat_version"] == "2.73.0" and make_cvat_formats.TARGET.name == "cvat_formats.json"
    assert {"COCO 1.0", "CVAT for images 1.1", "YOLO 1.1"} <= set(known_formats("export"))
    assert "CVAT 1.1" in known_formats("import") and "CVAT 1.1" not in known_formats("export")


def run_check(monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    """``cvat-hooks rules check ARGS`` through click, as a user runs it."""
    monkeypatch.delenv("CVAT_HOOKS_RULES", raising=False)
    return CliRunner().invoke(main, ["rules", "check", *args], catch_exceptions=False)


def test_rules_check_exits_1_naming_file_line_and_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI prints each problem as file:line: rule and exits non-zero."""
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text("update:jbo", "state: completed"), encoding="utf-8")
    result = run_check(monkeypatch, str(path))
    assert result.exit_code == 1
    assert f"{path}:4: rule 'r': on 'update:jbo' matches no CVAT event (did you mean 'update:job'?)" in result.output


def test_rules_check_online_uses_the_servers_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     cvat_server: CvatTestServer) -> None:
    """A format the shipped list has but the configured CVAT lacks passes offline and fails --online."""
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text("update:job", action="{action: export, format: PASCAL VOC 1.1, to: a.zip}"),
                    encoding="utf-8")
    monkeypatch.setenv("CVAT_URL", cvat_server.url)
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", DEFAULT_TOKEN)
    assert run_check(monkeypatch, str(path)).exit_code == 0
    result = run_check(monkeypatch, "--online", str(path))
    assert result.exit_code == 1
    assert f"{path}:5: rule 'r': action #1 (export): format 'PASCAL VOC 1.1' is not an export format of this " \
           "CVAT server" in result.output
    path.write_text(rules_text("update:job", action="{action: export, format: COCO 1.0, to: a.zip}"), encoding="utf-8")
    result = run_check(monkeypatch, "--online", str(path))
    assert result.exit_code == 0 and "(formats checked with CVAT)" in result.output
