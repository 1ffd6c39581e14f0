"""The REST endpoints of the test CVAT server: the shapes cvat-sdk 2.80 calls, answered as CVAT 2.73.

Views read the server from ``current_app.extensions`` (one app per server, as in Flask's tutorial)
and mutate ``server.state`` under its lock. Errors are CVAT's JSON: ``{"detail": ...}`` for
404/401/403, DRF validation bodies for 400.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qsl, urlencode

from flask import Flask, Response, current_app, g, jsonify, request

from .state import (
    ATTRIBUTE_INPUT_TYPES,
    FORMATS,
    IMPORT_ONLY_FORMATS,
    JOB_STAGES,
    JOB_STATES,
    LABEL_TYPES,
    PALETTE,
    now_iso,
)

if TYPE_CHECKING:
    from .server import CvatTestServer

PUBLIC_PATHS = frozenset({"/api/server/about", "/api/auth/login"})
"""What CVAT answers without credentials."""

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

CHALLENGE = {"WWW-Authenticate": "Token"}
"""What DRF sends with a 401 (CVAT's first authentication class is token authentication)."""


class ApiError(Exception):
    """An answer other than success, with CVAT's body."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def not_found(model: str) -> NoReturn:
    raise ApiError(404, {"detail": f"No {model} matches the given query."})


def server() -> CvatTestServer:
    return current_app.extensions["cvat_test_server"]


def base_url() -> str:
    """``http://host:port`` as the client addressed us (CVAT builds its URLs the same way)."""
    return request.host_url.rstrip("/")


def paginate(items: list[Any]) -> dict[str, Any]:
    """DRF's page-number pagination: ``page`` (from 1) and ``page_size`` (default 10)."""
    try:
        page = int(request.args.get("page", 1))
        page_size = max(1, min(int(request.args.get("page_size", 10)), 1000))
    except ValueError:
        raise ApiError(404, {"detail": "Invalid page."}) from None
    start = (page - 1) * page_size
    if page < 1 or (page > 1 and start >= len(items)):
        raise ApiError(404, {"detail": "Invalid page."})

    def link(number: int) -> str:
        # DRF's replace_query_param / remove_query_param: the query sorted by name, and no
        # ``page=1`` in the link to the first page (``?page_size=1``, as the captures show).
        args = {k: v for k, v in parse_qsl(request.query_string.decode(), keep_blank_values=True)}
        args.pop("page", None)
        if number > 1:
            args["page"] = str(number)
        return f"{base_url()}{request.path}?{urlencode(sorted(args.items()))}"

    return {
        "count": len(items),
        "next": link(page + 1) if start + page_size < len(items) else None,
        "previous": link(page - 1) if page > 1 else None,
        "results": items[start:start + page_size],
    }


def int_arg(name: str) -> int | None:
    value = request.args.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, {name: ["A valid integer is required."]}) from None


# -- authentication and organization context ---------------------------------------------------


def authenticate() -> None:
    """Sets ``g.user_id`` and ``g.auth`` from a PAT, a login key, Basic auth or a session cookie."""
    st = server().state
    header = request.headers.get("Authorization", "")
    scheme, _, credential = header.partition(" ")
    g.user_id, g.auth = None, None
    with st.lock:
        if scheme.lower() in ("bearer", "token") and credential:
            if credential not in st.tokens:
                raise ApiError(401, {"detail": "Invalid token."}, CHALLENGE)
            g.user_id, g.auth = st.tokens[credential], scheme.lower()
        elif scheme.lower() == "basic" and credential:
            try:
                username, _, password = base64.b64decode(credential).decode().partition(":")
            except ValueError:
                raise ApiError(401, {"detail": "Invalid basic header."}, CHALLENGE) from None
            user = st.user_by_name(username)
            if user is None or user["password"] != password:
                raise ApiError(401, {"detail": "Invalid username/password."}, CHALLENGE)
            g.user_id, g.auth = user["id"], "basic"
        elif request.cookies.get("sessionid") in st.sessions:
            session = st.sessions[request.cookies["sessionid"]]
            if request.method in UNSAFE_METHODS and (
                request.headers.get("X-CSRFToken") != session["csrftoken"]
                or request.cookies.get("csrftoken") != session["csrftoken"]
            ):
                raise ApiError(403, {"detail": "CSRF Failed: CSRF token missing or incorrect."})
            g.user_id, g.auth = session["user_id"], "session"
    if g.user_id is None and request.path not in PUBLIC_PATHS:
        raise ApiError(401, {"detail": "Authentication credentials were not provided."}, CHALLENGE)


def organization_context() -> None:
    """``X-Organization: <slug>`` (or ``?org=``) as CVAT's IAM reads it: unknown -> 404, not a
    member -> 403 (admins may enter any organization)."""
    st = server().state
    slug = request.headers.get("X-Organization") or request.args.get("org")
    g.org_id = None
    if not slug or g.user_id is None:
        return
    with st.lock:
        org = st.org_by_slug(slug)
        if org is None:
            raise ApiError(404, {"detail": f"{slug} organization does not exist."})
        if g.user_id not in org["members"] and not st.users[g.user_id]["is_superuser"]:
            raise ApiError(403, {"detail": "You do not have permission to perform this action."})
        g.org_id = org["id"]


def parse_json_body() -> None:
    """DRF's JSONParser: a body that is not JSON is 400 ``JSON parse error - <Python's message>``."""
    if request.method not in UNSAFE_METHODS or not request.get_data() or not request.is_json:
        return
    try:
        json.loads(request.get_data())
    except ValueError as exc:
        raise ApiError(400, {"detail": f"JSON parse error - {exc}"}) from None


def check_object_permission() -> None:
    """CVAT's IAM for one project, task or job: someone other than an admin sees it only as its
    owner or assignee (a job's assignee sees its task), or as a member of its organization.
    The seeded team (alice, bob, carol: ``sees_all``) is exempt, as the captures' annotators were;
    users made with ``add_user`` are not. A missing object is left to the view (404 comes first)."""
    args = request.view_args or {}
    if request.endpoint not in ("project_detail", "task_detail", "job_detail") or g.user_id is None:
        return
    st = server().state
    with st.lock:
        user = st.users[g.user_id]
        if user["is_superuser"] or user.get("sees_all"):
            return
        if "job_id" in args:
            job = st.jobs.get(args["job_id"])
            records = [job, st.tasks[job["task_id"]]] if job else []
        elif "task_id" in args:
            task = st.tasks.get(args["task_id"])
            records = [task, *st.task_jobs(task["id"])] if task else []
        else:
            project = st.projects.get(args["project_id"])
            records = [project] if project else []
        if not records:
            return
        task = records[1] if "job_id" in args else records[0]
        if task.get("project_id") is not None and "project_id" not in args:
            records.append(st.projects[task["project_id"]])
        org_id = task.get("org_id")
        org = st.organizations.get(org_id) if org_id is not None else None
        if any(g.user_id in (r.get("owner_id"), r.get("assignee_id")) for r in records) or (
                org is not None and g.user_id in org["members"]):
            return
    raise ApiError(403, {"detail": "You do not have permission to perform this action."})


# -- server, auth, users ----------------------------------------------------------------------


def about() -> Any:
    return jsonify({"name": "Computer Vision Annotation Tool", "description": "CVAT test server",
                    "version": server().version, "logo_url": f"{base_url()}/static/logo.svg",
                    "subtitle": "Test server for cvat-hooks"})


def formats() -> Any:
    def fmt(name: str, ext: str, version: str, enabled: bool, dimension: str) -> dict[str, Any]:
        return {"name": name, "ext": ext, "version": version, "enabled": enabled, "dimension": dimension}

    return jsonify({
        "importers": [fmt(*f) for f in IMPORT_ONLY_FORMATS] + [fmt(*f[:5]) for f in FORMATS if f[5]],
        "exporters": [fmt(*f[:5]) for f in FORMATS],
    })


def login() -> Any:
    st = server().state
    body = request.get_json(silent=True) or {}
    with st.lock:
        user = st.user_by_name(body.get("username") or "") or next(
            (u for u in st.users.values() if body.get("email") and u["email"] == body.get("email")), None)
        if user is None or user["password"] != body.get("password"):
            raise ApiError(400, {"non_field_errors": ["Unable to log in with provided credentials."]})
        sessionid, csrftoken, key = secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(20)
        st.sessions[sessionid] = {"user_id": user["id"], "csrftoken": csrftoken}
        st.tokens[key] = user["id"]
    response = jsonify({"key": key})
    response.set_cookie("sessionid", sessionid, httponly=True, samesite="Lax")
    response.set_cookie("csrftoken", csrftoken, samesite="Lax")
    return response


def logout() -> Any:
    st = server().state
    with st.lock:
        st.sessions.pop(request.cookies.get("sessionid", ""), None)
    response = jsonify({"detail": "Successfully logged out."})
    response.delete_cookie("sessionid")
    response.delete_cookie("csrftoken")
    return response


def users_self() -> Any:
    st = server().state
    with st.lock:
        return jsonify(st.user_json(g.user_id, base_url()))


def users_list() -> Any:
    """``search`` matches username, first and last name; ``username`` etc. are exact filters.
    In an organization's context only its members are listed."""
    st = server().state
    search = (request.args.get("search") or "").lower()
    exact = {k: request.args[k] for k in ("username", "first_name", "last_name") if k in request.args}
    uid = int_arg("id")
    with st.lock:
        full = st.users[g.user_id]["is_superuser"]
        members = st.organizations[g.org_id]["members"] if g.org_id else None
        users = [
            st.user_json(u["id"], base_url(), full=full)
            for u in sorted(st.users.values(), key=lambda u: u["id"])
            if (members is None or u["id"] in members)
            and (not search or any(search in u[f].lower() for f in ("username", "first_name", "last_name")))
            and all(u[k] == v for k, v in exact.items())
            and (uid is None or u["id"] == uid)
        ]
        return jsonify(paginate(users))


def user_detail(user_id: int) -> Any:
    st = server().state
    with st.lock:
        if user_id not in st.users:
            not_found("User")
        return jsonify(st.user_json(user_id, base_url(), full=st.users[g.user_id]["is_superuser"]))


# -- projects, tasks, jobs, labels ------------------------------------------------------------


def _validate_labels(payload: Any, existing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DRF-like validation of ``labels`` in a PATCH; returns them normalised."""
    if not isinstance(payload, list):
        raise ApiError(400, {"labels": ['Expected a list of items but got type "dict".']})
    names = {lb["name"] for lb in existing}
    ids = {lb["id"] for lb in existing}
    out = []
    for item in payload:
        if not isinstance(item, dict) or not isinstance(item.get("name", ""), str):
            raise ApiError(400, {"labels": [{"name": ["Not a valid string."]}]})
        if item.get("id") is not None:
            if item["id"] not in ids:
                raise ApiError(404, {"detail": f"Not found label with id #{item['id']} to change"})
        elif not item.get("name"):
            raise ApiError(400, {"labels": [{"name": ["This field is required."]}]})
        elif item["name"] in names:
            raise ApiError(400, ["All label names must be unique"])
        if item.get("type", "any") not in LABEL_TYPES:
            raise ApiError(400, {"labels": [{"type": [f"\"{item['type']}\" is not a valid choice."]}]})
        attrs = item.get("attributes", [])
        for attr in attrs if isinstance(attrs, list) else [None]:
            if not isinstance(attr, dict):
                raise ApiError(400, {"labels": [{"attributes": ["Expected a list of items."]}]})
            missing = [k for k in ("name", "mutable", "input_type", "values") if k not in attr]
            if missing:
                required = {k: ["This field is required."] for k in missing}
                raise ApiError(400, {"labels": [{"attributes": [required]}]})
            if attr["input_type"] not in ATTRIBUTE_INPUT_TYPES:
                raise ApiError(400, {"labels": [{"attributes": [
                    {"input_type": [f"\"{attr['input_type']}\" is not a valid choice."]}]}]})
        names.add(item.get("name", ""))
        out.append(item)
    return out


def _apply_labels(items: list[dict[str, Any]], *, task_id: int | None = None,
                  project_id: int | None = None) -> None:
    st = server().state
    used = {lb["color"] for lb in st.labels_of(task_id=task_id, project_id=project_id)}
    for item in items:
        attrs = [{"id": st.next_attribute_id(), "name": a["name"], "mutable": bool(a["mutable"]),
                  "input_type": a["input_type"], "values": [str(v) for v in a["values"]],
                  "default_value": str(a.get("default_value") or (a["values"][0] if a["values"] else ""))}
                 for a in item.get("attributes", [])]
        if item.get("id") is not None:
            label = st.labels[item["id"]]
            if item.get("deleted"):
                del st.labels[item["id"]]
                continue
            label["name"] = item.get("name") or label["name"]
            label["color"] = item.get("color") or label["color"]
            known = {a["name"] for a in label["attributes"]}
            label["attributes"].extend(a for a in attrs if a["name"] not in known)
            continue
        fallback = PALETTE[len(used) % len(PALETTE)]
        color = item.get("color") or next((c for c in PALETTE if c not in used), fallback)
        used.add(color)
        label_id = st.next_id("labels")
        owner = {"project_id": project_id} if project_id is not None else {"task_id": task_id}
        st.labels[label_id] = {"id": label_id, "name": item["name"], "color": color,
                               "type": item.get("type", "any"), "attributes": attrs, **owner}


def project_detail(project_id: int) -> Any:
    st = server().state
    with st.lock:
        if project_id not in st.projects:
            not_found("Project")
        if request.method == "PATCH":
            body = request.get_json(silent=True) or {}
            before = st.project_json(project_id, base_url())
            project = st.projects[project_id]
            if "labels" in body:
                _apply_labels(_validate_labels(body["labels"], st.labels_of(project_id=project_id)),
                              project_id=project_id)
            for key in ("name", "bug_tracker"):
                if key in body:
                    project[key] = body[key]
            if "assignee_id" in body:
                project["assignee_id"] = _user_ref(body["assignee_id"], "assignee_id")
            project["updated_date"] = now_iso()
            server().resource_changed("project", project_id, before, st.project_json(project_id, base_url()),
                                      g.user_id)
        return jsonify(st.project_json(project_id, base_url()))


def _user_ref(value: Any, field: str) -> int | None:
    st = server().state
    if value is None:
        return None
    if not isinstance(value, int) or value not in st.users:
        raise ApiError(400, {field: [f'Invalid pk "{value}" - object does not exist.']})
    return value


def ordered(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items in the order of ``?sort=`` (DRF's ordering: ``field``, ``-field``, comma-separated, by the
    serialized values), newest id first without it, as CVAT's lists default to."""
    items = sorted(items, key=lambda item: -item["id"])
    for field in reversed([f for f in request.args.get("sort", "").split(",") if f]):
        name = field.lstrip("-")
        items.sort(key=lambda item: (item.get(name) is None, item.get(name) or ""), reverse=field.startswith("-"))
    return items


def projects_list() -> Any:
    st = server().state
    with st.lock:
        # In an organization's context (``?org=``, ``X-Organization``) only its projects are listed.
        return jsonify(paginate(ordered([st.project_json(p["id"], base_url()) for p in st.projects.values()
                                         if g.org_id is None or p.get("org_id") == g.org_id])))


def tasks_list() -> Any:
    st = server().state
    project_id = int_arg("project_id")
    with st.lock:
        items = [st.task_json(t["id"], base_url()) for t in st.tasks.values()
                 if project_id is None or t["project_id"] == project_id]
        return jsonify(paginate(ordered(items)))


def task_detail(task_id: int) -> Any:
    st = server().state
    with st.lock:
        if task_id not in st.tasks:
            not_found("Task")
        if request.method == "PATCH":
            body = request.get_json(silent=True) or {}
            before = st.task_json(task_id, base_url())
            task = st.tasks[task_id]
            labels = _validate_labels(body.get("labels", []), st.labels_of(task_id=task_id))
            # CVAT applies task labels only to a task outside any project; for a task in a project
            # the labels are silently ignored (they belong to the project).
            if labels and task["project_id"] is None:
                _apply_labels(labels, task_id=task_id)
            for key in ("name", "bug_tracker", "subset"):
                if key in body:
                    task[key] = body[key]
            if "assignee_id" in body:
                task["assignee_id"] = _user_ref(body["assignee_id"], "assignee_id")
                task["assignee_updated_date"] = now_iso()
            task["updated_date"] = now_iso()
            server().resource_changed("task", task_id, before, st.task_json(task_id, base_url()), g.user_id)
        return jsonify(st.task_json(task_id, base_url()))


def jobs_list() -> Any:
    st = server().state
    task_id, project_id = int_arg("task_id"), int_arg("project_id")
    stage, state_ = request.args.get("stage"), request.args.get("state")
    with st.lock:
        items = [
            st.job_json(j["id"], base_url()) for j in st.jobs.values()
            if (task_id is None or j["task_id"] == task_id)
            and (project_id is None or st.tasks[j["task_id"]]["project_id"] == project_id)
            and (stage is None or j["stage"] == stage) and (state_ is None or j["state"] == state_)
        ]
        return jsonify(paginate(ordered(items)))


def job_detail(job_id: int) -> Any:
    st = server().state
    with st.lock:
        if job_id not in st.jobs:
            not_found("Job")
        if request.method == "PATCH":
            body = request.get_json(silent=True) or {}
            before = st.job_json(job_id, base_url())
            job = st.jobs[job_id]
            stage, state_ = body.get("stage"), body.get("state")
            if stage is not None and stage not in JOB_STAGES:
                raise ApiError(400, {"stage": [f'"{stage}" is not a valid choice.']})
            if state_ is not None and state_ not in JOB_STATES:
                raise ApiError(400, {"state": [f'"{state_}" is not a valid choice.']})
            if "assignee" in body:
                assignee = _user_ref(body["assignee"], "assignee")
                if assignee != job.get("assignee_id"):
                    job["assignee_id"] = assignee
                    job["assignee_updated_date"] = now_iso()
            if stage is not None:
                # CVAT resets the state when the stage changes and no state is given.
                if stage != job["stage"] and state_ is None:
                    job["state"] = "new"
                job["stage"] = stage
            if state_ is not None:
                job["state"] = state_
            job["updated_date"] = now_iso()
            server().resource_changed("job", job_id, before, st.job_json(job_id, base_url()), g.user_id)
        return jsonify(st.job_json(job_id, base_url()))


def labels_list() -> Any:
    """A task in a project answers its project's labels, as CVAT does."""
    st = server().state
    task_id, project_id, job_id = int_arg("task_id"), int_arg("project_id"), int_arg("job_id")
    with st.lock:
        if job_id is not None:
            task_id = st.jobs[job_id]["task_id"] if job_id in st.jobs else -1
        if task_id is not None:
            labels = st.labels_of(task_id=task_id) if task_id in st.tasks else []
        elif project_id is not None:
            labels = st.labels_of(project_id=project_id)
        else:
            labels = sorted(st.labels.values(), key=lambda lb: lb["id"])
        return jsonify(paginate([st.label_json(lb["id"]) for lb in labels]))


def label_detail(label_id: int) -> Any:
    st = server().state
    with st.lock:
        if label_id not in st.labels:
            not_found("Label")
        return jsonify(st.label_json(label_id))


# -- creating and deleting -------------------------------------------------------------------


def no_content() -> Response:
    """DRF's 204: no body and no Content-Type."""
    response = Response(status=204)
    response.headers.pop("Content-Type", None)
    return response


def project_create() -> Any:
    """``POST /api/projects``: ``name`` required, ``labels`` validated as in a PATCH; 201 with Location."""
    st = server().state
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, {"non_field_errors": [
            f"Invalid data. Expected a dictionary, but got {type(body).__name__}."]})
    if not body.get("name"):
        raise ApiError(400, {"name": ["This field is required." if "name" not in body
                                      else "This field may not be blank."]})
    with st.lock:
        labels = _validate_labels(body.get("labels", []), [])
        project_id = st.next_id("projects")
        st.projects[project_id] = {"id": project_id, "name": body["name"], "owner_id": g.user_id,
                                   "assignee_id": None, "org_id": g.org_id, "created_date": now_iso(),
                                   "updated_date": now_iso(), "bug_tracker": body.get("bug_tracker", "")}
        _apply_labels(labels, project_id=project_id)
        data = st.project_json(project_id, base_url())
    return jsonify(data), 201, {"Location": data["url"]}


def _delete_task(task_id: int) -> None:
    st = server().state
    for job_id in [j["id"] for j in st.task_jobs(task_id)]:
        del st.jobs[job_id]
    for label_id in [lb["id"] for lb in st.labels.values() if lb.get("task_id") == task_id]:
        del st.labels[label_id]
    del st.tasks[task_id]


def project_delete(project_id: int) -> Any:
    """``DELETE /api/projects/{id}``: its tasks, jobs and labels go with it."""
    st = server().state
    with st.lock:
        if project_id not in st.projects:
            not_found("Project")
        for task_id in [t["id"] for t in st.tasks.values() if t["project_id"] == project_id]:
            _delete_task(task_id)
        for label_id in [lb["id"] for lb in st.labels.values() if lb.get("project_id") == project_id]:
            del st.labels[label_id]
        del st.projects[project_id]
    return no_content()


def task_delete(task_id: int) -> Any:
    st = server().state
    with st.lock:
        if task_id not in st.tasks:
            not_found("Task")
        _delete_task(task_id)
    return no_content()


def label_delete(label_id: int) -> Any:
    st = server().state
    with st.lock:
        if label_id not in st.labels:
            not_found("Label")
        del st.labels[label_id]
    return no_content()


def register(app: Flask) -> None:
    """Routes of the REST API (exports and webhooks register their own)."""
    rules: list[tuple[str, Any, list[str]]] = [
        ("/api/server/about", about, ["GET"]),
        ("/api/server/annotation/formats", formats, ["GET"]),
        ("/api/auth/login", login, ["POST"]),
        ("/api/auth/logout", logout, ["POST"]),
        ("/api/users/self", users_self, ["GET"]),
        ("/api/users", users_list, ["GET"]),
        ("/api/users/<int:user_id>", user_detail, ["GET"]),
        ("/api/projects", projects_list, ["GET"]),
        ("/api/projects/<int:project_id>", project_detail, ["GET", "PATCH"]),
        ("/api/tasks", tasks_list, ["GET"]),
        ("/api/tasks/<int:task_id>", task_detail, ["GET", "PATCH"]),
        ("/api/jobs", jobs_list, ["GET"]),
        ("/api/jobs/<int:job_id>", job_detail, ["GET", "PATCH"]),
        ("/api/labels", labels_list, ["GET"]),
        ("/api/labels/<int:label_id>", label_detail, ["GET"]),
    ]
    for rule, view, methods in rules:
        app.add_url_rule(rule, view.__name__, view, methods=methods)
    # Same URLs, other methods: Werkzeug picks the rule by method.
    writes: list[tuple[str, Any, list[str]]] = [
        ("/api/projects", project_create, ["POST"]),
        ("/api/projects/<int:project_id>", project_delete, ["DELETE"]),
        ("/api/tasks/<int:task_id>", task_delete, ["DELETE"]),
        ("/api/labels/<int:label_id>", label_delete, ["DELETE"]),
    ]
    for rule, view, methods in writes:
        app.add_url_rule(rule, view.__name__, view, methods=methods)
