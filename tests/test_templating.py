"""Templating: ``{path}`` placeholders, checked at load, rendered safely (path params made path-safe)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from core.events import parse_event
from receiver.rules import (
    RenderError,
    TemplateError,
    check_template,
    path_safe,
    render,
    render_params,
    template_variables,
)
from receiver.rules.templating import Placeholder, parse_template

VARS = {
    "event": "update:job",
    "project_id": 1,
    "task_id": 2,
    "job": {"id": 7, "state": "completed", "assignee": None, "resolved": False, "done": True, "ratio": 0.5},
    "labels": [{"name": "car"}, {"name": "person"}],
    "task": {"name": "../../etc"},
    "obj": {"a": [1, 2]},
}

VALID_TEMPLATES = [
    ("plain", "exports/all.zip", ("exports/all.zip",)),
    ("one", "job-{job.id}.zip", ("job-", Placeholder("job.id"), ".zip")),
    ("digits", "{labels.0.name}", (Placeholder("labels.0.name"),)),
    ("escaped-braces", "{{literal}} {task_id}", ("{literal} ", Placeholder("task_id"))),
    ("adjacent", "{project_id}{task_id}", (Placeholder("project_id"), Placeholder("task_id"))),
    ("empty", "", ()),
]


@pytest.mark.parametrize(("text", "parts"), [c[1:] for c in VALID_TEMPLATES],
                         ids=[c[0] for c in VALID_TEMPLATES])
def test_parse_valid_templates(text: str, parts: tuple[Any, ...]) -> None:
    """Literal text, dotted placeholders and doubled braces parse into their parts."""
    assert parse_template(text) == parts
    assert check_template(text) is None


INVALID_TEMPLATES = [
    ("attribute-dunder", "{job.__class__}", "'__'"),
    ("call", "{job.id()}", "calls are not allowed"),
    ("indexing", "{labels[0]}", "instead of indexing"),
    ("format-spec", "{job.id:>10}", "format specs"),
    ("conversion", "{job.id!r}", "format specs"),
    ("expression", "{job.id + 1}", "dotted path"),
    ("empty-placeholder", "a{}b", "dotted path"),
    ("positional", "{0}", "must start with a name"),
    ("empty-segment", "{job..id}", "dotted path"),
    ("unclosed", "exports/{job.id", "unclosed"),
    ("nested", "{a{b}}", "unclosed"),
    ("single-close", "exports}/x", "single '}'"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in INVALID_TEMPLATES],
                         ids=[c[0] for c in INVALID_TEMPLATES])
def test_unsafe_or_malformed_templates_are_rejected(text: str, message: str) -> None:
    """Anything but a dotted path of names and digits is refused before any event arrives."""
    with pytest.raises(TemplateError, match=message.replace("(", r"\(")):
        parse_template(text)
    problem = check_template(text)
    assert problem is not None and message in problem


RENDER_CASES = [
    ("text", "state={job.state}", "state=completed"),
    ("number", "job-{job.id}.zip", "job-7.zip"),
    ("float", "{job.ratio}", "0.5"),
    ("null", "{job.assignee}", "none"),
    ("false", "{job.resolved}", "false"),
    ("true", "{job.done}", "true"),
    ("list-index", "{labels.1.name}", "person"),
    ("structure-as-json", "{obj}", '{"a":[1,2]}'),
    ("braces", "{{{task_id}}}", "{2}"),
    ("top-level-ids", "{project_id}/{task_id}", "1/2"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in RENDER_CASES],
                         ids=[c[0] for c in RENDER_CASES])
def test_render(text: str, expected: str) -> None:
    """Placeholders are replaced by their values' text (``none``, ``true``/``false``, JSON)."""
    assert render(text, VARS) == expected


@pytest.mark.parametrize("text", ["{job.nope}", "{missing}", "{labels.5.name}", "{job.state.deeper}"],
                         ids=["missing-field", "missing-root", "index-out-of-range", "through-text"])
def test_render_missing_placeholder(text: str) -> None:
    """A placeholder whose path the event lacks raises ``RenderError`` naming it."""
    with pytest.raises(RenderError, match=r"placeholder \{.*\} not found in the event"):
        render(text, VARS)


PATH_SAFE_CASES = [
    ("traversal", "../../etc", ".._.._etc"),
    ("slash", "a/b", "a_b"),
    ("backslash", "a\\b", "a_b"),
    ("dot", ".", "_"),
    ("dotdot", "..", "_"),
    ("empty", "", "_"),
    ("nul-and-controls", "a\x00b\nc\x1b\x7f", "abc"),
    ("only-controls", "\x00\x00", "_"),
    ("control-then-dots", "\n..", "_"),
    ("absolute", "/etc/passwd", "_etc_passwd"),
    ("harmless", "job-1 (final).zip", "job-1 (final).zip"),
    ("unicode", "Straße", "Straße"),
]


@pytest.mark.parametrize(("value", "expected"), [c[1:] for c in PATH_SAFE_CASES],
                         ids=[c[0] for c in PATH_SAFE_CASES])
def test_path_safe(value: str, expected: str) -> None:
    """A substituted value cannot add a directory, climb out of one, or smuggle control characters."""
    assert path_safe(value) == expected


def test_path_params_neutralise_traversal_in_values_only() -> None:
    """In a path param the event's values are made safe; other params and literal parts are untouched."""
    params = {
        "to": "exports/{task.name}/job-{job.id}.zip",
        "message": "task {task.name}",
        "nested": {"dest": ["{task.name}"]},
        "count": 3,
    }
    rendered = render_params(params, VARS, path_params={"to", "nested"})
    assert rendered == {
        "to": "exports/.._.._etc/job-7.zip",
        "message": "task ../../etc",
        "nested": {"dest": [".._.._etc"]},
        "count": 3,
    }


@pytest.mark.parametrize(("value", "expected"), [("a/b", "out/a_b/x"), ("..", "out/_/x"), ("", "out/_/x")],
                         ids=["slash", "dotdot", "empty"])
def test_path_param_rendering(value: str, expected: str) -> None:
    """Each substituted value of a path param is made path-safe."""
    assert render_params({"to": "out/{v}/x"}, {"v": value}, path_params={"to"}) == {"to": expected}


def test_render_params_recurses_and_passes_non_strings() -> None:
    """Strings inside lists and dicts are rendered; numbers, booleans and nulls pass unchanged."""
    params = {"a": ["{job.state}", 1, None], "b": {"c": "{task_id}", "d": True}}
    assert render_params(params, VARS) == {"a": ["completed", 1, None], "b": {"c": "2", "d": True}}


NOW_CASES = [
    ("aware-utc", datetime(2026, 11, 22, 23, 59, tzinfo=UTC), "2026-11-22"),
    ("aware-other-zone", datetime(2026, 11, 23, 1, 0, tzinfo=timezone(timedelta(hours=2))), "2026-11-22"),
    ("naive-is-utc", datetime(2026, 11, 22, 0, 0), "2026-11-22"),
]


@pytest.mark.parametrize(("now", "date"), [c[1:] for c in NOW_CASES], ids=[c[0] for c in NOW_CASES])
def test_template_variables(now: datetime, date: str) -> None:
    """Templates see the event context plus ``event``, ``delivery_id`` and the UTC ``date`` of receipt."""
    event = parse_event(json.dumps({"event": "update:job", "job": {"id": 1, "task_id": 2}}).encode())
    variables = template_variables(event, now=now)
    assert variables["date"] == date
    assert variables["delivery_id"] == event.delivery_id
    assert variables["event"] == "update:job"
    assert (variables["job_id"], variables["task_id"]) == (1, 2)
    assert render("{event}/{date}/{job_id}", variables) == f"update:job/{date}/1"
