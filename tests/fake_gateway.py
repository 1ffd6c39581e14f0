"""An in-memory ``CvatGateway`` for the actions' unit tests, and a helper that builds their context.

It lives at our own boundary (the gateway protocol), so the actions run unchanged against it; the
real client is tested against the test CVAT server over HTTP. Calls are recorded, and any method
can be told to raise on its next calls (``fail_next``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.contract import ActionCall
from core.errors import PermanentError
from core.settings import WorkerSettings
from workers.context import ActionContext
from workers.gateway import ExportOutcome, ExportRequest, LabelSet, Resource

DEFAULT_FORMATS = ["CVAT for images 1.1", "COCO 1.0", "YOLO 1.1", "Datumaro 1.0"]


@dataclass
class FakeGateway:
    """CVAT as a few dicts. ``resources`` is keyed by ``(Resource, id)``; ``labels`` by task id."""

    formats: list[str] = field(default_factory=lambda: list(DEFAULT_FORMATS))
    resources: dict[tuple[Resource, int], dict[str, Any]] = field(default_factory=dict)
    labels: dict[int, LabelSet] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    export_content: bytes | Callable[[ExportRequest], bytes] = b"PK\x03\x04 fake export"
    export_seconds: float = 0.25
    calls: list[tuple[str, Any]] = field(default_factory=list)
    failures: dict[str, list[BaseException]] = field(default_factory=dict)

    def fail_next(self, method: str, *errors: BaseException) -> None:
        """Make the next ``len(errors)`` calls of ``method`` raise these errors, in order."""
        self.failures.setdefault(method, []).extend(errors)

    def called(self, method: str) -> list[Any]:
        """The arguments of every call of ``method``, in order."""
        return [args for name, args in self.calls if name == method]

    def _enter(self, method: str, args: Any) -> None:
        self.calls.append((method, args))
        pending = self.failures.get(method)
        if pending:
            raise pending.pop(0)

    # -- the CvatGateway protocol -------------------------------------------------------------

    def annotation_formats(self) -> list[str]:
        self._enter("annotation_formats", ())
        return list(self.formats)

    def get_resource(self, resource: Resource, resource_id: int) -> dict[str, Any]:
        self._enter("get_resource", (resource, resource_id))
        try:
            return copy.deepcopy(self.resources[(Resource(resource), resource_id)])
        except KeyError:
            raise PermanentError(f"{resource} {resource_id} not found (404)") from None

    def list_jobs(self, task_id: int) -> list[dict[str, Any]]:
        self._enter("list_jobs", task_id)
        return [copy.deepcopy(job) for (kind, _), job in self.resources.items()
                if kind == Resource.JOB and job.get("task_id") == task_id]

    def task_labels(self, task_id: int) -> LabelSet:
        self._enter("task_labels", task_id)
        try:
            return copy.deepcopy(self.labels[task_id])
        except KeyError:
            raise PermanentError(f"task {task_id} not found (404)") from None

    def add_labels(self, labels: list[dict[str, Any]], *, task_id: int | None = None,
                   project_id: int | None = None) -> None:
        self._enter("add_labels", {"labels": copy.deepcopy(labels), "task_id": task_id,
                                   "project_id": project_id})
        if (task_id is None) == (project_id is None):
            raise ValueError("add_labels needs exactly one of task_id and project_id")
        for tid, label_set in self.labels.items():
            owner_matches = (label_set.project_id == project_id if project_id is not None
                             else tid == task_id and label_set.project_id is None)
            if owner_matches:
                label_set.labels.extend({"id": 1000 + len(label_set.labels), "type": "any", **label}
                                        for label in copy.deepcopy(labels))

    def update_job(self, job_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        self._enter("update_job", (job_id, dict(fields)))
        job = self.resources[(Resource.JOB, job_id)]
        for name, value in fields.items():
            if name == "assignee":
                username = next((u for u, i in self.users.items() if i == value), None)
                job["assignee"] = None if value is None else {"id": value, "username": username}
            else:
                job[name] = value
        return copy.deepcopy(job)

    def find_user_id(self, username: str) -> int:
        self._enter("find_user_id", username)
        try:
            return self.users[username]
        except KeyError:
            raise PermanentError(f"no CVAT user named {username!r}") from None

    def export(self, request: ExportRequest, dest: Path | None) -> ExportOutcome:
        self._enter("export", (request, dest))
        if request.cloud_storage_id is not None:
            return ExportOutcome(path=None, size=None, server_seconds=self.export_seconds)
        assert dest is not None, "a local export needs a destination path"
        if dest.exists():  # as cvat-sdk's downloader does
            raise FileExistsError(dest)
        content = self.export_content(request) if callable(self.export_content) else self.export_content
        dest.write_bytes(content)
        return ExportOutcome(path=dest, size=len(content), server_seconds=self.export_seconds)


@dataclass
class Notes:
    """Collects ``ctx.note(...)`` steps."""

    steps: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, message: str, **data: Any) -> None:
        self.steps.append((message, data))

    @property
    def messages(self) -> list[str]:
        return [message for message, _ in self.steps]


def make_context(action: str, params: dict[str, Any], *, event: dict[str, Any] | None = None,
                 gateway: FakeGateway | None = None, redis: Any = None,
                 settings: WorkerSettings | None = None, delivery_id: str = "d" * 64,
                 rule_id: str = "rule-1", index: int = 0, run: int = 0) -> ActionContext:
    """An ``ActionContext`` for one call of ``action``, with ``Notes`` as its ``note``."""
    gateway = gateway if gateway is not None else FakeGateway()
    call = ActionCall(delivery_id=delivery_id, rule_id=rule_id, index=index, action=action,
                      params=params, event=event or {}, run=run)
    return ActionContext(call=call, settings=settings or WorkerSettings(), redis=redis,
                         gateway_factory=lambda: gateway, note=Notes())


def job_event(job_id: int = 1, task_id: int = 2, project_id: int | None = 1,
              updated_date: str = "2026-11-22T17:39:11.960910Z", **extra: Any) -> dict[str, Any]:
    """Event essentials of an ``update:job`` delivery (shaped like ``Event.essentials()``)."""
    return {"event": "update:job", "resource": "job", "resource_id": job_id, "updated_date": updated_date,
            "webhook_id": 1, "project_id": project_id, "task_id": task_id, "job_id": job_id,
            "org_id": None, "object": {"id": job_id, "task_id": task_id, "updated_date": updated_date},
            **extra}


def task_event(task_id: int = 2, project_id: int | None = 1,
               updated_date: str = "2026-11-22T17:39:04.114965Z") -> dict[str, Any]:
    """Event essentials of a ``create:task`` delivery."""
    return {"event": "create:task", "resource": "task", "resource_id": task_id, "updated_date": updated_date,
            "webhook_id": 1, "project_id": project_id, "task_id": task_id, "job_id": None, "org_id": None,
            "object": {"id": task_id, "project_id": project_id, "updated_date": updated_date}}
