"""What ``auto_annotate`` and ``import_annotations`` need from CVAT, beyond ``workers.gateway``.

Kept apart from :class:`workers.gateway.CvatGateway` so the other actions' fakes need not grow
these methods; ``workers.cvat_client.CvatClient`` implements both protocols.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from workers.gateway import CvatGateway, Resource

Progress = Callable[[int, int], None]
"""``progress(frames_done, frames_total)``, called as an auto-annotation advances."""


class ImportMode(StrEnum):
    """CVAT's ``import_mode`` (cvat/apps/dataset_manager/task.py ``AnnotationImportMode``)."""

    APPEND = "append"
    """Keep what the task or job has and add the file's annotations."""
    REPLACE = "replace"
    """Delete the existing annotations first (CVAT 2.73's default when no mode is sent)."""


@dataclass(frozen=True)
class AnnotateOutcome:
    """What one ``annotate_task`` run did."""

    frames: int
    """Frames the function was run on."""
    detections: int
    """Annotations the function returned (before those of unmatched labels were dropped)."""


@dataclass(frozen=True)
class ImportOutcome:
    """What one annotation import did."""

    rq_id: str
    server_seconds: float


class AnnotationGateway(CvatGateway, Protocol):
    """CVAT operations of the annotation actions."""

    def import_formats(self) -> list[str]:
        """Names of the enabled import formats (``importers`` of ``/api/server/annotation/formats``)."""
        ...

    def auto_annotate(self, task_id: int, function: Any, *, work_dir: Path, clear_existing: bool,
                      allow_unmatched_labels: bool, conf_threshold: float | None,
                      progress: Progress | None = None) -> AnnotateOutcome:
        """Run a detection function (``spec``, ``detect``) over every frame of the task and upload
        its annotations; ``work_dir`` holds the downloaded chunks and may be deleted afterwards."""
        ...

    def import_annotations(self, resource: Resource, resource_id: int, format_name: str, path: Path, *,
                           mode: ImportMode) -> ImportOutcome:
        """Upload an annotation file to a task or job and wait until CVAT has imported it."""
        ...
