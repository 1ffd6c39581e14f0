"""The test CVAT server's data: a small in-memory world, and the JSON CVAT 2.73 answers for it.

Records are plain dicts holding only what cannot be derived; the ``*_json`` functions build the
full objects with the field order and types of CVAT 2.73 (see ``/work/shared/cvat-payloads``), so
cvat-sdk's typed models accept them and our own code sees what a real server sends.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

JOB_STAGES = ("annotation", "validation", "acceptance")
JOB_STATES = ("new", "in progress", "completed", "rejected")
ATTRIBUTE_INPUT_TYPES = ("checkbox", "radio", "number", "text", "select")
LABEL_TYPES = ("any", "cuboid", "ellipse", "mask", "points", "polygon", "polyline", "rectangle",
               "skeleton", "tag")
PALETTE = ("#fa3253", "#3d3df5", "#34d1b7", "#ff6037", "#ddff33", "#24b353", "#b83df5", "#66ff66")

FORMATS: tuple[tuple[str, str, str, bool, str, bool], ...] = (
    # name, ext, version, enabled, dimension, importer too
    # CVAT exports its XML as "CVAT for images/video 1.1" and imports both as "CVAT 1.1".
    ("CVAT for images 1.1", "ZIP", "1.1", True, "2D", False),
    ("CVAT for video 1.1", "ZIP", "1.1", True, "2D", False),
    ("COCO 1.0", "ZIP", "1.0", True, "2D", True),
    ("YOLO 1.1", "ZIP", "1.1", True, "2D", True),
    ("Datumaro 1.0", "ZIP", "1.0", True, "2D", True),
    ("Datumaro 3D 1.0", "ZIP", "1.0", True, "3D", True),
    # CVAT lists TFRecord as disabled when TensorFlow is not installed on the server.
    ("TFRecord 1.0", "ZIP", "1.0", False, "2D", True),
)

IMPORT_ONLY_FORMATS: tuple[tuple[str, str, str, bool, str], ...] = (
    # name, ext, version, enabled, dimension (recorded a.04: listed first among the importers)
    ("CVAT 1.1", "XML, ZIP", "1.1", True, "2D"),
)


def now_iso() -> str:
    """A timestamp as CVAT writes them (microseconds, ``Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


SEED_DATE = "2026-11-22T17:39:04.114949Z"


@dataclass
class CvatState:
    """Everything the server knows. Mutate it under ``lock`` (the server's threads share it)."""

    users: dict[int, dict[str, Any]] = field(default_factory=dict)
    organizations: dict[int, dict[str, Any]] = field(default_factory=dict)
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    labels: dict[int, dict[str, Any]] = field(default_factory=dict)
    cloud_storages: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Background requests (exports) by rq_id."""
    issues: dict[int, dict[str, Any]] = field(default_factory=dict)
    webhooks: dict[int, dict[str, Any]] = field(default_factory=dict)
    deliveries: dict[int, dict[str, Any]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    """Personal access tokens (and login keys) -> user id."""
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """sessionid -> {"user_id", "csrftoken"}."""
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _ids: dict[str, itertools.count[int]] = field(default_factory=dict, repr=False)

    def next_id(self, kind: str) -> int:
        """A fresh id for a new record of this kind (above every seeded one)."""
        if kind not in self._ids:
            existing = getattr(self, kind, {})
            self._ids[kind] = itertools.count(max(existing, default=0) + 1)
        return next(self._ids[kind])

    def next_attribute_id(self) -> int:
        """A fresh attribute id (attributes live inside their labels)."""
        if "attributes" not in self._ids:
            seen = [a["id"] for lb in self.labels.values() for a in lb["attributes"]]
            self._ids["attributes"] = itertools.count(max(seen, default=0) + 1)
        return next(self._ids["attributes"])

    # -- lookups -------------------------------------------------------------------------------

    def user_by_name(self, username: str) -> dict[str, Any] | None:
        return next((u for u in self.users.values() if u["username"] == username), None)

    def org_by_slug(self, slug: str) -> dict[str, Any] | None:
        return next((o for o in self.organizations.values() if o["slug"] == slug), None)

    def task_jobs(self, task_id: int) -> list[dict[str, Any]]:
        return [j for j in self.jobs.values() if j["task_id"] == task_id]

    def labels_of(self, *, task_id: int | None = None, project_id: int | None = None) -> list[dict[str, Any]]:
        """Labels as CVAT resolves them: a task in a project uses the project's labels."""
        if task_id is not None:
            task = self.tasks[task_id]
            if task["project_id"] is not None:
                project_id = task["project_id"]
            else:
                return sorted((lb for lb in self.labels.values() if lb.get("task_id") == task_id),
                              key=lambda lb: lb["id"])
        return sorted((lb for lb in self.labels.values() if lb.get("project_id") == project_id),
                      key=lambda lb: lb["id"])

    # -- JSON, shaped like CVAT 2.73 ---------------------------------------------------------

    def basic_user(self, user_id: int | None, base: str) -> dict[str, Any] | None:
        if user_id is None:
            return None
        u = self.users[user_id]
        return {"url": f"{base}/api/users/{u['id']}", "id": u["id"], "username": u["username"],
                "first_name": u["first_name"], "last_name": u["last_name"]}

    def user_json(self, user_id: int, base: str, *, full: bool = True) -> dict[str, Any]:
        u = self.users[user_id]
        data = self.basic_user(user_id, base)
        assert data is not None
        if full:
            data.update({
                "email": u["email"], "groups": list(u["groups"]), "is_staff": u["is_staff"],
                "is_superuser": u["is_superuser"], "is_active": True, "last_login": SEED_DATE,
                "date_joined": SEED_DATE, "has_analytics_access": u["is_superuser"],
            })
        return data

    def project_json(self, project_id: int, base: str) -> dict[str, Any]:
        p = self.projects[project_id]
        tasks = [t for t in self.tasks.values() if t["project_id"] == project_id]
        return {
            "url": f"{base}/api/projects/{p['id']}",
            "id": p["id"],
            "name": p["name"],
            "owner": self.basic_user(p["owner_id"], base),
            "assignee": self.basic_user(p.get("assignee_id"), base),
            "guide_id": None,
            "bug_tracker": p.get("bug_tracker", ""),
            "created_date": p["created_date"],
            "updated_date": p["updated_date"],
            "status": "annotation",
            "dimension": "2d" if tasks else None,
            "organization": p.get("org_id"),
            "organization_id": p.get("org_id"),
            "target_storage": None,
            "source_storage": None,
            "tasks": {"count": len(tasks), "url": f"{base}/api/tasks?project_id={p['id']}"},
            "labels": {"url": f"{base}/api/labels?project_id={p['id']}"},
            "assignee_updated_date": p.get("assignee_updated_date"),
            "task_subsets": sorted({t["subset"] for t in tasks if t.get("subset")}),
        }

    def task_json(self, task_id: int, base: str) -> dict[str, Any]:
        t = self.tasks[task_id]
        project = self.projects.get(t["project_id"]) if t["project_id"] is not None else None
        jobs = self.task_jobs(task_id)
        statuses = [job_status(j) for j in jobs]
        data: dict[str, Any] = {
            "url": f"{base}/api/tasks/{t['id']}",
            "id": t["id"],
            "name": t["name"],
            "project_id": t["project_id"],
            "project_name": project["name"] if project else None,
            "owner": self.basic_user(t["owner_id"], base),
            "assignee": self.basic_user(t.get("assignee_id"), base),
            "bug_tracker": t.get("bug_tracker", ""),
            "created_date": t["created_date"],
            "updated_date": t["updated_date"],
            "overlap": 0,
            "segment_size": t.get("segment_size", 5),
            "status": task_status(statuses),
            "data_chunk_size": 72,
            "data_original_chunk_type": "imageset",
            "data_compressed_chunk_type": "imageset",
            "data_cloud_storage_id": None,
            "guide_id": None,
            "size": t.get("size", 0),
            "image_quality": 70,
            "data": t.get("data_id"),
            "dimension": "2d",
            "mode": "annotation",
            "media_type": "image",
            "subset": t.get("subset", ""),
            "organization_id": t.get("org_id"),
            "organization": t.get("org_id"),
            "target_storage": None,
            "source_storage": None,
            "jobs": {
                "count": len(jobs),
                "completed": statuses.count("completed"),
                "validation": statuses.count("validation"),
                "url": f"{base}/api/jobs?task_id={t['id']}",
            },
            "labels": {"url": f"{base}/api/labels?task_id={t['id']}"},
            "assignee_updated_date": t.get("assignee_updated_date"),
            "validation_mode": None,
            "consensus_enabled": False,
        }
        return data

    def job_json(self, job_id: int, base: str) -> dict[str, Any]:
        j = self.jobs[job_id]
        t = self.tasks[j["task_id"]]
        project = self.projects.get(t["project_id"]) if t["project_id"] is not None else None
        return {
            "url": f"{base}/api/jobs/{j['id']}",
            "id": j["id"],
            "task_id": t["id"],
            "task_name": t["name"],
            "project_id": t["project_id"],
            "project_name": project["name"] if project else None,
            "assignee": self.basic_user(j.get("assignee_id"), base),
            "guide_id": None,
            "dimension": "2d",
            "mode": "annotation",
            "media_type": "image",
            "bug_tracker": t.get("bug_tracker", ""),
            "status": job_status(j),
            "stage": j["stage"],
            "state": j["state"],
            "frame_count": j["stop_frame"] - j["start_frame"] + 1,
            "start_frame": j["start_frame"],
            "stop_frame": j["stop_frame"],
            "data_chunk_size": 72,
            "data_compressed_chunk_type": "imageset",
            "data_original_chunk_type": "imageset",
            "created_date": j["created_date"],
            "updated_date": j["updated_date"],
            "issues": {"url": f"{base}/api/issues?job_id={j['id']}", "count": 0},
            "labels": {"url": f"{base}/api/labels?job_id={j['id']}"},
            "type": j.get("type", "annotation"),
            "organization": t.get("org_id"),
            "target_storage": None,
            "source_storage": None,
            "assignee_updated_date": j.get("assignee_updated_date"),
            "parent_job_id": None,
            "replicas_count": 0,
            "consensus_replicas": 0,
        }

    def issue_json(self, issue_id: int, base: str) -> dict[str, Any]:
        """An issue as in ``create_issue.json``."""
        i = self.issues[issue_id]
        return {
            "id": i["id"],
            "frame": i["frame"],
            "position": list(i["position"]),
            "job": i["job_id"],
            "owner": self.basic_user(i["owner_id"], base),
            "assignee": self.basic_user(i.get("assignee_id"), base),
            "created_date": i["created_date"],
            "updated_date": i["updated_date"],
            "resolved": i.get("resolved", False),
            "comments": {"count": 0, "url": f"{base}/api/comments?issue_id={i['id']}"},
        }

    def label_json(self, label_id: int) -> dict[str, Any]:
        lb = self.labels[label_id]
        data: dict[str, Any] = {
            "id": lb["id"],
            "name": lb["name"],
            "color": lb["color"],
            "attributes": [dict(a) for a in lb["attributes"]],
            "type": lb.get("type", "any"),
            "sublabels": [],
            "has_parent": False,
        }
        # A label belongs to a project or a task: its JSON names only that one (so the labels of
        # a task in a project carry ``project_id``, no ``task_id``).
        del data["has_parent"]
        if lb.get("project_id") is not None:
            data["project_id"] = lb["project_id"]
        else:
            data["task_id"] = lb["task_id"]
        data["parent_id"] = None
        data["has_parent"] = False
        return data

    def request_json(self, rq: dict[str, Any]) -> dict[str, Any]:
        """A background request as ``GET /api/requests/{rq_id}`` answers it."""
        owner = self.users[rq["owner_id"]]
        return {
            "status": rq["status"],
            "message": rq.get("message", ""),
            "id": rq["id"],
            "operation": dict(rq["operation"]),
            # CVAT 2.73 reports progress 0.0 even for a finished export (see the captures).
            "progress": rq.get("progress", 0.0),
            "created_date": rq["created_date"],
            "started_date": rq.get("started_date"),
            "finished_date": rq.get("finished_date"),
            "expiry_date": rq.get("expiry_date"),
            "owner": {"id": owner["id"], "username": owner["username"]},
            "result_url": rq.get("result_url"),
            "result_id": None,
        }


def job_status(job: dict[str, Any]) -> str:
    """CVAT's legacy job ``status``, derived from stage and state."""
    if job["stage"] == "acceptance" and job["state"] == "completed":
        return "completed"
    return "validation" if job["stage"] == "validation" else "annotation"


def task_status(job_statuses: list[str]) -> str:
    if job_statuses and all(s == "completed" for s in job_statuses):
        return "completed"
    if any(s == "annotation" for s in job_statuses) or not job_statuses:
        return "annotation"
    return "validation"


def attribute(attr_id: int, name: str, input_type: str = "text", values: list[str] | None = None,
              *, mutable: bool = False, default_value: str | None = None) -> dict[str, Any]:
    values = list(values or ([] if input_type != "checkbox" else ["false"]))
    return {"id": attr_id, "name": name, "mutable": mutable, "input_type": input_type,
            "default_value": default_value if default_value is not None else (values[0] if values else ""),
            "values": values}


def seed(state: CvatState, *, token: str | None) -> None:
    """The world of the 2.73 captures: admin, project 1 ``webhook-demo``, task 2 ``wh-task-1``..."""
    people = [
        (1, "admin", "", "", "admin@example.com", "admin-password", True, ["admin"]),
        (2, "alice", "Alice", "Anders", "alice@example.com", "alice-password", False, ["user"]),
        (3, "bob", "Bob", "Brown", "bob@example.com", "bob-password", False, ["worker"]),
        (4, "carol", "Carol", "Chen", "carol@example.com", "carol-password", False, ["user"]),
    ]
    for uid, username, first, last, email, password, admin, groups in people:
        state.users[uid] = {"id": uid, "username": username, "first_name": first, "last_name": last,
                            "email": email, "password": password, "is_staff": admin,
                            "is_superuser": admin, "groups": groups,
                            # The captures' team may open every task and job (see check_object_permission).
                            "sees_all": True}
    # acme: admin owns it, alice is a member; bob is not (user lists in its context omit him).
    state.organizations[1] = {"id": 1, "slug": "acme", "name": "ACME Inc.", "owner_id": 1,
                              "members": {1: "owner", 2: "worker"}}
    state.cloud_storages[1] = {"id": 1, "display_name": "exports-bucket", "provider_type": "AWS_S3_BUCKET",
                               "resource": "exports-bucket"}
    state.projects[1] = {"id": 1, "name": "webhook-demo", "owner_id": 1, "assignee_id": None,
                         "org_id": None, "created_date": "2026-11-22T17:38:10.000000Z",
                         "updated_date": "2026-11-22T17:38:10.000000Z"}
    state.tasks[2] = {"id": 2, "name": "wh-task-1", "project_id": 1, "owner_id": 1, "assignee_id": None,
                      "org_id": None, "created_date": SEED_DATE, "updated_date": SEED_DATE,
                      "size": 10, "data_id": 2, "segment_size": 5}
    state.tasks[3] = {"id": 3, "name": "standalone-task", "project_id": None, "owner_id": 2,
                      "assignee_id": None, "org_id": None, "created_date": SEED_DATE,
                      "updated_date": SEED_DATE, "size": 5, "data_id": 3, "segment_size": 5}
    for jid, tid, start, stop in ((1, 2, 0, 4), (3, 2, 5, 9), (2, 3, 0, 4)):
        state.jobs[jid] = {"id": jid, "task_id": tid, "start_frame": start, "stop_frame": stop,
                           "stage": "annotation", "state": "new", "assignee_id": None,
                           "created_date": "2026-11-22T17:39:04.867646Z",
                           "updated_date": "2026-11-22T17:39:04.867661Z", "type": "annotation"}
    state.labels[1] = {"id": 1, "name": "car", "color": PALETTE[0], "type": "rectangle", "project_id": 1,
                       "attributes": [attribute(1, "color", "select", ["red", "blue", "white"])]}
    state.labels[2] = {"id": 2, "name": "person", "color": PALETTE[1], "type": "any", "project_id": 1,
                       "attributes": [attribute(2, "occluded_by", "text", [""], mutable=True)]}
    state.labels[3] = {"id": 3, "name": "tree", "color": PALETTE[2], "type": "polygon", "task_id": 3,
                       "attributes": []}
    if token:
        state.tokens[token] = 1
