"""``auto_annotate`` and ``import_annotations`` on a real CVAT: a task created with data gets the
deterministic function's boxes, and an annotation file lands in a task, each from a delivery CVAT
itself sends (``completed:request[create:task]``) to ``cvat-hooks serve``, run by ``cvat-hooks worker``.
"""

from __future__ import annotations

from typing import Any

from tests.functions import corner_boxes, faces
from tests.real_cvat.conftest import Deployment, Made, png, rules_of

WAIT = 180.0
"""Seconds for CVAT to create the task, deliver, and the worker to finish (it downloads the chunks)."""
FRAME = (64, 48)
"""The size of the suite's generated frames (``conftest.png``)."""


def annotations_of(cvat: Any, task_id: int) -> list[Any]:
    return list(cvat.tasks.retrieve(task_id).get_annotations().shapes)


def test_a_new_task_gets_the_functions_annotations(made: Made, deployment: Deployment, cvat: Any) -> None:
    """A task created with 3 frames in a registered project is annotated by the function: one box
    per frame, computed from the frame CVAT served, with progress in the delivery's timeline."""
    project = made.project("auto-annotate", ["car", "person"])
    deployment.add_rules(f"""
  - id: auto-annotate-{project.id}
    on: completed:request[create:task]
    if: {{project_id: {project.id}, request.status: finished}}
    do:
      - action: auto_annotate
        function: tests.functions.corner_boxes
        function_parameters: {{margin: 2}}
""")
    deployment.register("--project", str(project.id))
    task = made.task("auto-1", project_id=project.id, frames=3)
    summary = deployment.wait_delivery(lambda d: f"auto-annotate-{project.id}" in rules_of(d), timeout=WAIT)
    [action] = summary["actions"]
    assert action["status"] == "succeeded", deployment.explain()
    assert action["queue"] == "cvat-hooks-annotate"
    assert (action["result"]["task_id"], action["result"]["frames"]) == (task.id, 3)
    timeline = deployment.delivery(summary["delivery_id"])["timeline"]
    notes = [s.get("message") for s in timeline if s.get("step") == "note"]
    assert "annotated 3 of 3 frames" in notes, notes
    shapes = annotations_of(cvat, task.id)
    assert sorted(s.frame for s in shapes) == [0, 1, 2]
    assert all(list(s.points) == corner_boxes.box(*FRAME, 2) and s.source == "auto" for s in shapes), shapes


def test_the_shipped_example_boxes_a_face(made: Made, deployment: Deployment, cvat: Any) -> None:
    """The example function (examples/functions/haar_faces.py, OpenCV's Haar cascade) puts one
    ``face`` box around the face in a new task's frame, and none on a frame without one."""
    project = made.project("faces", ["face"])
    deployment.add_rules(f"""
  - id: faces-{project.id}
    on: completed:request[create:task]
    if: {{project_id: {project.id}, request.status: finished}}
    do:
      - action: auto_annotate
        function: tests.functions.faces
        function_parameters: {{min_neighbors: 3}}
""")
    deployment.register("--project", str(project.id))
    face = made.images / "face.png"
    faces.drawn_face().save(face, format="PNG")
    task = made.task("faces-1", project_id=project.id, images=[face, png(made.images, 0)])
    summary = deployment.wait_delivery(lambda d: f"faces-{project.id}" in rules_of(d), timeout=WAIT)
    [action] = summary["actions"]
    assert action["status"] == "succeeded", deployment.explain()
    [shape] = annotations_of(cvat, task.id)
    label = next(lb for lb in cvat.projects.retrieve(project.id).get_labels() if lb.id == shape.label_id)
    x1, y1, x2, y2 = shape.points
    fx1, fy1, fx2, fy2 = faces.FACE_BOX
    assert (shape.frame, label.name, str(shape.type)) == (0, "face", "rectangle")
    assert fx1 - 40 <= x1 < x2 <= fx2 + 40 and fy1 - 40 <= y1 < y2 <= fy2 + 40, shape.points


def test_an_annotation_file_lands_in_a_new_task(made: Made, deployment: Deployment, cvat: Any) -> None:
    """A CVAT 1.1 file waiting under the data directory is imported into a new task of the project
    (appended: CVAT's own default would replace)."""
    project = made.project("preannotations", ["car"])
    pre = deployment.data_dir / "pre"
    pre.mkdir(exist_ok=True)
    (pre / f"project-{project.id}.xml").write_text(
        '<?xml version="1.0"?><annotations><version>1.1</version>'
        '<image id="1" name="frame-001.png" width="64" height="48">'
        '<box label="car" xtl="3" ytl="4" xbr="30" ybr="40" occluded="0" source="manual" z_order="0"/>'
        "</image></annotations>")
    deployment.add_rules(f"""
  - id: preannotations-{project.id}
    on: completed:request[create:task]
    if: {{project_id: {project.id}, request.status: finished}}
    do:
      - action: import_annotations
        from: pre/project-{{project_id}}.xml
        format: CVAT 1.1
""")
    deployment.register("--project", str(project.id))
    task = made.task("pre-1", project_id=project.id, frames=2)
    summary = deployment.wait_delivery(lambda d: f"preannotations-{project.id}" in rules_of(d), timeout=WAIT)
    [action] = summary["actions"]
    assert action["status"] == "succeeded", deployment.explain()
    assert action["result"]["mode"] == "append" and action["result"]["resource_id"] == task.id
    [shape] = annotations_of(cvat, task.id)
    assert (shape.frame, list(shape.points)) == (1, [3.0, 4.0, 30.0, 40.0])
