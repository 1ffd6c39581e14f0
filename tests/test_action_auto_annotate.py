"""``auto_annotate``: parameters checked at load, cvat-sdk's ``annotate_task`` over HTTP against the
test CVAT server, progress in the timeline, once per task data, and a delivery run end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.contract import ANNOTATE_QUEUE
from core.delivery_log import DeliveryLog
from core.errors import ErrorKind, PermanentError, TransientError, classify
from core.replay import replay
from core.settings import WorkerSettings
from receiver.rules import RulesError, parse_rules
from tests.conftest import SECRET, post, stored
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer, task_data
from tests.fake_gateway import make_context
from tests.functions import corner_boxes, faces
from workers.actions import REGISTRY, auto_annotate, validate_params

FUNCTION = "tests.functions.corner_boxes"


@pytest.mark.parametrize("params", [
    {"function": FUNCTION},
    {"function": f"{FUNCTION}:FIXED", "conf_threshold": 0.5, "clear_existing": True},
    {"function": FUNCTION, "function_parameters": {"margin": 3, "name": "x", "on": True},
     "allow_unmatched_labels": True, "conf_threshold": 1},
], ids=["module", "attribute-with-options", "parameters"])
def test_valid_params(params: dict[str, Any]) -> None:
    """Well-formed parameters pass without the function's module being imported."""
    assert validate_params("auto_annotate", params) == []


@pytest.mark.parametrize(("params", "problem"), [
    ({}, "function is required"),
    ({"function": "models.{task.name}"}, "must be a literal"),
    ({"function": "models..faces"}, "is not package.module"),
    ({"function": "models.faces:"}, "is not package.module"),
    ({"function": "import os; os"}, "is not package.module"),
    ({"function": FUNCTION, "conf_threshold": 1.5}, "conf_threshold must be a number from 0 to 1"),
    ({"function": FUNCTION, "conf_threshold": True}, "conf_threshold must be a number from 0 to 1"),
    ({"function": FUNCTION, "clear_existing": "yes"}, "clear_existing must be true or false"),
    ({"function": FUNCTION, "function_parameters": [1]}, "function_parameters must be a mapping"),
    ({"function": FUNCTION, "function_parameters": {"a-b": 1}}, "is not a Python identifier"),
    ({"function": FUNCTION, "function_parameters": {"a": {"b": 1}}}, "must be a string, number or boolean"),
    ({"function": FUNCTION, "model": "x"}, "unknown parameter 'model'"),
], ids=["missing", "placeholder", "empty-segment", "empty-attr", "code", "threshold-range", "threshold-bool",
        "flag", "parameters-list", "parameter-name", "parameter-value", "unknown"])
def test_invalid_params(params: dict[str, Any], problem: str) -> None:
    """Each mistake is reported in words that name the parameter."""
    assert any(problem in p for p in validate_params("auto_annotate", params)), validate_params(
        "auto_annotate", params)


def test_rules_file_errors_name_file_line_and_rule() -> None:
    """A bad auto_annotate parameter in rules.yaml is a load error with its file, line and rule."""
    text = ("version: 1\nrules:\n  - id: faces\n    on: completed:request[create:task]\n    do:\n"
            "      - action: auto_annotate\n        function: models.{task.name}\n")
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.yaml")
    assert any(line.startswith("rules.yaml:6: ") and "faces" in line and "function must be a literal" in line
               for line in str(info.value).splitlines()), str(info.value)


def test_runs_on_the_annotation_queue() -> None:
    """The action has its own queue (4 h per run, a worker process of its own)."""
    assert REGISTRY["auto_annotate"].queue == ANNOTATE_QUEUE


@pytest.mark.parametrize(("name", "parameters", "margin"), [
    (FUNCTION, {}, 1.0),
    (FUNCTION, {"margin": 4}, 4.0),
    (f"{FUNCTION}:FIXED", {}, 3.0),
], ids=["create-defaults", "create-parameters", "attribute"])
def test_load_function(name: str, parameters: dict[str, Any], margin: float) -> None:
    """A module's create(...) gets function_parameters; an attribute is used as it is."""
    function = auto_annotate.load_function(name, parameters)
    assert function.margin == margin and function.spec is corner_boxes.spec


@pytest.mark.parametrize(("name", "parameters", "message"), [
    ("tests.functions.no_such_module", {}, "cannot import 'tests.functions.no_such_module': ModuleNotFoundError"),
    (f"{FUNCTION}:MISSING", {}, "has no attribute 'MISSING'"),
    (f"{FUNCTION}:FIXED", {"margin": 2}, "has no create(), so it takes no function_parameters"),
    (FUNCTION, {"width": 2}, "create() refused function_parameters"),
    ("tests.functions", {}, "is not a detection function"),
], ids=["no-module", "no-attribute", "parameters-without-create", "bad-parameter", "not-a-function"])
def test_load_function_failures_are_permanent(name: str, parameters: dict[str, Any], message: str) -> None:
    """A function that cannot be made fails permanently, saying why."""
    with pytest.raises(PermanentError, match=None) as info:
        auto_annotate.load_function(name, parameters)
    assert message in str(info.value)


# -- against the test CVAT server ------------------------------------------------------------------


def context(params: dict[str, Any], task_id: int, gateway: Any, redis: Any, tmp_path: Path, **kw: Any) -> Any:
    """A context for one run on ``task_id`` with the real client and a real Redis."""
    event = {"event": "completed:request[create:task]", "resource": "request", "task_id": task_id,
             "project_id": None}
    return make_context("auto_annotate", params, event=event, gateway=gateway, redis=redis,
                        settings=WorkerSettings(data_dir=tmp_path / "data"), **kw)


def shapes(server: CvatTestServer, task_id: int) -> list[dict[str, Any]]:
    with server.state.lock:
        return list(server.state.tasks[task_id].get("annotations", {}).get("shapes", []))


def test_annotates_every_frame(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any,
                               tmp_path: Path) -> None:
    """Each frame gets the function's box, computed from the downloaded image; progress is noted."""
    task_id = cvat_server.add_task("faces", labels=["car", "person"], jobs=2, frames_per_job=3)
    ctx = context({"function": FUNCTION, "function_parameters": {"margin": 2}}, task_id, cvat_gateway, redis,
                  tmp_path)
    result = auto_annotate.run(ctx)
    assert (result["frames"], result["detections"], result["task_id"]) == (6, 6, task_id)
    width, height = task_data.FRAME_SIZE
    saved = shapes(cvat_server, task_id)
    assert sorted(s["frame"] for s in saved) == list(range(6))
    assert all(s["points"] == corner_boxes.box(width, height, 2) and s["source"] == "auto" for s in saved)
    progress = [data for message, data in ctx.note.steps if message.startswith("annotated ")]
    assert progress[0] == {"frames_done": 0, "frames_total": 6}
    assert progress[-1] == {"frames_done": 6, "frames_total": 6}
    assert len(cvat_server.calls("PATCH", f"/api/tasks/{task_id}/annotations")) == 1
    assert not list((tmp_path / "data" / "tmp").iterdir()), "the chunk cache is removed"


def test_same_task_data_is_annotated_once(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any,
                                          tmp_path: Path) -> None:
    """A duplicate delivery or a replay skips; other options are another version."""
    task_id = cvat_server.add_task("once", labels=["car"], jobs=1, frames_per_job=2)
    params = {"function": FUNCTION}
    first = auto_annotate.run(context(params, task_id, cvat_gateway, redis, tmp_path))
    again = auto_annotate.run(context(params, task_id, cvat_gateway, redis, tmp_path, run=1))
    assert again["skipped"] == "already annotated" and again["version"] == first["version"]
    assert len(shapes(cvat_server, task_id)) == 2
    other = auto_annotate.run(context({**params, "clear_existing": True}, task_id, cvat_gateway, redis, tmp_path))
    assert other["version"] != first["version"] and "skipped" not in other
    assert len(shapes(cvat_server, task_id)) == 2, "clear_existing replaced the first run's boxes"
    assert len(cvat_server.calls("PUT", f"/api/tasks/{task_id}/annotations")) == 1


def test_a_task_without_data_fails_permanently(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any,
                                               tmp_path: Path) -> None:
    """create:task comes before the data: the error says which event to use."""
    task_id = cvat_server.add_task("empty", labels=["car"], jobs=0)
    with pytest.raises(PermanentError, match=r"completed:request\[create:task\]"):
        auto_annotate.run(context({"function": FUNCTION}, task_id, cvat_gateway, redis, tmp_path))


def test_unmatched_labels_fail_unless_allowed(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any,
                                              tmp_path: Path) -> None:
    """A task without the function's label fails permanently (the SDK's BadFunctionError), or
    annotates nothing with allow_unmatched_labels."""
    task_id = cvat_server.add_task("trees", labels=["tree"], jobs=1, frames_per_job=2)
    with pytest.raises(PermanentError, match="auto-annotation function"):
        auto_annotate.run(context({"function": FUNCTION}, task_id, cvat_gateway, redis, tmp_path))
    result = auto_annotate.run(context({"function": FUNCTION, "allow_unmatched_labels": True}, task_id,
                                       cvat_gateway, redis, tmp_path))
    assert result["frames"] == 2 and shapes(cvat_server, task_id) == []


def test_cvat_5xx_while_downloading_is_transient(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any,
                                                 tmp_path: Path) -> None:
    """A 503 on a chunk is worth a retry, and nothing is marked done."""
    task_id = cvat_server.add_task("flaky", labels=["car"], jobs=1, frames_per_job=2)
    cvat_server.fail_next(1, 503, path=f"/api/tasks/{task_id}/data")
    ctx = context({"function": FUNCTION}, task_id, cvat_gateway, redis, tmp_path)
    with pytest.raises(TransientError, match="503") as info:
        auto_annotate.run(ctx)
    assert classify(info.value) is ErrorKind.TRANSIENT
    assert auto_annotate.run(ctx)["frames"] == 2


# -- a delivery, through the receiver and a real RQ worker --------------------------------------------

RULES = """
version: 1
rules:
  - id: pre-annotate
    on: completed:request[create:task]
    if: {request.status: finished}
    do:
      - action: auto_annotate
        function: tests.functions.corner_boxes
        function_parameters: {margin: 5}
"""


@pytest.fixture
def e2e(settings: Any, cvat_server: CvatTestServer, monkeypatch: pytest.MonkeyPatch, worker_env: Any) -> Any:
    """Receiver settings with the rule above, and a worker environment pointed at the test CVAT."""
    monkeypatch.setenv("CVAT_URL", cvat_server.url)
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", DEFAULT_TOKEN)
    settings.rules_path.write_text(RULES)
    return settings


def test_a_finished_task_creation_is_annotated(e2e: Any, client: Any, redis: Any, cvat_server: CvatTestServer,
                                               webhook_sink: Any) -> None:
    """completed:request[create:task], as the test CVAT sends it, annotates the task on the
    annotation queue, with progress in the delivery's timeline; a forced replay skips."""
    from tests.test_end_to_end import drain

    task_id = cvat_server.add_task("delivered", labels=["car"], jobs=1, frames_per_job=3)
    cvat_server.add_webhook(webhook_sink.url + "/hook", project_id=None, org="acme", secret=SECRET,
                            events=["completed:request[create:task]"])
    with cvat_server.state.lock:
        cvat_server.state.tasks[task_id]["org_id"] = 1
    task_data.data_ready(cvat_server, task_id)
    cvat_server.webhooks.join(10)
    [delivered] = webhook_sink.received
    answer = post(client, delivered.body)
    assert answer.status_code == 202, answer.json
    drain(e2e)
    record = DeliveryLog(redis, retention_seconds=60).get(answer.json["delivery_id"])
    assert record is not None
    [action] = record.actions.values()
    assert action["status"] == "succeeded", action
    assert action["queue"] == ANNOTATE_QUEUE
    assert action["result"]["frames"] == 3
    notes = [s.get("message") for s in record.timeline if s["step"] == "note"]
    assert "annotated 3 of 3 frames" in notes, notes
    width, height = task_data.FRAME_SIZE
    assert [s["points"] for s in shapes(cvat_server, task_id)] == [corner_boxes.box(width, height, 5)] * 3
    assert DEFAULT_TOKEN not in json.dumps(record.to_json(shown=stored))
    log = DeliveryLog(redis, retention_seconds=60)
    replay(log, record, force=True)
    drain(e2e)
    replayed = log.get(answer.json["delivery_id"])
    assert replayed is not None
    assert sorted(a["status"] for a in replayed.actions.values()) == ["skipped", "succeeded"]
    assert len(cvat_server.calls("PATCH", f"/api/tasks/{task_id}/annotations")) == 1, "a replay annotates once"


def test_the_example_face_function_loads_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/functions/haar_faces.py (the 'faces' extra) follows the interface: one box around a
    drawn face, none on a blank frame."""
    pytest.importorskip("cv2", reason="the optional 'faces' extra (opencv-python-headless) is not installed")
    from PIL import Image

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples" / "functions"))
    function = auto_annotate.load_function("haar_faces", {"min_neighbors": 3})
    assert [label.name for label in function.spec.labels] == ["face"]
    assert function.detect(None, Image.new("RGB", (64, 48), (90, 90, 90))) == []
    [face] = function.detect(None, faces.drawn_face())
    x1, y1, x2, y2 = face.points
    fx1, fy1, fx2, fy2 = faces.FACE_BOX
    assert fx1 - 40 <= x1 < x2 <= fx2 + 40 and fy1 - 40 <= y1 < y2 <= fy2 + 40, face.points
    assert (str(face.type), face.label_id) == ("rectangle", 0)
