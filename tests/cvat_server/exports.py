"""Exports on the test CVAT server: background requests, and files generated as they stream.

A real export is a ZIP the server builds in an RQ job; here it is ``size`` bytes of deterministic
content derived from the request id, generated chunk by chunk while it is sent, so a 500 MB export
costs neither memory nor disk and a test can recompute what it should have received.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from flask import Flask, Response, g, jsonify, request

from . import api
from .state import FORMATS, now_iso

CHUNK_SIZE = 1024 * 1024
"""Bytes per generated chunk."""

REQUEST_TTL_SECONDS = 86400
"""How long CVAT keeps a finished export (``expiry_date``)."""


@lru_cache(maxsize=8)
def _block(seed: str) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(CHUNK_SIZE)


def export_chunks(seed: str, size: int, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The content of an export, in chunks: a pseudo-random block whose first 8 bytes number the
    chunk, so chunks lost, repeated or reordered in transit change the file's digest."""
    block = _block(seed)
    sent, index = 0, 0
    while sent < size:
        n = min(chunk_size, CHUNK_SIZE, size - sent)
        chunk = (index.to_bytes(8, "big") + block[8:])[:n]
        yield chunk
        sent += n
        index += 1


def export_digest(seed: str, size: int) -> str:
    """SHA-256 of what :func:`export_chunks` yields (to compare with a downloaded file)."""
    digest = hashlib.sha256()
    for chunk in export_chunks(seed, size):
        digest.update(chunk)
    return digest.hexdigest()


def format_key(format_name: str) -> str:
    """A format name as CVAT writes it inside request ids: ``CVAT for images 1.1`` ->
    ``CVAT_for_images_1~1``."""
    return re.sub(r"\s+", "_", format_name).replace(".", "~")


def export_rq_id(target: str, target_id: int, user_id: int, subresource: str, format_name: str | None) -> str:
    """The request id CVAT 2.73 gives an export (see ``completed_request_export_annotations.json``)."""
    parts = [f"action=export&target={target}&target_id={target_id}&user_id={user_id}"]
    if format_name:
        parts.append(f"format={format_key(format_name)}")
    parts.append(f"subresource={subresource}")
    return "&".join(parts)


def result_path(target: str, target_id: int, subresource: str, rq_id: str) -> str:
    """Where a finished local export is downloaded from (CVAT's ``result_url`` without the host)."""
    kind = "backup" if subresource == "backup" else "dataset"
    return f"/api/{target}s/{target_id}/{kind}/download?rq_id={quote(rq_id, safe='')}"


def export_filename(target: str, name: str, subresource: str, format_name: str | None, stamp: str) -> str:
    """A file name in CVAT's style (``task_wh-task-1_annotations_2026_11_22_17_40_43_cvat for images
    1.1.zip``), restricted to the characters cvat-sdk accepts from ``Content-Disposition``."""
    safe = re.sub(r"[^A-Za-z0-9_\-. ]", "_", name)
    ts = re.sub(r"\D", "_", stamp[:19])
    suffix = f"_{format_name.lower()}" if format_name else ""
    return f"{target}_{safe}_{subresource}_{ts}{suffix}.zip"


def new_request(*, rq_id: str, target: str, target_id: int, subresource: str, format_name: str | None,
                owner_id: int, project_id: int | None, task_id: int | None, job_id: int | None,
                org_id: int | None, created_date: str, size: int, cloud: tuple[int, str] | None,
                lightweight: bool | None) -> dict[str, Any]:
    """The record of one export request, queued."""
    return {
        "id": rq_id,
        "status": "queued",
        "message": "",
        "operation": {
            "type": f"export:{subresource}",
            "target": target,
            "project_id": project_id,
            "task_id": task_id,
            "job_id": job_id,
            "org_id": org_id,
            "format": format_name,
            "lightweight": lightweight,
        },
        "progress": 0.0,
        "created_date": created_date,
        "started_date": None,
        "finished_date": None,
        "expiry_date": None,
        "owner_id": owner_id,
        "result_url": None,
        # Not part of CVAT's JSON:
        "size": size,
        "cloud": cloud,
        "target": target,
        "target_id": target_id,
        "subresource": subresource,
    }


# -- the REST endpoints ------------------------------------------------------------------------


TARGETS = {"jobs": "job", "tasks": "task", "projects": "project"}


def _target_ids(target: str, target_id: int) -> tuple[str, int | None, int | None, int | None, int | None]:
    """(name, project_id, task_id, job_id, org_id) of an export's target, 404 if unknown."""
    st = api.server().state
    if target == "job":
        if target_id not in st.jobs:
            api.not_found("Job")
        task = st.tasks[st.jobs[target_id]["task_id"]]
        return f"job_{target_id}", task["project_id"], task["id"], target_id, task.get("org_id")
    if target == "task":
        if target_id not in st.tasks:
            api.not_found("Task")
        task = st.tasks[target_id]
        return task["name"], task["project_id"], target_id, None, task.get("org_id")
    if target_id not in st.projects:
        api.not_found("Project")
    project = st.projects[target_id]
    return project["name"], target_id, None, None, project.get("org_id")


def start_export(resource: str, target_id: int, kind: str) -> Any:
    """``POST /api/{jobs|tasks|projects}/{id}/dataset/export`` and ``.../backup/export`` -> 202."""
    srv, st = api.server(), api.server().state
    target = TARGETS[resource]
    format_name = request.args.get("format") if kind == "dataset" else None
    save_images = (request.args.get("save_images") or "false").lower() == "true"
    location = request.args.get("location") or "local"
    if location not in ("local", "cloud_storage"):
        raise api.ApiError(400, {"location": [f'"{location}" is not a valid choice.']})
    with st.lock:
        name, project_id, task_id, job_id, org_id = _target_ids(target, target_id)
        if kind == "dataset":
            if not format_name:
                raise api.ApiError(400, {"format": ["This field is required."]})
            known = {f[0]: f[3] for f in FORMATS}
            if format_name not in known:
                raise api.ApiError(400, ["Unknown format specified for the request"])
            if not known[format_name]:
                raise api.ApiError(405, {"detail": f"Format {format_name} is disabled"})
        cloud = None
        if location == "cloud_storage":
            cs_id = api.int_arg("cloud_storage_id")
            if cs_id is None:
                raise api.ApiError(400, ["Cloud storage location was selected as the destination, "
                                     "but cloud storage id was not specified"])
            if cs_id not in st.cloud_storages:
                api.not_found("CloudStorage")
            default_name = export_filename(target, name, "backup" if kind == "backup" else "dataset",
                                           format_name, now_iso())
            cloud = (cs_id, request.args.get("filename") or default_name)
        subresource = "backup" if kind == "backup" else ("dataset" if save_images else "annotations")
        rq_id = export_rq_id(target, target_id, g.user_id, subresource, format_name)
        existing = st.requests.get(rq_id)
        if existing is not None and existing["status"] not in ("finished", "failed"):
            # CVAT 2.73 refuses the same export while it is queued or running: 409 with its rq_id.
            raise api.ApiError(409, {"rq_id": rq_id})
        if existing is None or existing["status"] in ("finished", "failed"):
            lightweight = None
            if kind == "backup":
                # CVAT 2.73 reports ``lightweight: null`` for ``lightweight=False`` (recorded a.17).
                lightweight = True if (request.args.get("lightweight") or "").lower() == "true" else None
            st.requests[rq_id] = new_request(
                rq_id=rq_id, target=target, target_id=target_id, subresource=subresource,
                format_name=format_name, owner_id=g.user_id, project_id=project_id, task_id=task_id,
                job_id=job_id, org_id=org_id, created_date=now_iso(), size=srv.export_size, cloud=cloud,
                lightweight=lightweight)
            st.requests[rq_id]["base_url"] = api.base_url()
            st.requests[rq_id]["name"] = name
            srv.schedule_export(rq_id)
    return jsonify({"rq_id": rq_id}), 202


def request_detail(rq_id: str) -> Any:
    srv, st = api.server(), api.server().state
    with st.lock:
        rq = st.requests.get(rq_id)
        if rq is None:
            # CVAT 2.73 answers an unknown rq_id with a bare text body (typed text/html).
            return Response("There is no request with specified id", status=404, mimetype="text/html")
        srv.advance_request(rq)
        return jsonify(st.request_json(rq))


def requests_list() -> Any:
    """``GET /api/requests``: every background request, newest first, ``?status=`` filtered."""
    srv, st = api.server(), api.server().state
    status = request.args.get("status")
    with st.lock:
        items = []
        for rq in sorted(st.requests.values(), key=lambda r: r["created_date"], reverse=True):
            srv.advance_request(rq)
            if status is None or rq["status"] == status:
                items.append(st.request_json(rq))
        return jsonify(api.paginate(items))


def download(resource: str, target_id: int, kind: str) -> Any:
    """Streams a finished local export: generated in chunks, with Content-Length."""
    st = api.server().state
    rq_id = request.args.get("rq_id") or ""
    with st.lock:
        rq = st.requests.get(rq_id)
        if rq is None or rq["target"] != TARGETS[resource] or rq["target_id"] != target_id or (
                (rq["subresource"] == "backup") != (kind == "backup")):
            raise api.ApiError(404, {"detail": "Not found"})
        if rq["status"] != "finished" or rq["cloud"] is not None:
            raise api.ApiError(400, {"detail": "The export is not ready or was not saved locally"})
        size, fmt = rq["size"], rq["operation"]["format"]
        filename = export_filename(rq["target"], rq["name"], rq["subresource"], fmt, rq["finished_date"])
    chunks = export_chunks(rq_id, size)
    if g.get("fault") == "truncate":
        chunks = api.server().truncated(chunks, size, request.environ)
    return Response(chunks, status=200, mimetype="application/zip", direct_passthrough=True, headers={
        "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{filename}"'})


def register(app: Flask) -> None:
    """``POST .../dataset/export``, ``.../backup/export``, ``GET /api/requests/{rq_id}`` and the
    downloads at ``result_url``."""
    app.add_url_rule("/api/requests", "requests_list", requests_list, methods=["GET"])
    app.add_url_rule("/api/requests/<path:rq_id>", "request_detail", request_detail, methods=["GET"])
    for resource in TARGETS:
        kinds = ("dataset", "backup") if resource != "jobs" else ("dataset",)
        for kind in kinds:
            app.add_url_rule(f"/api/{resource}/<int:target_id>/{kind}/export", f"export_{resource}_{kind}",
                             lambda target_id, r=resource, k=kind: start_export(r, target_id, k),
                             methods=["POST"])
            app.add_url_rule(f"/api/{resource}/<int:target_id>/{kind}/download",
                             f"download_{resource}_{kind}",
                             lambda target_id, r=resource, k=kind: download(r, target_id, k), methods=["GET"])
