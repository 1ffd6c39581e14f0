"""The objects a contract run creates first: on the test CVAT server, or on a real CVAT (then deleted).

Both build the scenario of the 2.73 recordings: a project with rectangle labels ``car`` and
``person`` (and an empty one, so that there are three projects to page through), a task in it
(3 frames, segment size 2: two jobs), a task without a project with its own ``car`` and ``person``
(2 frames, one job), an organization the admin owns, a second user who belongs to nothing (the
"outsider"), and a listener for webhook deliveries.
"""

from __future__ import annotations

import base64
import io
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import urllib3

from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer, WebhookSink

from .runner import MEDIA_JSON, World

LABELS = [{"name": "car", "type": "rectangle"}, {"name": "person", "type": "rectangle"}]
MISSING_ID = 987654
"""An id no object has (the recordings' choice)."""


def basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def roles(admin: dict[str, str], outsider: dict[str, str], admin_username: str) -> dict[str, dict[str, str]]:
    """Headers of each role an exchange may act as (every request names CVAT's media type unless
    the exchange sets its own ``Accept``)."""
    accept = {"Accept": MEDIA_JSON}
    return {
        "admin": {**accept, **admin},
        "admin-no-accept": dict(admin),
        "outsider": {**accept, **outsider},
        "anonymous": dict(accept),
        "bad-token": {**accept, "Authorization": "Bearer not-a-valid-token-0000"},
        "wrong-basic": {**accept, **basic(admin_username, "wrong-password")},
    }


@contextmanager
def standin_world(server: CvatTestServer) -> Iterator[World]:
    """The scenario on a started test server (its state is thrown away with it)."""
    with WebhookSink() as sink:
        annotator = server.add_user("annotator1", password="annotator1-password", first_name="Anno",
                                    last_name="Tator")
        server.add_project("contract-extra-project")  # three projects: page 2 of page_size=1 has a next
        project = server.add_project("contract-project", labels=LABELS)
        in_project = server.add_task("contract-task-in-project", project_id=project, jobs=2, frames_per_job=2)
        alone = server.add_task("contract-task-no-project", labels=LABELS, jobs=1, frames_per_job=2)
        st = server.state
        with st.lock:
            st.tasks[alone]["frame_names"] = [f"{i}.png" for i in range(2)]  # as RealCvat.task uploads them
            jobs = sorted(j["id"] for j in st.task_jobs(in_project))
            project_labels = {lb["name"]: lb["id"] for lb in st.labels_of(project_id=project)}
            task_labels = {lb["name"]: lb["id"] for lb in st.labels_of(task_id=alone)}
            org = st.organizations[1]
        values = {
            "project": project, "task_in_project": in_project, "task_no_project": alone, "job": jobs[0],
            "project_label_car": project_labels["car"], "project_label_person": project_labels["person"],
            "task_label_car": task_labels["car"], "task_label_person": task_labels["person"],
            "org": org["slug"], "org_id": org["id"], "annotator_id": annotator, "annotator": "annotator1",
            "admin_username": "admin", "admin_password": "admin-password", "outsider_password": "annotator1-password",
            "sink_url": sink.url + "/hook", "missing": MISSING_ID, "tag": "standin",
        }
        auth = roles({"Authorization": f"Bearer {DEFAULT_TOKEN}"}, basic("annotator1", "annotator1-password"),
                     "admin")
        world = World(server.url, values, auth)
        try:
            yield world
        finally:
            world.http.clear()


# -- a real CVAT -------------------------------------------------------------------------------------


def png(seed: int) -> bytes:
    """A small generated image (Pillow comes with cvat-sdk)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), ((seed * 70) % 256, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


class RealCvat:
    """Admin calls to a real CVAT, for building and removing a contract world."""

    def __init__(self, url: str, username: str, password: str) -> None:
        self.url, self.username, self.password = url.rstrip("/"), username, password
        self.http = urllib3.PoolManager(retries=False, timeout=60)
        self.admin = {"Accept": MEDIA_JSON, **basic(username, password)}

    def call(self, method: str, path: str, *, json: Any = None, fields: Any = None,
             headers: dict[str, str] | None = None, ok: tuple[int, ...] = (200, 201, 202, 204)) -> Any:
        all_headers = {**self.admin, **(headers or {})}
        response = self.http.request(method, self.url + path, json=json, fields=fields, headers=all_headers)
        if response.status not in ok:
            raise RuntimeError(f"{method} {path}: {response.status} {response.data[:300]!r}")
        return response.json() if response.data and "json" in response.headers.get("Content-Type", "") else None

    def wait(self, rq_id: str) -> None:
        from urllib.parse import quote

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = self.call("GET", f"/api/requests/{quote(rq_id, safe='')}")["status"]
            if status == "finished":
                return
            if status == "failed":
                raise RuntimeError(f"CVAT request {rq_id} failed")
            time.sleep(0.5)
        raise RuntimeError(f"CVAT request {rq_id} did not finish")

    def task(self, name: str, frames: int, **fields: Any) -> int:
        task = self.call("POST", "/api/tasks", json={"name": name, "segment_size": 2, **fields})
        files: dict[str, Any] = {"image_quality": "70"}
        for i in range(frames):
            files[f"client_files[{i}]"] = (f"{i}.png", png(i), "image/png")
        started = self.call("POST", f"/api/tasks/{task['id']}/data", fields=files)
        self.wait(started["rq_id"])
        return int(task["id"])


@contextmanager
def real_world(url: str, username: str, password: str) -> Iterator[World]:
    """The scenario on a real CVAT, with unique names; everything it made is deleted afterwards
    (webhooks, tasks, the project, the organization, the outsider's account)."""
    cvat = RealCvat(url, username, password)
    tag = secrets.token_hex(3)
    made: dict[str, Any] = {"tag": tag}
    sink = WebhookSink().start()
    try:
        org = cvat.call("POST", "/api/organizations", json={"slug": f"contract-{tag}", "name": f"contract {tag}"})
        made["org"] = org["id"]
        outsider = f"contract-outsider-{tag}"
        outsider_password = f"Outsider-{secrets.token_hex(8)}"
        cvat.http.request("POST", cvat.url + "/api/auth/register", headers={"Accept": MEDIA_JSON}, json={
            "username": outsider, "email": f"{outsider}@example.com", "password1": outsider_password,
            "password2": outsider_password, "first_name": "Anno", "last_name": "Tator"})
        found = cvat.call("GET", f"/api/users?username={outsider}")["results"]
        if not found:
            raise RuntimeError("could not register the outsider account (is self-registration disabled?)")
        made["user"] = found[0]["id"]
        for key in ("extra_project", "extra_project_2"):  # with the next one: page 2 of page_size=1 has a next
            extra = cvat.call("POST", "/api/projects", json={"name": f"contract-{key.replace('_', '-')}-{tag}"})
            made[key] = extra["id"]
        project = cvat.call("POST", "/api/projects", json={"name": f"contract-project-{tag}", "labels": LABELS})
        made["project"] = project["id"]
        in_project = cvat.task(f"contract-task-in-project-{tag}", 3, project_id=project["id"])
        alone = cvat.task(f"contract-task-no-project-{tag}", 2, labels=LABELS)
        made["task"] = alone
        jobs = sorted(j["id"] for j in cvat.call("GET", f"/api/jobs?task_id={in_project}")["results"])
        labels = cvat.call("GET", f"/api/labels?project_id={project['id']}")["results"]
        task_labels = cvat.call("GET", f"/api/labels?task_id={alone}")["results"]
        values = {
            "project": project["id"], "task_in_project": in_project, "task_no_project": alone, "job": jobs[0],
            "project_label_car": next(lb["id"] for lb in labels if lb["name"] == "car"),
            "project_label_person": next(lb["id"] for lb in labels if lb["name"] == "person"),
            "task_label_car": next(lb["id"] for lb in task_labels if lb["name"] == "car"),
            "task_label_person": next(lb["id"] for lb in task_labels if lb["name"] == "person"),
            "org": org["slug"], "org_id": org["id"], "annotator_id": made["user"], "annotator": outsider,
            "admin_username": username, "admin_password": password, "outsider_password": outsider_password,
            "sink_url": sink.url + "/hook", "missing": MISSING_ID, "tag": tag,
        }
        world = World(cvat.url, values, roles(basic(username, password), basic(outsider, outsider_password),
                                              username))
        yield world
        world.http.clear()
    finally:
        sink.stop()
        _clean(cvat, made)


def _clean(cvat: RealCvat, made: dict[str, Any]) -> None:
    """Delete what a real world made; a failure here is reported, not hidden."""
    problems = []
    org_slug = None
    if "org" in made:
        org = cvat.call("GET", f"/api/organizations/{made['org']}", ok=(200, 404))
        org_slug = org.get("slug") if org else None
    hooks = cvat.call("GET", f"/api/webhooks?project_id={made['project']}&page_size=100")["results"] \
        if "project" in made else []
    if org_slug:
        hooks += cvat.call("GET", "/api/webhooks?page_size=100", headers={"X-Organization": org_slug})["results"]
    for hook in hooks:
        extra = {"X-Organization": org_slug} if hook.get("organization") and org_slug else {}
        cvat.call("DELETE", f"/api/webhooks/{hook['id']}", headers=extra, ok=(204, 404))
    if "tag" in made:  # what exchanges created (``contract-created-project-{tag}``)
        created = cvat.call("GET", f"/api/projects?search=contract-created-project-{made['tag']}")["results"]
        made.update({f"created_{p['id']}": p["id"] for p in created})
    for kind, key in (("tasks", "task"), ("projects", "project"), ("projects", "extra_project"),
                      ("projects", "extra_project_2"),
                      *(("projects", k) for k in made if k.startswith("created_")),
                      ("organizations", "org"), ("users", "user")):
        if key in made:
            try:
                cvat.call("DELETE", f"/api/{kind}/{made[key]}", ok=(204, 404))
            except RuntimeError as exc:
                problems.append(str(exc))
    cvat.http.clear()
    if problems:
        raise RuntimeError("contract cleanup on the real CVAT failed: " + "; ".join(problems))
