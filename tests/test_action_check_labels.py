"""The check_labels action: parameter checks, the comparison, and report / add_missing / fail."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from core.errors import PermanentError
from tests.fake_gateway import FakeGateway, job_event, make_context, task_event
from workers.actions import check_labels, validate_params
from workers.actions.check_labels import Required, compare
from workers.gateway import LabelSet

CAR = {"id": 1, "name": "car", "type": "rectangle", "attributes": [{"name": "color"}, {"name": "model"}]}
PERSON = {"id": 2, "name": "person", "type": "polygon", "attributes": []}
TREE = {"id": 3, "name": "tree", "type": "any", "attributes": []}


def gateway_with(labels: list[dict[str, Any]], *, project_id: int | None = None) -> FakeGateway:
    return FakeGateway(labels={2: LabelSet(labels=[dict(label) for label in labels], task_id=2,
                                           project_id=project_id)})


def run(params: dict[str, Any], gateway: FakeGateway, event: dict[str, Any] | None = None) -> dict[str, Any]:
    ctx = make_context("check_labels", params, event=event or task_event(), gateway=gateway,
                       redis=fakeredis.FakeRedis())
    return check_labels.run(ctx)


# -- validate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {"require": ["car", "person"]},
    {"require": [{"name": "car", "type": "rectangle", "attributes": ["color"]}, "tree"],
     "on_mismatch": "fail"},
    {"require": [{"name": "car"}], "on_mismatch": "add_missing"},
], ids=["names", "mappings-and-fail", "add-missing"])
def test_valid_params(params: dict[str, Any]) -> None:
    """Names, mappings with type and attribute names, and each on_mismatch value pass."""
    assert validate_params("check_labels", params) == []


@pytest.mark.parametrize(("params", "problem"), [
    ({}, "require must be a non-empty list"),
    ({"require": []}, "require must be a non-empty list"),
    ({"require": "car"}, "require must be a non-empty list"),
    ({"require": [""]}, "require[0]: a label name cannot be empty"),
    ({"require": [3]}, "require[0]: expected a label name or a mapping"),
    ({"require": [{"type": "rectangle"}]}, "require[0]: name is required"),
    ({"require": [{"name": "car", "type": "box"}]}, "require[0]: type 'box' is not one of"),
    ({"require": [{"name": "car", "attributes": "color"}]}, "require[0]: attributes must be a list"),
    ({"require": [{"name": "car", "colour": "red"}]}, "require[0]: unknown key 'colour'"),
    ({"require": ["car", {"name": "car"}]}, "require names a label more than once: car"),
    ({"require": ["car"], "on_mismatch": "ignore"}, "on_mismatch: 'ignore' is not one of"),
    ({"require": ["car"], "labels": ["x"]}, "unknown parameter 'labels'"),
], ids=["missing", "empty", "not-a-list", "empty-name", "number", "no-name", "bad-type", "attributes-string",
        "unknown-key", "duplicate", "bad-on-mismatch", "typo"])
def test_invalid_params(params: dict[str, Any], problem: str) -> None:
    """Each mistake is reported in a sentence naming it."""
    problems = validate_params("check_labels", params)
    assert any(problem in p for p in problems), problems


# -- compare -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("required", "labels", "expected"), [
    ([Required("car"), Required("person")], [CAR, PERSON],
     {"missing": [], "unexpected": [], "matched": ["car", "person"], "mismatched": []}),
    ([Required("car"), Required("bus")], [CAR, TREE],
     {"missing": ["bus"], "unexpected": ["tree"], "matched": ["car"], "mismatched": []}),
    ([Required("car", "polygon")], [CAR],
     {"missing": [], "unexpected": [], "matched": [],
      "mismatched": [{"name": "car", "type": {"expected": "polygon", "actual": "rectangle"}}]}),
    ([Required("car", attributes=("color", "plate"))], [CAR],
     {"missing": [], "unexpected": [], "matched": [],
      "mismatched": [{"name": "car", "missing_attributes": ["plate"]}]}),
    ([Required("car", "rectangle", ("model",))], [CAR],
     {"missing": [], "unexpected": [], "matched": ["car"], "mismatched": []}),
    ([Required("person")], [PERSON, {"id": 9, "name": "nose", "type": "points", "parent_id": 2}],
     {"missing": [], "unexpected": [], "matched": ["person"], "mismatched": []}),
], ids=["all-matched", "missing-and-unexpected", "type-differs", "attribute-missing",
        "extra-attributes-are-fine", "skeleton-points-ignored"])
def test_compare(required: list[Required], labels: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    """Names, then types and attribute names, decide matched / mismatched / missing / unexpected."""
    assert compare(required, labels) == expected


# -- run ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("project_id", "source"), [(None, "task"), (1, "project")],
                         ids=["own-labels", "inherited"])
def test_report_records_the_difference_and_succeeds(project_id: int | None, source: str) -> None:
    """on_mismatch: report returns the whole report, saying where the labels live, and adds nothing."""
    gateway = gateway_with([CAR, TREE], project_id=project_id)
    report = run({"require": ["car", "person"]}, gateway)
    assert report == {"task_id": 2, "source": source, "project_id": project_id, "missing": ["person"],
                      "unexpected": ["tree"], "matched": ["car"], "mismatched": [], "added": [], "ok": False}
    assert gateway.called("add_labels") == []


def test_add_missing_creates_labels_on_the_task() -> None:
    """Missing labels are created on the task, with their type and attributes; then none is missing."""
    gateway = gateway_with([CAR])
    params = {"require": ["car", {"name": "person", "type": "polygon", "attributes": ["age"]}],
              "on_mismatch": "add_missing"}
    report = run(params, gateway)
    assert report["added"] == ["person"] and report["ok"] is True
    (call,) = gateway.called("add_labels")
    assert call["task_id"] == 2 and call["project_id"] is None
    assert call["labels"] == [{"name": "person", "type": "polygon", "attributes": [{"name": "age"}]}]
    again = run(params, gateway)
    assert again["missing"] == [] and again["added"] == [] and again["matched"] == ["car", "person"]
    assert len(gateway.called("add_labels")) == 1


def test_add_missing_goes_to_the_project_when_the_task_inherits() -> None:
    """A task using its project's labels gets new labels through the project."""
    gateway = gateway_with([CAR], project_id=1)
    run({"require": ["car", "bus"], "on_mismatch": "add_missing"}, gateway)
    (call,) = gateway.called("add_labels")
    assert (call["task_id"], call["project_id"], call["labels"]) == (None, 1, [{"name": "bus"}])


def test_add_missing_leaves_mismatched_labels_alone() -> None:
    """A label of the wrong type is reported, not changed (that could break existing annotations)."""
    gateway = gateway_with([CAR])
    report = run({"require": [{"name": "car", "type": "polygon"}], "on_mismatch": "add_missing"}, gateway)
    assert report["mismatched"][0]["name"] == "car" and report["ok"] is False
    assert gateway.called("add_labels") == []


def test_fail_raises_with_the_report_attached() -> None:
    """on_mismatch: fail raises permanently, naming what is wrong, with the report on ``.result``."""
    gateway = gateway_with([CAR])
    with pytest.raises(PermanentError) as caught:
        run({"require": ["bus", "person", {"name": "car", "type": "polygon"}], "on_mismatch": "fail"},
            gateway)
    assert str(caught.value) == "task 2 labels do not match: missing bus, person; mismatched car"
    assert caught.value.result is not None
    assert caught.value.result["missing"] == ["bus", "person"] and caught.value.result["ok"] is False


def test_fail_succeeds_when_everything_matches() -> None:
    """on_mismatch: fail only fails on a mismatch; extra labels are not one."""
    report = run({"require": ["car"], "on_mismatch": "fail"}, gateway_with([CAR, TREE]))
    assert report["ok"] is True and report["unexpected"] == ["tree"]


def test_labels_of_a_job_event_come_from_its_task() -> None:
    """A job event names its task, whose labels are checked."""
    gateway = gateway_with([CAR])
    run({"require": ["car"]}, gateway, event=job_event(task_id=2))
    assert gateway.called("task_labels") == [2]


def test_event_without_a_task_fails_permanently() -> None:
    """An event that names no task cannot be checked."""
    with pytest.raises(PermanentError, match="names no task"):
        run({"require": ["car"]}, gateway_with([CAR]), event={"event": "create:project", "project_id": 1})
