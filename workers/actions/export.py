"""``export``: a job's, task's or project's annotations, dataset or backup, written to storage.

Parameters::

    resource: job | task | project   # default: the event's resource, if it is one of those
    kind: annotations | dataset | backup   # default annotations
    format: "CVAT for images 1.1"    # required unless kind is backup (checked at load against the
                                     # shipped list of CVAT's names, and against the server when it runs)
    include_images: true             # another way to say kind: dataset (false: annotations only)
    lightweight: true                # backups only: leave out media kept in cloud storage
    to: exports/{task_id}/{job_id}.zip   # a path, file://, s3://bucket/key or cvat-cloud://<id>/path

``include_images`` has exactly one meaning, "kind is dataset", so ``include_images: true`` with
``kind: annotations`` (or ``false`` with ``kind: dataset``) is a contradiction reported at load time.

Idempotency: every export has a version key, a hash of the destination, the resource and its id,
the kind, the format and the resource's ``updated_date`` (from the event; asked from CVAT when the
event has none, e.g. ``completed:request[...]``). Once an export is committed, a Redis marker
``cvat-hooks:export-done:<key>`` holds its result for 30 days, and a re-run for the same version (a
duplicate delivery, a replay, a retry after the commit) skips with ``{"skipped": "already
exported", ...}``. S3 objects also carry the key in their metadata, so the bucket itself answers if
Redis lost the marker; a local file deleted since the marker was set is written again. Two runs
racing on one version both write the same bytes atomically: wasted work, never a torn file.

Result: ``{uri, size, format, kind, resource, resource_id, version, updated_date, server_seconds,
cvat_seconds, status_checks, rq_id}``, plus ``path`` for a local file; ``version`` is the version key
(also the S3 metadata value). ``server_seconds`` runs from the export request to our seeing it
finished, ``cvat_seconds`` is CVAT's own time (its request's created -> finished), ``status_checks``
what the wait cost CVAT, ``rq_id`` the request's id in CVAT (``GET /api/requests/{rq_id}``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.cvat_formats import format_problem
from core.errors import PermanentError
from core.keys import EXPORT_DONE_KEY as MARKER_PREFIX
from workers.actions._params import event_id, has_placeholder, text, unknown_params
from workers.context import ActionContext
from workers.gateway import ExportKind, ExportRequest, Resource
from workers.storage import CloudDestination, Destination, LocalDestination, Storage, parse_destination

PARAMS = ("resource", "kind", "format", "include_images", "lightweight", "to")
MARKER_TTL = 30 * 86400
"""Seconds an export-done marker is kept (30 days)."""

_RESOURCES = tuple(r.value for r in Resource)
_KINDS = tuple(k.value for k in ExportKind)


def _kind(params: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The effective kind (``include_images`` folded in), and the problems with the combination."""
    kind = params.get("kind")
    include_images = params.get("include_images")
    problems = []
    if kind is not None and kind not in _KINDS:
        problems.append(f"kind: {kind!r} is not one of {', '.join(_KINDS)}")
        kind = None
    if include_images is not None and not isinstance(include_images, bool):
        problems.append(f"include_images must be true or false, not {include_images!r}")
    elif include_images is True:
        if kind not in (None, ExportKind.DATASET):
            problems.append(f"include_images: true means kind: dataset, which contradicts kind: {kind}")
        kind = ExportKind.DATASET.value
    elif include_images is False and kind == ExportKind.DATASET:
        problems.append("include_images: false contradicts kind: dataset (a dataset includes images)")
    return kind or ExportKind.ANNOTATIONS.value, problems


def validate(params: Mapping[str, Any], *, shipped_formats: bool = True) -> list[str]:
    """Types, enums and combinations, and the destination's scheme and shape (not its roots).

    The format is checked against the shipped list of CVAT's names (``core.cvat_formats``) when the rules
    load; :func:`plan` turns that off, as the server's own list decides when the action runs
    (:func:`check_format`), and a newer CVAT may offer a format the list does not have yet.
    """
    problems = unknown_params(params, PARAMS)
    resource = params.get("resource")
    if resource is not None and resource not in _RESOURCES:
        problems.append(f"resource: {resource!r} is not one of {', '.join(_RESOURCES)}")
    kind, kind_problems = _kind(params)
    problems += kind_problems
    fmt = params.get("format")
    if kind == ExportKind.BACKUP:
        if fmt is not None:
            problems.append("format does not apply to kind: backup (a backup is CVAT's own format)")
        if resource == Resource.JOB:
            problems.append("kind: backup is for a task or a project; CVAT cannot back up a job")
    else:
        if not isinstance(fmt, str) or not fmt.strip():
            problems.append(f"format is required for kind: {kind} (e.g. 'CVAT for images 1.1')")
        elif shipped_formats and not has_placeholder(fmt) and (problem := format_problem("export", fmt)):
            problems.append(problem)
        if "lightweight" in params:
            problems.append("lightweight applies to kind: backup only")
    if "lightweight" in params and not isinstance(params["lightweight"], bool):
        problems.append(f"lightweight must be true or false, not {params['lightweight']!r}")
    if "to" not in params:
        problems.append("to is required (a path, file://, s3://bucket/key or cvat-cloud://<id>/path)")
    else:
        try:
            parse_destination(params["to"])
        except PermanentError as exc:
            problems.append(f"to: {exc}")
    return problems


def causes(params: Mapping[str, Any]) -> tuple[str, ...]:
    """CVAT events this action can cause: the end of its own export request, of its own kind."""
    return (f"completed:request[export:{_kind(params)[0]}]",)


@dataclass(frozen=True)
class Plan:
    """One export, fully resolved from the parameters and the event."""

    request: ExportRequest
    destination: Destination
    updated_date: str | None

    @property
    def version(self) -> str:
        """The version key: what makes two runs "the same export of the same resource version"."""
        req = self.request
        identity = {
            "uri": self.destination.uri, "resource": req.resource.value, "resource_id": req.resource_id,
            "kind": req.kind.value, "format": req.format, "include_images": req.kind == ExportKind.DATASET,
            "lightweight": req.lightweight, "updated_date": self.updated_date,
        }
        blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def plan(ctx: ActionContext, storage: Storage) -> Plan:
    """Resolve the resource and its id from the event, and the destination against the roots."""
    params, event = ctx.params, ctx.event
    problems = validate(params, shipped_formats=False)
    if problems:
        raise PermanentError("; ".join(problems))
    kind = ExportKind(_kind(params)[0])
    name = params.get("resource") or event.get("resource")
    if name not in _RESOURCES:
        raise PermanentError(f"event {event.get('event')!r} is not about a job, task or project: "
                             "set the export's resource")
    resource = Resource(name)
    if kind == ExportKind.BACKUP and resource == Resource.JOB:
        raise PermanentError("kind: backup is for a task or a project; CVAT cannot back up a job")
    resource_id = event_id(event, f"{resource.value}_id")
    if resource_id is None:
        raise PermanentError(f"event {event.get('event')!r} names no {resource.value} "
                             f"({resource.value}_id is missing)")
    destination = storage.parse(params["to"])
    cloud = destination if isinstance(destination, CloudDestination) else None
    request = ExportRequest(
        resource=resource, resource_id=resource_id, kind=kind, format=params.get("format"),
        cloud_storage_id=cloud.cloud_storage_id if cloud else None,
        cloud_filename=cloud.filename if cloud else None,
        lightweight=bool(params.get("lightweight", False)),
    )
    updated = event.get("updated_date")
    if not isinstance(updated, str):
        updated = ctx.gateway.get_resource(resource, resource_id).get("updated_date")
    return Plan(request, destination, updated if isinstance(updated, str) else None)


def check_format(ctx: ActionContext, fmt: str | None) -> None:
    """Fail permanently, listing the valid names, when the server does not offer ``fmt``."""
    if fmt is None:
        return
    offered = ctx.gateway.annotation_formats()
    if fmt in offered:
        return
    close = difflib.get_close_matches(fmt, offered, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise PermanentError(f"export format {fmt!r} is not offered by this CVAT server{hint}; "
                         f"valid names: {', '.join(sorted(offered))}")


def run(ctx: ActionContext) -> dict[str, Any]:
    """Export once per resource version; see the module docstring."""
    with Storage(ctx.settings) as storage:
        return _run(ctx, storage)


def _run(ctx: ActionContext, storage: Storage) -> dict[str, Any]:
    """Skip a known version, else check the format, export, commit, and only then mark it done."""
    todo = plan(ctx, storage)
    req, version = todo.request, todo.version
    # Without an updated_date there is no version to recognise: export every time rather than
    # skip an export that may hold new annotations.
    marker = MARKER_PREFIX + version if todo.updated_date is not None else None
    previous = text(ctx.redis.get(marker)) if marker else None
    if previous is not None and isinstance(todo.destination, LocalDestination) \
            and not todo.destination.path.exists():
        previous = None  # someone deleted the file: writing it again is what they expect
    if previous is not None:
        ctx.note("already exported", version=version)
        return {"skipped": "already exported", **json.loads(previous)}
    check_format(ctx, req.format)
    result: dict[str, Any] = {
        "uri": todo.destination.uri, "size": None, "format": req.format, "kind": req.kind.value,
        "resource": req.resource.value, "resource_id": req.resource_id, "version": version,
        "updated_date": todo.updated_date,
    }
    held = storage.existing_version(todo.destination, version) if marker else None
    if marker and held is not None:
        ctx.note("destination already holds this version", uri=held["uri"])
        result.update(held)
        ctx.redis.set(marker, json.dumps(result), ex=MARKER_TTL)
        return {"skipped": "already exported", **result}

    ctx.note("export started", resource=req.resource.value, resource_id=req.resource_id,
             kind=req.kind.value, format=req.format, to=todo.destination.uri)
    if isinstance(todo.destination, CloudDestination):
        outcome = ctx.gateway.export(req, None)
        result["size"] = outcome.size
        ctx.note("written by CVAT to its cloud storage", uri=todo.destination.uri)
    else:
        with storage.staging(todo.destination) as staged:
            outcome = ctx.gateway.export(req, staged.path)
            if outcome.path is not None and outcome.path != staged.path and outcome.path.exists():
                outcome.path.replace(staged.path)  # a gateway that chose its own name, same directory
            size = staged.path.stat().st_size if staged.path.exists() else 0
            ctx.note(f"downloaded {size} bytes", size=size, server_seconds=round(outcome.server_seconds, 3))
            result.update(storage.commit(staged, version=version))
        ctx.note("committed", uri=result["uri"], size=result["size"])
    result["server_seconds"] = round(outcome.server_seconds, 3)
    if outcome.cvat_seconds is not None:
        result["cvat_seconds"] = round(outcome.cvat_seconds, 3)
    result["status_checks"] = outcome.status_checks
    if outcome.rq_id is not None:
        result["rq_id"] = outcome.rq_id
    if marker:
        # Written only after the commit: a crash before it re-exports, and never skips a missing file.
        ctx.redis.set(marker, json.dumps(result), ex=MARKER_TTL)
    return result
