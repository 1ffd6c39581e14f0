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
