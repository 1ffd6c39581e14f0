"""``import_annotations``: upload an annotation file (made elsewhere: pre-annotations) to a task or job.

Parameters::

    from: s3://preannotations/task-{task_id}.zip   # a path, file:// or s3://bucket/key (required)
    format: CVAT 1.1                  # a CVAT *import* format (checked at load against the shipped
                                      # list of CVAT's names, and against the server when it runs)
    resource: task | job              # default: job for a job event, else task
    mode: append | replace            # default append; replace deletes the existing annotations first

``from`` is read exactly as ``export``'s ``to`` is written (``workers.storage.parse_source``): a
local file must resolve inside the data directory or ``CVAT_HOOKS_STORAGE_ROOTS`` and is never one
of the service's own files, and values rendered into it from the payload are made path-safe by the
receiver, so an event cannot make the worker send CVAT any other file.

``mode`` is CVAT's own ``import_mode`` (CVAT 2.73 replaces when none is sent, so it is always sent).

Idempotency: the version key hashes the target, the format, the mode and the file's SHA-256. Once
CVAT has imported a version, ``cvat-hooks:import-done:<key>`` holds the result for 30 days and a
re-run (duplicate delivery, replay, retry after success) skips with ``{"skipped": "already
imported"}``; a changed file is a new version. ``replace`` is idempotent by itself; ``append``
relies on the marker (a worker killed between CVAT's import and the marker imports twice).

Result: ``{resource, resource_id, format, mode, from, size, sha256, version, rq_id, server_seconds}``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from core.cvat_formats import format_problem
from core.errors import PermanentError
from core.keys import IMPORT_DONE_KEY as MARKER_PREFIX
from workers.actions._params import event_id, has_placeholder, text, unknown_params
from workers.annotation_gateway import AnnotationGateway, ImportMode
from workers.context import ActionContext
from workers.gateway import Resource
from workers.storage import Storage, parse_source

PARAMS = ("from", "format", "resource", "mode")
MARKER_TTL = 30 * 86400
"""Seconds an import-done marker is kept (30 days)."""
HASH_CHUNK = 1024 * 1024
"""Bytes read at a time while hashing the file."""

RESOURCES = (Resource.TASK.value, Resource.JOB.value)
MODES = tuple(m.value for m in ImportMode)


def validate(params: Mapping[str, Any], *, shipped_formats: bool = True) -> list[str]:
    """Types and enums, and the source's scheme and shape (not its roots: those are the worker's).

    The format is checked against the shipped list of CVAT's import names (``core.cvat_formats``) when the
    rules load, as ``export`` checks its own; the run turns that off, as the server's own list then
    decides (:func:`check_format`), and a newer CVAT may import a format the list does not have yet.
    """
    problems = unknown_params(params, PARAMS)
    if "from" not in params:
        problems.append("from is required (a path, file:// or s3://bucket/key)")
    else:
        try:
            parse_source(params["from"])
        except PermanentError as exc:
            problems.append(f"from: {exc}")
    fmt = params.get("format")
    if not isinstance(fmt, str) or not fmt.strip():
        problems.append("format is required: a CVAT import format (e.g. 'CVAT 1.1', 'COCO 1.0')")
    elif shipped_formats and not has_placeholder(fmt) and (problem := format_problem("import", fmt)):
        problems.append(problem)
    resource = params.get("resource")
    if resource is not None and resource not in RESOURCES:
        problems.append(f"resource: {resource!r} is not one of {', '.join(RESOURCES)}")
    mode = params.get("mode")
    if mode is not None and mode not in MODES:
        problems.append(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    for name in ("format", "resource", "mode"):
        if has_placeholder(params.get(name)):
            problems.append(f"{name} cannot hold a placeholder (it is checked when the rules load)")
    return problems


def causes(params: Mapping[str, Any]) -> tuple[str, ...]:
    """The job saves an import makes (CVAT 2.73 sends no ``completed:request`` for an import)."""
    return ("update:job",)


def target(ctx: ActionContext) -> tuple[Resource, int]:
    """The task or job the event names (``resource``, else job for a job event, else task)."""
    event = ctx.event
    name = ctx.params.get("resource") or ("job" if event.get("resource") == "job" else "task")
    resource = Resource(name)
    resource_id = event_id(event, f"{resource.value}_id")
    if resource_id is None:
        raise PermanentError(f"event {event.get('event')!r} names no {resource.value} "
                             f"({resource.value}_id is missing): set resource")
    return resource, resource_id


def check_format(gateway: AnnotationGateway, fmt: str) -> None:
    """Fail permanently, listing the valid names, when the server cannot import ``fmt``."""
    offered = gateway.import_formats()
    if fmt in offered:
        return
    # A looser cutoff than difflib's 0.6: export names are longer (CVAT for images 1.1 -> CVAT 1.1).
    close = difflib.get_close_matches(fmt, offered, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise PermanentError(f"import format {fmt!r} is not offered by this CVAT server{hint}; "
                         f"valid names: {', '.join(sorted(offered))}")


def sha256_of(path: Path) -> tuple[str, int]:
    """The file's SHA-256 and size, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def run(ctx: ActionContext) -> dict[str, Any]:
    """Import once per file version; see the module docstring."""
    with Storage(ctx.settings) as storage:
        return _run(ctx, storage)


def _run(ctx: ActionContext, storage: Storage) -> dict[str, Any]:
    problems = validate(ctx.params, shipped_formats=False)
    if problems:
        raise PermanentError("; ".join(problems))
    resource, resource_id = target(ctx)
    fmt = str(ctx.params["format"])
    mode = ImportMode(ctx.params.get("mode") or ImportMode.APPEND.value)
    source = storage.parse_source(ctx.params["from"])
    gateway = cast(AnnotationGateway, ctx.gateway)
    with storage.fetched(source) as path:
        sha256, size = sha256_of(path)
        identity = {"resource": resource.value, "resource_id": resource_id, "format": fmt, "mode": mode.value,
                    "sha256": sha256}
        version = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        marker = MARKER_PREFIX + version
        previous = text(ctx.redis.get(marker))
        if previous is not None:
            ctx.note("already imported", version=version)
            return {"skipped": "already imported", **json.loads(previous)}
        check_format(gateway, fmt)
        ctx.note("import started", resource=resource.value, resource_id=resource_id, format=fmt, mode=mode.value,
                 source=source.uri, size=size)
        outcome = gateway.import_annotations(resource, resource_id, fmt, path, mode=mode)
    result = {"resource": resource.value, "resource_id": resource_id, "format": fmt, "mode": mode.value,
              "from": source.uri, "size": size, "sha256": sha256, "version": version, "rq_id": outcome.rq_id,
              "server_seconds": round(outcome.server_seconds, 3)}
    ctx.note("imported by CVAT", rq_id=outcome.rq_id)
    ctx.redis.set(marker, json.dumps(result), ex=MARKER_TTL)
    return result
