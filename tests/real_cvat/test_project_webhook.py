"""A project webhook made by ``cvat-hooks register`` on a real CVAT: every action, with CVAT sending.

Nothing here is replayed or hand-signed: changes are made through CVAT's API and CVAT's own webhook
worker delivers them to ``cvat-hooks serve``; ``cvat-hooks worker`` acts on CVAT through cvat-sdk.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from typing import Any

import pytest

from tests.cvat_server.sink import WebhookSink
from tests.procs import wait_for
from tests.real_cvat.conftest import SERVICE_USER_VAR, Deployment, Made, rules_of, s3_client, service_account


def complete(cvat: Any, job_id: int, stage: str = "acceptance") -> None:
    """Mark a job completed, as an annotator's "Finish the job" and a reviewer's accept do."""
    cvat.jobs.retrieve(job_id).update({"stage": stage, "state": "completed"})


def rectangle(cvat: Any, task: Any, label: str = "car") -> None:
    labels = {lb.name: lb.id for lb in task.get_labels()}
    task.update_annotations({"shapes": [{"type": "rectangle", "frame": 0, "label_id": labels[label],
                                         "points": [1.0, 2.0, 30.0, 20.0]}]})


def succeeded(summary: dict[str, Any]) -> list[dict[str, Any]]:
    actions = summary["actions"]
    bad = [a for a in actions if a.get("status") != "succeeded"]
    assert not bad, json.dumps(bad, indent=1)[:3000]
    return actions


def by_rule(deployment: Deployment, rule: str, *, task_id: int | None = None, **kw: Any) -> dict[str, Any]:
    """The newest finished delivery that matched ``rule`` (about task ``task_id``)."""
    return deployment.wait_delivery(lambda d: rule in rules_of(d)
                                    and (task_id is None or (d.get("ids") or {}).get("task_id") == task_id), **kw)


@pytest.fixture(scope="module")
def exports_project(made: Made, deployment: Deployment, cvat: Any, s3_env: dict[str, str]) -> Any:
    s3_client(s3_env).create_bucket(Bucket="real-cvat")
    project = made.project("exports", ["car", "person"])
    deployment.add_rules(f"""
  - id: export-{project.id}
    on: update:job
    if: {{project_id: {project.id}, job.state: {{became: completed}}, job.stage: acceptance}}
    do:
      - {{action: export, resource: job, format: CVAT for images 1.1,
          to: "exports/{{project_id}}/job-{{job_id}}-cvat.zip"}}
      - {{action: export, resource: job, format: COCO 1.0, to: "exports/{{project_id}}/job-{{job_id}}-coco.zip"}}
      - {{action: export, resource: task, kind: dataset, format: YOLO 1.1,
          to: "exports/{{project_id}}/task-{{task_id}}-yolo.zip"}}
      - {{action: export, resource: project, format: COCO 1.0, to: "exports/{{project_id}}/project-coco.zip"}}
      - {{action: export, resource: task, kind: backup, to: "exports/{{project_id}}/task-{{task_id}}-backup.zip"}}
      - {{action: export, resource: project, kind: backup, to: "exports/{{project_id}}/project-backup.zip"}}
      - {{action: export, resource: job, format: CVAT for images 1.1, to: "s3://real-cvat/{{project_id}}/job-{{job_id}}.zip"}}
    retry: {{attempts: 2, backoff: [2]}}
  - id: export-task-when-done-{project.id}
    on: update:job
    if: {{project_id: {project.id}, job.state: {{became: completed}}}}
    do:
      - action: export
        resource: task
        format: CVAT for images 1.1
        to: "exports/{{project_id}}/task-{{task_id}}-all-jobs.zip"
        require_all_jobs: {{state: completed}}
""")
    deployment.register("--project", str(project.id))
    return project


def test_a_completed_job_is_exported_in_every_format_and_kind(exports_project, made, deployment, cvat, s3_env):
    """Completing a job in CVAT writes its CVAT 1.1 and COCO exports, the task's YOLO dataset with
    images, the project's COCO annotations, the task's and the project's backups, locally and to S3: real files CVAT
    made."""
    task = made.task("exports-1", project_id=exports_project.id, frames=2, segment_size=2)
    rectangle(cvat, task)
    [job] = task.get_jobs()
    complete(cvat, job.id)
    summary = by_rule(deployment, f"export-{exports_project.id}", task_id=task.id, timeout=240)
    succeeded(summary)
    out = deployment.data_dir / "exports" / str(exports_project.id)
    with zipfile.ZipFile(out / f"job-{job.id}-cvat.zip") as z:
        xml = z.read("annotations.xml").decode()
    assert "<box" in xml and 'label="car"' in xml
    with zipfile.ZipFile(out / f"job-{job.id}-coco.zip") as z:
        coco = json.loads(z.read("annotations/instances_default.json"))
    assert [c["name"] for c in coco["categories"]][:2] == ["car", "person"] and len(coco["annotations"]) == 1
    with zipfile.ZipFile(out / f"task-{task.id}-yolo.zip") as z:
        names = z.namelist()
    assert "obj.names" in names and any(n.endswith(".png") or n.endswith(".jpg") for n in names)
    with zipfile.ZipFile(out / "project-coco.zip") as z:
        assert any(n.startswith("annotations/") for n in z.namelist())
    with zipfile.ZipFile(out / f"task-{task.id}-backup.zip") as z:
        assert "task.json" in z.namelist()
    with zipfile.ZipFile(out / "project-backup.zip") as z:
        assert "project.json" in z.namelist()
    stored = s3_client(s3_env).get_object(Bucket="real-cvat", Key=f"{exports_project.id}/job-{job.id}.zip")
    with zipfile.ZipFile(io.BytesIO(stored["Body"].read())) as z:
        assert "<box" in z.read("annotations.xml").decode()


def test_the_task_is_exported_once_its_last_job_is_done(exports_project, made, deployment, cvat):
    """require_all_jobs: the first completed job of two is skipped, the second exports the task."""
    task = made.task("all-jobs", project_id=exports_project.id, frames=3, segment_size=2)
    first, second = sorted(task.get_jobs(), key=lambda j: j.id)
    rule = f"export-task-when-done-{exports_project.id}"
    target = deployment.data_dir / "exports" / str(exports_project.id) / f"task-{task.id}-all-jobs.zip"
    complete(cvat, first.id)
    summary = by_rule(deployment, rule, task_id=task.id, timeout=120)
    [action] = [a for a in summary["actions"] if a["rule_id"] == rule]
    assert action["status"] == "skipped" or action.get("result", {}).get("skipped"), action
    assert not target.exists()
    complete(cvat, second.id)
    assert wait_for(target.exists, timeout=120, interval=0.5), deployment.explain()
    with zipfile.ZipFile(target) as z:
        assert "annotations.xml" in z.namelist()


@pytest.fixture(scope="module")
def sink() -> Any:
    sink = WebhookSink().start()
    yield sink
    sink.stop()


def test_labels_are_checked_reported_added_and_failed(made, deployment, cvat):
    """check_labels on a task inside a project: report, add_missing (on the project, since CVAT
    ignores labels sent to such a task) and fail, on the task CVAT just finished creating."""
    project = made.project("labels", ["car", "person"])
    deployment.add_rules(f"""
  - id: labels-report-{project.id}
    on: completed:request[create:task]
    if: {{project_id: {project.id}, request.status: finished}}
    do:
      - {{action: check_labels, require: [car, bicycle], on_mismatch: report}}
      - {{action: check_labels, require: [car, {{name: bicycle, type: rectangle}}], on_mismatch: add_missing}}
      - {{action: check_labels, require: [truck], on_mismatch: fail}}
""")
    deployment.register("--project", str(project.id))
    task = made.task("labels-1", project_id=project.id, frames=1)
    summary = by_rule(deployment, f"labels-report-{project.id}", task_id=task.id, timeout=120)
    report, added, failed = sorted(summary["actions"], key=lambda a: a["index"])
    assert report["status"] == "succeeded" and report["result"]["missing"] == ["bicycle"]
    assert added["status"] == "succeeded" and added["result"]["added"] == ["bicycle"]
    assert failed["status"] == "failed" and failed["error"]["kind"] == "permanent"
    names = {lb.name for lb in cvat.projects.retrieve(project.id).get_labels()}
    assert names == {"car", "person", "bicycle"}


def test_update_job_moves_a_finished_job_to_review_round_robin(made, deployment, cvat):
    """update_job sets stage and state and assigns reviewers in turn, and its own change does not
    trigger the rule again."""
    if service_account() is None:
        pytest.skip(f"the workers must act as another CVAT account than the suite's: set {SERVICE_USER_VAR}")
    users = [u.username for u in cvat.users.list()][:2]
    project = made.project("review", ["car"])
    deployment.add_rules(f"""
  - id: review-{project.id}
    on: update:job
    if: {{project_id: {project.id}, job.state: {{became: completed}}, job.stage: annotation}}
    do:
      - action: update_job
        stage: validation
        state: new
        assignee: {json.dumps(users)}
""")
    deployment.register("--project", str(project.id))
    task = made.task("review-1", project_id=project.id, frames=3, segment_size=2)
    jobs = sorted(task.get_jobs(), key=lambda j: j.id)
    assignees = []
    for job in jobs:
        complete(cvat, job.id, stage="annotation")
        assert wait_for(lambda j=job: cvat.jobs.retrieve(j.id).stage == "validation", timeout=120,
                        interval=0.5), deployment.explain()
        fresh = cvat.jobs.retrieve(job.id)
        assert fresh.state == "new"
        assignees.append(fresh.assignee.username if fresh.assignee else None)
    assert assignees == users[:len(jobs)] if len(users) >= 2 else assignees[0] == users[0]


def test_notify_posts_the_event_to_a_listener(made, deployment, cvat, sink):
    """notify POSTs a templated JSON message about the job CVAT reported."""
    project = made.project("notify", ["car"])
    deployment.add_rules(f"""
  - id: notify-{project.id}
    on: update:job
    if: {{project_id: {project.id}, job.state: {{became: completed}}}}
    do:
      - action: notify
        url: {sink.url}/notify/{project.id}
        text: "job {{job_id}} of task {{job.task_name}} is {{job.state}}"
""")
    deployment.register("--project", str(project.id))
    task = made.task("notify-1", project_id=project.id, frames=1)
    [job] = task.get_jobs()
    complete(cvat, job.id)
    assert wait_for(lambda: any(r.path == f"/notify/{project.id}" for r in sink.received), timeout=120,
                    interval=0.5), deployment.explain()
    [posted] = [r for r in sink.received if r.path == f"/notify/{project.id}"]
    assert json.loads(posted.body)["text"] == f"job {job.id} of task {task.name} is completed"


def test_register_is_idempotent_and_rotates_without_losing_a_delivery(made, deployment, cvat):
    """register twice keeps one webhook; --rotate-secret switches CVAT to a new secret and the
    next delivery is still accepted; ping, webhooks list, doctor and unregister work on it."""
    project = made.project("register", ["car"])
    deployment.add_rules(f"""
  - id: seen-{project.id}
    on: update:task
    if: {{project_id: {project.id}}}
    do:
      - {{action: notify, url: "http://127.0.0.1:9/never", text: unused}}
""")
    first = deployment.register("--project", str(project.id))
    again = deployment.register("--project", str(project.id))
    hooks = [w for w in json.loads(deployment.cli("webhooks", "list", "--json").stdout)
             if w.get("project_id") == project.id]
    assert len(hooks) == 1, (first, again, hooks)
    assert deployment.cli("ping", "--project", str(project.id)).returncode == 0
    deployment.register("--project", str(project.id), extra=("--rotate-secret",))
    task = made.task("register-1", project_id=project.id, frames=1)
    cvat.tasks.retrieve(task.id).update({"name": task.name + "-renamed"})
    summary = deployment.wait_delivery(lambda d: d.get("event") == "update:task"
                                       and d.get("ids", {}).get("project_id") == project.id, done=False, timeout=120)
    assert rules_of(summary) == [f"seen-{project.id}"]
    doctor = deployment.cli("doctor", check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    deployment.cli("unregister", "--project", str(project.id))
    left = [w for w in json.loads(deployment.cli("webhooks", "list", "--json").stdout)
            if w.get("project_id") == project.id]
    assert left == []


def test_reconcile_brings_what_cvat_sent_while_the_receiver_was_down(made, deployment, cvat):
    """With the receiver stopped, CVAT's delivery of a completed job fails; reconcile asks CVAT to
    redeliver it once the receiver is back, and the export is written."""
    project = made.project("reconcile", ["car"])
    deployment.add_rules(f"""
  - id: reconcile-{project.id}
    on: update:job
    if: {{project_id: {project.id}, job.state: {{became: completed}}}}
    do:
      - {{action: export, resource: job, format: CVAT for images 1.1, to: "exports/reconcile/job-{{job_id}}.zip"}}
""")
    deployment.register("--project", str(project.id))
    task = made.task("reconcile-1", project_id=project.id, frames=1)
    [job] = task.get_jobs()
    deployment.receiver.stop()
    try:
        complete(cvat, job.id)
        time.sleep(8)  # CVAT's webhook worker tries, and records the failure
    finally:
        deployment.receiver.start()
    out = deployment.cli("reconcile", "--since", "1h", "--json")
    report = json.loads(out.stdout)
    assert report.get("redelivered_count", 0) >= 1, out.stdout
    target = deployment.data_dir / "exports" / "reconcile" / f"job-{job.id}.zip"
    assert wait_for(target.exists, timeout=120, interval=0.5), deployment.explain()


def test_replay_runs_a_delivery_again(exports_project, made, deployment, cvat):
    """deliveries replay --force re-runs a finished delivery's actions (skipped: already exported)."""
    summary = by_rule(deployment, f"export-{exports_project.id}", timeout=10)
    deployment.cli("deliveries", "replay", summary["delivery_id"], "--force")

    def replayed() -> bool:
        actions = deployment.delivery(summary["delivery_id"])["actions"]
        return any(int(a.get("run", 0)) > 0 and a.get("status") in ("succeeded", "skipped") for a in actions)

    assert wait_for(replayed, timeout=120, interval=1.0)
