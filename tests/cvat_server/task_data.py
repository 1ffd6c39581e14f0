"""Task data and annotations on the test CVAT server: what ``annotate_task`` and annotation imports use.

As CVAT 2.73 answers them (recorded exchanges a.20, a.22, a.23 of ``/work/shared/cvat-api-2.73``):

- ``GET /api/tasks/{id}/data/meta``: the frame list; ``GET /api/tasks/{id}/data?type=chunk&number=N``:
  a ZIP of the chunk's images in frame order (``data_chunk_size`` 72), generated PNGs here;
- ``GET|PUT|PATCH /api/{tasks|jobs}/{id}/annotations``: ``{version, tags, shapes, tracks, intervals}``;
  ``PATCH ?action=create|update|delete``, ``PUT`` replaces (a job's only within its frames);
- annotation import, CVAT's TUS dialect: ``POST .../annotations/?format=&filename=&import_mode=`` with
  ``Upload-Start`` (202), ``POST .../annotations/`` with ``Tus-Resumable`` and ``Upload-Length`` (201,
  ``Location``), ``PATCH`` the chunks (204, ``Upload-Offset``), ``POST`` with ``Upload-Finish``
  (202 ``{rq_id}``), then the background request ``action=import&target=task&target_id=N&subresource=
  annotations`` (``operation.format`` null) ends ``finished`` or ``failed`` with the parser's error (no
  webhook is sent for it). Without ``import_mode`` CVAT replaces.

Only ``CVAT 1.1`` files (``annotations.xml``, alone or in a ZIP) are really parsed: boxes and tags.
"""

from __future__ import annotations

import io
import uuid
import xml.etree.ElementTree as ET
import zipfile
from typing import Any

from flask import Flask, Response, g, jsonify, request

from . import api
from .state import FORMATS, IMPORT_ONLY_FORMATS, iso_in, now_iso

CHUNK_SIZE = 72
"""Frames per chunk (``data_chunk_size`` in ``task_json``)."""
FRAME_SIZE = (64, 48)
"""Width and height of the generated images (as the recordings' uploads)."""
IMPORT_SECONDS = 0.1
"""Seconds an import request stays ``started`` before it ends."""
IMPORT_MODES = ("replace", "append")
IMPORT_KEPT_SECONDS = 3600
"""How long CVAT 2.73 keeps a finished import request (``expiry_date``, recorded a.22)."""
FAILED_KEPT_SECONDS = 30 * 86400
"""And a failed one (recorded a.20)."""
SHAPE_DEFAULTS = {"occluded": False, "outside": False, "z_order": 0, "rotation": 0, "group": 0,
                  "source": "manual", "score": 1, "attributes": [], "elements": []}


def frame_names(task: dict[str, Any]) -> list[str]:
    return list(task.get("frame_names") or [f"img{i}.png" for i in range(task.get("size", 0))])


def frame_png(task_id: int, frame: int) -> bytes:
    """A small image, different for every frame of every task (Pillow comes with cvat-sdk)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", FRAME_SIZE, ((task_id * 37) % 256, (frame * 53) % 256, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def _task(task_id: int) -> dict[str, Any]:
    task = api.server().state.tasks.get(task_id)
    if task is None:
        api.not_found("Task")
    return task


def data_meta(task_id: int) -> Any:
    st = api.server().state
    with st.lock:
        task = _task(task_id)
        names = frame_names(task)
        width, height = FRAME_SIZE
        return jsonify({
            "chapters": None, "chunks_updated_date": task["created_date"], "chunk_size": CHUNK_SIZE,
            "size": len(names), "image_quality": 70, "start_frame": 0, "stop_frame": max(len(names) - 1, 0),
            "frame_filter": "",
            "frames": [{"width": width, "height": height, "name": name, "related_files": 0,
                        "has_related_context": False} for name in names],
            "deleted_frames": [], "included_frames": None, "storage": "local", "cloud_storage_id": None,
        })


def data(task_id: int) -> Any:
    """``type=chunk``: a ZIP of the chunk's frames; ``type=frame``: one PNG."""
    st = api.server().state
    kind = request.args.get("type")
    number = api.int_arg("number") or 0
    with st.lock:
        size = len(frame_names(_task(task_id)))
    if kind == "frame":
        if not 0 <= number < size:
            raise api.ApiError(400, ["The frame number doesn't belong to the task"])
        return Response(frame_png(task_id, number), mimetype="image/png")
    if kind != "chunk":
        raise api.ApiError(400, {"type": [f'"{kind}" is not a valid choice.']})
    frames = range(number * CHUNK_SIZE, min((number + 1) * CHUNK_SIZE, size))
    if not frames:
        raise api.ApiError(400, ["The chunk number doesn't belong to the task"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as chunk:
        for frame in frames:
            chunk.writestr(f"{frame:06d}.png", frame_png(task_id, frame))
    return Response(buffer.getvalue(), mimetype="application/zip")


# -- annotations -------------------------------------------------------------------------------------


def _store(task: dict[str, Any]) -> dict[str, Any]:
    return task.setdefault("annotations", {"version": 0, "tags": [], "shapes": [], "tracks": []})


def _frames_of(resource: str, resource_id: int) -> tuple[dict[str, Any], range]:
    """The task an annotation URL is about, and the frames it covers (a job: its own)."""
    st = api.server().state
    if resource == "job":
        job = st.jobs.get(resource_id)
        if job is None:
            api.not_found("Job")
        return st.tasks[job["task_id"]], range(job["start_frame"], job["stop_frame"] + 1)
    task = _task(resource_id)
    return task, range(0, task.get("size", 0))


def _answer(store: dict[str, Any], frames: range) -> dict[str, Any]:
    return {"version": store["version"],
            "tags": [t for t in store["tags"] if t["frame"] in frames],
            "shapes": [s for s in store["shapes"] if s["frame"] in frames],
            "tracks": [], "intervals": []}


def _new_items(task: dict[str, Any], frames: range, body: Any, key: str, source: str | None = None
               ) -> list[dict[str, Any]]:
    """Tags or shapes of a request body, checked (label of the task, frame in range) and given ids."""
    st = api.server().state
    labels = {lb["id"] for lb in st.labels_of(task_id=task["id"])}
    items = []
    for raw in body.get(key) or []:
        if not isinstance(raw, dict) or raw.get("label_id") not in labels:
            label = raw.get("label_id") if isinstance(raw, dict) else raw
            raise api.ApiError(400, {"detail": f"Unknown label id {label!r}"})
        if raw.get("frame") not in frames:
            raise api.ApiError(400, {"detail": f"Frame {raw.get('frame')!r} is out of the range"})
        if key == "shapes":
            item = {"type": raw.get("type", "rectangle"), **{k: v for k, v in SHAPE_DEFAULTS.items()}}
            item.update({k: v for k, v in raw.items() if k != "id"})
            item["points"] = [float(p) for p in raw.get("points", [])]
        else:
            item = {"frame": raw["frame"], "label_id": raw["label_id"], "group": 0, "source": "manual",
                    "attributes": [], **{k: v for k, v in raw.items() if k != "id"}}
        if source is not None:
            item["source"] = source
        item["id"] = st.next_id(key)
        items.append(item)
    return items


def _touch(task: dict[str, Any], frames: range) -> None:
    """Saving annotations saves the jobs they fall in (their ``updated_date``)."""
    st = api.server().state
    stamp = now_iso()
    for job in st.task_jobs(task["id"]):
        if job["start_frame"] in frames or job["stop_frame"] in frames:
            job["updated_date"] = stamp
    task["updated_date"] = stamp


def annotations_view(resource: str, resource_id: int) -> Any:
    """``GET``, ``PUT`` (replace) and ``PATCH ?action=create|update|delete``."""
    st = api.server().state
    with st.lock:
        task, frames = _frames_of(resource, resource_id)
        store = _store(task)
        if request.method == "GET":
            return jsonify(_answer(store, frames))
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise api.ApiError(400, {"detail": "JSON parse error - expected an object"})
        if request.method == "PUT":
            tags, shapes = _new_items(task, frames, body, "tags"), _new_items(task, frames, body, "shapes")
            store["tags"] = [t for t in store["tags"] if t["frame"] not in frames] + tags
            store["shapes"] = [s for s in store["shapes"] if s["frame"] not in frames] + shapes
            _touch(task, frames)
            return jsonify({"version": store["version"], "tags": tags, "shapes": shapes, "tracks": [],
                            "intervals": []})
        action = request.args.get("action")
        if action == "create":
            tags, shapes = _new_items(task, frames, body, "tags"), _new_items(task, frames, body, "shapes")
            store["tags"] += tags
            store["shapes"] += shapes
        elif action == "delete":
            gone = {item.get("id") for key in ("tags", "shapes") for item in body.get(key) or []}
            store["tags"] = [t for t in store["tags"] if t["id"] not in gone]
            store["shapes"] = [s for s in store["shapes"] if s["id"] not in gone]
            tags, shapes = [], []
        else:
            raise api.ApiError(400, ["Please specify a correct 'action' for the request"])
        _touch(task, frames)
        return jsonify({"version": store["version"], "tags": tags, "shapes": shapes, "tracks": [],
                        "intervals": []})


# -- imports: CVAT's TUS dialect, then a background request ------------------------------------------


def _empty(status: int, headers: dict[str, str] | None = None) -> Response:
    """A TUS step's answer: no body and, as CVAT's, no Content-Type."""
    response = Response(status=status, headers=headers or {})
    del response.headers["Content-Type"]
    return response


def import_format_names() -> set[str]:
    """The enabled importers ``/api/server/annotation/formats`` lists."""
    return {f[0] for f in IMPORT_ONLY_FORMATS if f[3]} | {f[0] for f in FORMATS if f[5] and f[3]}


def import_rq_id(target: str, target_id: int) -> str:
    """CVAT 2.73's id of an annotation import (recorded a.20/a.22): no user, no format."""
    return f"action=import&target={target}&target_id={target_id}&subresource=annotations"


def upload(resource: str, resource_id: int, file_id: str | None = None) -> Any:
    """The steps of an annotation upload, told apart by their headers (as CVAT's ``UploadMixin``)."""
    srv = api.server()
    st = srv.state
    with st.lock:
        task, _ = _frames_of(resource, resource_id)
        uploads = task.setdefault("uploads", {})
        if file_id is not None:  # PATCH: a chunk
            entry = uploads.get(file_id)
            if entry is None:
                api.not_found("upload")
            offset = int(request.headers.get("Upload-Offset") or 0)
            if offset != len(entry["data"]):
                raise api.ApiError(409, {"detail": "Offset mismatch"})
            entry["data"] += request.get_data()
            return Response(status=204, headers={"Tus-Resumable": "1.0.0", "Upload-Offset": str(len(entry["data"]))})
        if "Upload-Start" in request.headers:
            return _empty(202)
        if "Tus-Resumable" in request.headers:
            new_id = f"{g.user_id}_{uuid.uuid4()}"
            uploads[new_id] = {"data": b"", "length": int(request.headers.get("Upload-Length") or 0)}
            location = f"{api.base_url()}/api/{resource}s/{resource_id}/annotations/{new_id}"
            return _empty(201, {"Tus-Resumable": "1.0.0", "Location": location, "Upload-Filename": new_id})
        if "Upload-Finish" not in request.headers:
            raise api.ApiError(400, {"detail": "Expected Upload-Start, a TUS request or Upload-Finish"})
        fmt = request.args.get("format") or ""
        if fmt not in import_format_names():
            raise api.ApiError(400, [f"Unknown input format '{fmt}'"])
        mode = request.args.get("import_mode") or "replace"
        if mode not in IMPORT_MODES:
            raise api.ApiError(400, [f"Invalid import_mode={mode!r}. Allowed: {', '.join(IMPORT_MODES)}"])
        entry = uploads.pop(request.args.get("filename") or "", None)
        if entry is None:
            raise api.ApiError(400, {"detail": "No such file were uploaded"})
        rq_id = import_rq_id(resource, resource_id)
        st.requests[rq_id] = {
            "id": rq_id, "status": "queued", "message": "",
            "operation": {"type": "import:annotations", "target": resource, "project_id": task["project_id"],
                          "task_id": task["id"], "job_id": resource_id if resource == "job" else None,
                          "org_id": task.get("org_id"), "format": None, "lightweight": None},
            "progress": 0.0, "created_date": now_iso(), "started_date": None, "finished_date": None,
            "expiry_date": None, "owner_id": g.user_id, "result_url": None,
            "target": resource, "target_id": resource_id, "subresource": "annotations", "cloud": None,
        }
    srv.schedule(IMPORT_SECONDS, finish_import, srv, rq_id, resource, resource_id, fmt, mode, entry["data"])
    return jsonify({"rq_id": rq_id}), 202


def finish_import(srv: Any, rq_id: str, resource: str, resource_id: int, fmt: str, mode: str,
                  content: bytes) -> None:
    """Parse and apply an uploaded file and end its request. No webhook: CVAT 2.73 has no
    ``completed:request[import:annotations]`` (cvat/apps/webhooks/utils.py
    ``REQUEST_COMPLETION_RESOURCES`` lists exports, task creation, merges and quality only)."""
    st = srv.state
    with st.lock:
        rq = st.requests[rq_id]
        rq["started_date"] = rq["started_date"] or now_iso()
        try:
            task, frames = _frames_of_state(st, resource, resource_id)
            tags, shapes = parse_cvat_xml(content, st.labels_of(task_id=task["id"]), frame_names(task), fmt)
            store = _store(task)
            if mode == "replace":
                store["tags"] = [t for t in store["tags"] if t["frame"] not in frames]
                store["shapes"] = [s for s in store["shapes"] if s["frame"] not in frames]
            for key, items in (("tags", tags), ("shapes", shapes)):
                for item in items:
                    if item["frame"] in frames:
                        item["id"] = st.next_id(key)
                        store[key].append(item)
            rq["status"], rq["expiry_date"] = "finished", iso_in(IMPORT_KEPT_SECONDS)
        except ValueError as exc:
            rq["status"], rq["message"] = "failed", f"{type(exc).__name__}: {exc}\n"
            rq["expiry_date"] = iso_in(FAILED_KEPT_SECONDS)
        rq["finished_date"] = now_iso()


def _frames_of_state(st: Any, resource: str, resource_id: int) -> tuple[dict[str, Any], range]:
    if resource == "job":
        job = st.jobs[resource_id]
        return st.tasks[job["task_id"]], range(job["start_frame"], job["stop_frame"] + 1)
    task = st.tasks[resource_id]
    return task, range(0, task.get("size", 0))


def parse_cvat_xml(content: bytes, labels: list[dict[str, Any]], names: list[str], fmt: str
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Boxes and tags of a CVAT 1.1 file (XML, or a ZIP holding one); ``ValueError`` when unreadable."""
    if fmt != "CVAT 1.1":
        raise ValueError(f"the test CVAT server imports only CVAT 1.1, not {fmt}")
    if content[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            xml_names = [n for n in archive.namelist() if n.endswith(".xml")]
            if not xml_names:
                raise ValueError("no annotations.xml in the archive")
            content = archive.read(xml_names[0])
    try:
        root = ET.fromstring(content)
    except ET.ParseError as exc:
        raise ValueError(str(exc)) from None
    by_name = {lb["name"]: lb["id"] for lb in labels}
    tags: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    for image in root.iter("image"):
        name = image.get("name")
        frame = names.index(name) if name in names else int(image.get("id", "-1"))
        for element in image:
            label = element.get("label")
            if label not in by_name:
                continue
            if element.tag == "box":
                points = [float(element.get(k, "0")) for k in ("xtl", "ytl", "xbr", "ybr")]
                shapes.append({"type": "rectangle", **SHAPE_DEFAULTS, "source": "file", "points": points,
                               "label_id": by_name[label], "frame": frame})
            elif element.tag == "tag":
                tags.append({"frame": frame, "label_id": by_name[label], "group": 0, "source": "file",
                             "attributes": []})
    return tags, shapes


def data_ready(srv: Any, task_id: int, *, owner: str = "admin") -> dict[str, Any]:
    """End a task's data upload as CVAT does: its ``create:task`` request finishes and
    ``completed:request[create:task]`` is delivered (``completed_request_create_task.json``)."""
    st = srv.state
    with st.lock:
        task = st.tasks[task_id]
        user = st.user_by_name(owner)
        assert user is not None, owner
        rq_id = f"action=create&target=task&target_id={task_id}"
        st.requests[rq_id] = {
            "id": rq_id, "status": "finished", "message": "",
            "operation": {"type": "create:task", "target": "task", "project_id": task["project_id"],
                          "task_id": task_id, "job_id": None, "org_id": task.get("org_id"), "format": None,
                          "lightweight": None},
            "progress": 0.0, "created_date": task["created_date"], "started_date": task["created_date"],
            "finished_date": now_iso(), "expiry_date": None, "owner_id": user["id"], "result_url": None,
            "target": "task", "target_id": task_id, "subresource": "data", "cloud": None,
        }
        payload = st.request_json(st.requests[rq_id])
    srv.webhooks.emit_request_completed(payload, project_id=task["project_id"], org_id=task.get("org_id"))
    return payload


def register(app: Flask) -> None:
    """Data, annotations and annotation uploads of tasks and jobs."""
    app.add_url_rule("/api/tasks/<int:task_id>/data/meta", "task_data_meta", data_meta, methods=["GET"])
    for rule in ("/api/tasks/<int:task_id>/data", "/api/tasks/<int:task_id>/data/"):
        app.add_url_rule(rule, f"task_data{rule.endswith('/')}", data, methods=["GET"])
    for resource in ("task", "job"):
        base = f"/api/{resource}s/<int:resource_id>/annotations"
        app.add_url_rule(base, f"{resource}_annotations",
                         lambda resource_id, r=resource: annotations_view(r, resource_id),
                         methods=["GET", "PUT", "PATCH"])
        app.add_url_rule(base + "/", f"{resource}_annotations_slash",
                         lambda resource_id, r=resource: annotations_view(r, resource_id),
                         methods=["GET", "PUT", "PATCH"])
        app.add_url_rule(base + "/", f"{resource}_annotations_upload",
                         lambda resource_id, r=resource: upload(r, resource_id), methods=["POST"])
        app.add_url_rule(base + "/<file_id>", f"{resource}_annotations_chunk",
                         lambda resource_id, file_id, r=resource: upload(r, resource_id, file_id), methods=["PATCH"])
