"""What the actions need from CVAT, as a protocol: the real one is ``workers.cvat_client``.

Actions talk to this protocol only, so an action's unit test can hand it a small fake while the
integration tests run the real client against the test CVAT server over HTTP. Resources are the
JSON objects of CVAT's REST API (``GET /api/jobs/{id}`` etc.) as plain dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol


class Resource(StrEnum):
    JOB = "job"
    TASK = "task"
    PROJECT = "project"


class ExportKind(StrEnum):
    ANNOTATIONS = "annotations"
    """Annotations only (CVAT's dataset export with ``save_images=false``)."""
    DATASET = "dataset"
    """Annotations and images."""
    BACKUP = "backup"
    """A task or project backup (no format)."""


@dataclass(frozen=True)
class ExportRequest:
    """One export, as CVAT understands it."""

    resource: Resource
    resource_id: int
    kind: ExportKind
    format: str | None = None
    """Format name as CVAT lists it (e.g. ``CVAT for images 1.1``); ``None`` for a backup."""
    cloud_storage_id: int | None = None
    """Set to have CVAT write the file to one of its own cloud storages (nothing is downloaded)."""
    cloud_filename: str | None = None
    """Object path inside that cloud storage."""
    lightweight: bool = False
    """Backups only: leave out media that lives in cloud storage (``download_backup(lightweight=)``)."""


@dataclass(frozen=True)
class ExportOutcome:
    """What an export produced: a local file (downloaded) or a file CVAT wrote to its cloud storage."""

    path: Path | None
    size: int | None
    server_seconds: float
    """Time from the export request to our seeing CVAT report it finished."""
    cvat_seconds: float | None = None
    """CVAT's own time: its request's ``created_date`` -> ``finished_date`` (the requests API), when
    it says; ``server_seconds`` minus this is the wait that was ours (bench/real_export.py)."""
    status_checks: int = 0
    """How many times the request's status was asked (what the wait cost CVAT)."""
    rq_id: str | None = None
    """CVAT's id of the export request (``GET /api/requests/{rq_id}``)."""


@dataclass(frozen=True)
class LabelSet:
    """The labels a task annotates with, and where they live (the task's own, or its project's)."""

    labels: list[dict[str, Any]]
    """CVAT label objects: ``name``, ``type``, ``attributes`` (each with ``name``), ``id``..."""
    task_id: int
    project_id: int | None = None
    """Set when the task inherits its labels from this project (labels are added there)."""
    extra: dict[str, Any] = field(default_factory=dict)


class CvatGateway(Protocol):
    """The CVAT operations the actions use. Errors: see ``core.errors`` (classified in one place)."""

    def annotation_formats(self) -> list[str]:
        """Names of the export formats the server offers (``GET /api/server/annotation/formats``)."""
        ...

    def get_resource(self, resource: Resource, resource_id: int) -> dict[str, Any]:
        """The current JSON of a job, task or project."""
        ...

    def list_jobs(self, task_id: int) -> list[dict[str, Any]]:
        """Every job of a task (all pages)."""
        ...

    def task_labels(self, task_id: int) -> LabelSet:
        """The labels a task uses, resolving labels inherited from its project."""
        ...

    def add_labels(self, labels: list[dict[str, Any]], *, task_id: int | None = None,
                   project_id: int | None = None) -> None:
        """Create labels (``{"name", "type"?, "attributes"?}``) on a task or a project."""
        ...

    def update_job(self, job_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        """PATCH a job (``stage``, ``state``, ``assignee`` as a user id) and return its new JSON."""
        ...

    def find_user_id(self, username: str) -> int:
        """The id of the user with this username (PermanentError when there is none)."""
        ...

    def export(self, request: ExportRequest, dest: Path | None) -> ExportOutcome:
        """Run an export on the server, wait for it, and download it to ``dest`` (a file path whose
        parent exists) unless ``request.cloud_storage_id`` sends it to CVAT's cloud storage."""
        ...
