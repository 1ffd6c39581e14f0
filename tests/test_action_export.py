"""The export action: parameter checks, resource resolution, storage, and once-per-version exports."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from core.errors import PermanentError, TransientError
from core.settings import WorkerSettings
from tests.fake_gateway import FakeGateway, job_event, make_context, task_event
from tests.moto_s3 import bucket, s3_endpoint, use_endpoint
from workers.actions import export, validate_params
from workers.gateway import ExportKind, ExportOutcome, ExportRequest, Resource

FMT = "CVAT for images 1.1"


@pytest.fixture
def cfg(tmp_path: Path) -> WorkerSettings:
    """Worker settings with a data directory of this test's own."""
    return WorkerSettings(data_dir=tmp_path / "data")


@pytest.fixture
def fake_redis() -> fakeredis.FakeRedis:
    """An in-memory Redis: these are unit tests of the action (the e2e tests use a real one)."""
    return fakeredis.FakeRedis()


def run_export(params: dict[str, Any], *, gateway: FakeGateway, fake_redis: Any, cfg: WorkerSettings,
               event: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    ctx = make_context("export", params, event=event or job_event(), gateway=gateway, redis=fake_redis,
                       settings=cfg)
    return export.run(ctx), ctx


def export_requests(gateway: FakeGateway) -> list[ExportRequest]:
    return [request for request, _ in gateway.called("export")]


# -- validate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {"format": FMT, "to": "exports/{task_id}/{job_id}.zip"},
    {"resource": "task", "format": FMT, "include_images": True, "to": "s3://bucket/{task_id}.zip"},
    {"resource": "project", "kind": "dataset", "format": "COCO 1.0", "to": "file:///srv/x.zip"},
    {"resource": "task", "kind": "backup", "lightweight": True, "to": "cvat-cloud://3/backups/{task_id}.zip"},
    {"format": FMT, "include_images": False, "to": "a.zip", "require_all_jobs": {"state": "completed"}},
], ids=["annotations-with-placeholders", "include-images", "dataset", "backup", "common-param"])
def test_valid_params(params: dict[str, Any]) -> None:
    """Well-formed parameter sets pass, placeholders and all."""
    assert validate_params("export", params) == []


@pytest.mark.parametrize(("params", "problem"), [
    ({"format": FMT}, "to is required"),
    ({"to": "a.zip"}, "format is required for kind: annotations"),
    ({"kind": "backup", "format": FMT, "to": "a.zip"}, "format does not apply to kind: backup"),
    ({"resource": "job", "kind": "backup", "to": "a.zip"}, "cannot back up a job"),
    ({"kind": "annotations", "include_images": True, "format": FMT, "to": "a.zip"},
     "include_images: true means kind: dataset"),
    ({"kind": "dataset", "include_images": False, "format": FMT, "to": "a.zip"},
     "include_images: false contradicts kind: dataset"),
    ({"include_images": "yes", "format": FMT, "to": "a.zip"}, "include_images must be true or false"),
    ({"lightweight": True, "format": FMT, "to": "a.zip"}, "lightweight applies to kind: backup only"),
    ({"kind": "backup", "lightweight": "no", "to": "a.zip"}, "lightweight must be true or false"),
    ({"kind": "everything", "format": FMT, "to": "a.zip"}, "kind: 'everything' is not one of"),
    ({"resource": "issue", "format": FMT, "to": "a.zip"}, "resource: 'issue' is not one of"),
    ({"fromat": FMT, "format": FMT, "to": "a.zip"}, "unknown parameter 'fromat'"),
    ({"format": FMT, "to": "ftp://host/a.zip"}, "to: destination 'ftp://host/a.zip': unsupported scheme"),
    ({"format": FMT, "to": "exports/"}, "names a directory"),
], ids=["no-to", "no-format", "backup-with-format", "job-backup", "images-vs-annotations",
        "no-images-vs-dataset", "include-images-not-bool", "lightweight-not-backup", "lightweight-not-bool",
        "bad-kind", "bad-resource", "typo", "bad-scheme", "directory"])
def test_invalid_params(params: dict[str, Any], problem: str) -> None:
    """Each mistake is reported in a sentence naming it."""
    problems = validate_params("export", params)
    assert any(problem in p for p in problems), problems


# -- run ---------------------------------------------------------------------------------------

class TimedGateway(FakeGateway):
    """A fake whose exports report CVAT's own time and the status checks, as the real client does."""

    def export(self, request: ExportRequest, dest: Path | None) -> ExportOutcome:
        return dataclasses.replace(super().export(request, dest), cvat_seconds=0.2, status_checks=3, rq_id="rq-1")


def test_exports_a_job_to_a_local_file(cfg: WorkerSettings, fake_redis: Any) -> None:
    """The job of the event is exported in the format asked, downloaded and committed at the path;
    the result says how long the wait was, CVAT's own share of it, and what it cost CVAT."""
    gateway = TimedGateway(export_content=b"zip bytes")
    result, ctx = run_export({"format": FMT, "to": "exports/2/1.zip"}, gateway=gateway, fake_redis=fake_redis,
                             cfg=cfg)
    final = (cfg.data_dir / "exports/2/1.zip").resolve()
    assert final.read_bytes() == b"zip bytes"
    assert export_requests(gateway) == [ExportRequest(Resource.JOB, 1, ExportKind.ANNOTATIONS, FMT)]
    staged_to = gateway.called("export")[0][1]
    assert staged_to != final and staged_to.parent == final.parent
    assert {k: v for k, v in result.items() if k not in ("version", "path")} == {
        "uri": final.as_uri(), "size": 9, "format": FMT, "kind": "annotations", "resource": "job",
        "resource_id": 1, "updated_date": "2026-11-22T17:39:11.960910Z", "server_seconds": 0.25,
        "cvat_seconds": 0.2, "status_checks": 3, "rq_id": "rq-1"}
    assert len(result["version"]) == 64
    assert ctx.note.messages == ["export started", "downloaded 9 bytes", "committed"]


@pytest.mark.parametrize(("params", "event", "expected"), [
    ({"resource": "task"}, job_event(job_id=5, task_id=7), (Resource.TASK, 7)),
    ({"resource": "project"}, job_event(project_id=9), (Resource.PROJECT, 9)),
    ({}, task_event(task_id=4), (Resource.TASK, 4)),
], ids=["task-of-job-event", "project-of-job-event", "default-event-resource"])
def test_resource_and_id_come_from_the_event(params: dict[str, Any], event: dict[str, Any],
                                             expected: tuple[Resource, int], cfg: WorkerSettings,
                                             fake_redis: Any) -> None:
    """The resource defaults to the event's; its id is the matching ``*_id`` of the event."""
    gateway = FakeGateway()
    run_export({"format": FMT, "to": "a.zip", **params}, gateway=gateway, fake_redis=fake_redis, cfg=cfg,
               event=event)
    request = export_requests(gateway)[0]
    assert (request.resource, request.resource_id) == expected


@pytest.mark.parametrize(("params", "event", "message"), [
    ({"resource": "project"}, job_event(project_id=None), "names no project"),
    ({}, {"event": "completed:request[export:annotations]", "resource": "request", "task_id": 2},
     "is not about a job, task or project"),
    ({"kind": "backup", "format": None}, job_event(), "cannot back up a job"),
], ids=["no-project-id", "request-event-without-resource", "job-backup-by-default"])
def test_unresolvable_resource_fails_permanently(params: dict[str, Any], event: dict[str, Any], message: str,
                                                 cfg: WorkerSettings, fake_redis: Any) -> None:
    """An export the event cannot identify fails at once, saying what is missing."""
    params = {"format": FMT, "to": "a.zip", **params}
    params = {k: v for k, v in params.items() if v is not None}
    gateway = FakeGateway()
    with pytest.raises(PermanentError, match=message):
        run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg, event=event)
    assert gateway.called("export") == []


def test_unknown_format_lists_the_valid_names(cfg: WorkerSettings, fake_redis: Any) -> None:
    """A format the server does not offer fails permanently with the list (and a close match)."""
    gateway = FakeGateway()
    with pytest.raises(PermanentError) as caught:
        run_export({"format": "CVAT for image 1.1", "to": "a.zip"}, gateway=gateway, fake_redis=fake_redis,
                   cfg=cfg)
    message = str(caught.value)
    assert "did you mean 'CVAT for images 1.1'?" in message
    assert "valid names: COCO 1.0, CVAT for images 1.1, Datumaro 1.0, YOLO 1.1" in message
    assert gateway.called("export") == []


def test_rendered_path_outside_the_roots_fails(cfg: WorkerSettings, fake_redis: Any, tmp_path: Path) -> None:
    """The storage roots are enforced at run time, on the rendered destination."""
    gateway = FakeGateway()
    with pytest.raises(PermanentError, match="outside the storage roots"):
        run_export({"format": FMT, "to": str(tmp_path / "elsewhere.zip")}, gateway=gateway,
                   fake_redis=fake_redis, cfg=cfg)
    assert gateway.called("export") == []


def test_include_images_exports_a_dataset(cfg: WorkerSettings, fake_redis: Any) -> None:
    """``include_images: true`` is kind dataset."""
    gateway = FakeGateway()
    result, _ = run_export({"format": FMT, "include_images": True, "to": "a.zip"}, gateway=gateway,
                           fake_redis=fake_redis, cfg=cfg)
    assert export_requests(gateway)[0].kind is ExportKind.DATASET
    assert result["kind"] == "dataset"


def test_backup_skips_the_format_check(cfg: WorkerSettings, fake_redis: Any) -> None:
    """A backup has no format, passes ``lightweight`` through and does not ask for the format list."""
    gateway = FakeGateway()
    result, _ = run_export({"kind": "backup", "lightweight": True, "to": "backups/t.zip"}, gateway=gateway,
                           fake_redis=fake_redis, cfg=cfg, event=task_event())
    assert export_requests(gateway) == [ExportRequest(Resource.TASK, 2, ExportKind.BACKUP, None,
                                                      lightweight=True)]
    assert gateway.called("annotation_formats") == []
    assert result["format"] is None and result["kind"] == "backup"


def test_cvat_cloud_is_written_by_cvat(cfg: WorkerSettings, fake_redis: Any) -> None:
    """A cvat-cloud:// destination is passed to CVAT; nothing is downloaded."""
    gateway = FakeGateway()
    result, ctx = run_export({"format": FMT, "to": "cvat-cloud://3/exports/job-1.zip"}, gateway=gateway,
                             fake_redis=fake_redis, cfg=cfg)
    (request, dest), = gateway.called("export")
    assert dest is None
    assert (request.cloud_storage_id, request.cloud_filename) == (3, "exports/job-1.zip")
    assert result["uri"] == "cvat-cloud://3/exports/job-1.zip" and result["size"] is None
    assert not cfg.data_dir.exists() or not any(cfg.data_dir.rglob("*.part"))
    assert "written by CVAT to its cloud storage" in ctx.note.messages


# -- idempotency -------------------------------------------------------------------------------

def test_same_version_is_exported_once(cfg: WorkerSettings, fake_redis: Any) -> None:
    """A second run for the same resource version skips, returning the first result."""
    gateway = FakeGateway()
    params = {"format": FMT, "to": "a.zip"}
    first, _ = run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg)
    second, _ = run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg)
    assert len(gateway.called("export")) == 1
    assert second == {"skipped": "already exported", **first}
    key = export.MARKER_PREFIX + first["version"]
    assert json.loads(fake_redis.get(key)) == first
    assert 29 * 86400 < fake_redis.ttl(key) <= export.MARKER_TTL


def test_a_deleted_local_file_is_written_again(cfg: WorkerSettings, fake_redis: Any) -> None:
    """The marker only stands while the local file it describes exists."""
    gateway = FakeGateway()
    params = {"format": FMT, "to": "a.zip"}
    run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg)
    (cfg.data_dir / "a.zip").unlink()
    result, _ = run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg)
    assert "skipped" not in result and (cfg.data_dir / "a.zip").exists()
    assert len(gateway.called("export")) == 2


@pytest.mark.parametrize("change", [
    {"event": job_event(updated_date="2026-11-23T08:00:00Z")},
    {"params": {"format": "COCO 1.0"}},
    {"params": {"to": "b.zip"}},
    {"params": {"include_images": True}},
], ids=["new-updated-date", "other-format", "other-destination", "with-images"])
def test_a_different_version_exports_again(change: dict[str, Any], cfg: WorkerSettings,
                                           fake_redis: Any) -> None:
    """Anything in the version key that changes makes a new export."""
    gateway = FakeGateway()
    params = {"format": FMT, "to": "a.zip"}
    run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg)
    result, _ = run_export({**params, **change.get("params", {})}, gateway=gateway, fake_redis=fake_redis,
                           cfg=cfg, event=change.get("event"))
    assert "skipped" not in result
    assert len(gateway.called("export")) == 2


def test_no_marker_when_the_export_fails(cfg: WorkerSettings, fake_redis: Any) -> None:
    """A failed export leaves no marker and no file, so the retry exports."""
    gateway = FakeGateway()
    gateway.fail_next("export", TransientError("CVAT answered 503"))
    params = {"format": FMT, "to": "a.zip"}
    with pytest.raises(TransientError):
        run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg)
    assert fake_redis.keys(export.MARKER_PREFIX + "*") == []
    assert not (cfg.data_dir / "a.zip").exists()
    result, _ = run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg)
    assert "skipped" not in result and (cfg.data_dir / "a.zip").exists()


def test_version_is_asked_from_cvat_when_the_event_has_none(cfg: WorkerSettings, fake_redis: Any) -> None:
    """A ``completed:request`` event carries no updated_date: the resource's own is used."""
    gateway = FakeGateway(resources={(Resource.TASK, 2): {"id": 2, "updated_date": "2026-11-22T17:40:44Z"}})
    event = {"event": "completed:request[export:annotations]", "resource": "request", "resource_id": None,
             "updated_date": None, "project_id": 1, "task_id": 2, "job_id": None}
    params = {"resource": "task", "format": FMT, "to": "a.zip"}
    first, _ = run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg, event=event)
    second, _ = run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg, event=event)
    assert first["updated_date"] == "2026-11-22T17:40:44Z"
    assert second["skipped"] == "already exported"


def test_without_any_version_every_run_exports(cfg: WorkerSettings, fake_redis: Any) -> None:
    """With no updated_date anywhere nothing identifies the version, so nothing is skipped."""
    gateway = FakeGateway(resources={(Resource.TASK, 2): {"id": 2}})
    event = {"event": "completed:request[export:annotations]", "resource": "request", "task_id": 2}
    params = {"resource": "task", "format": FMT, "to": "a.zip"}
    for _ in range(2):
        result, _ = run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg, event=event)
        assert "skipped" not in result
    assert len(gateway.called("export")) == 2
    assert fake_redis.keys(export.MARKER_PREFIX + "*") == []


# -- S3 ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with s3_endpoint() as url:
        yield url


def test_s3_export_uploads_once_even_if_redis_forgets(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str,
                                                      tmp_path: Path, cfg: WorkerSettings,
                                                      fake_redis: Any) -> None:
    """The object lands in the bucket; with the marker gone, its metadata still prevents a rewrite."""
    use_endpoint(monkeypatch, moto_endpoint, tmp_path)
    gateway = FakeGateway(export_content=b"annotations for job 1")
    params = {"format": FMT, "to": "s3://action-exports/jobs/1.zip"}
    with bucket("action-exports") as client:
        first, _ = run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg)
        body = client.get_object(Bucket="action-exports", Key="jobs/1.zip")["Body"].read()
    assert body == b"annotations for job 1"
    assert first["uri"] == "s3://action-exports/jobs/1.zip" and first["size"] == len(body)

    fake_redis.flushall()
    second, ctx = run_export(params, gateway=gateway, fake_redis=fake_redis, cfg=cfg)
    assert second["skipped"] == "already exported"
    assert len(gateway.called("export")) == 1
    assert ctx.note.messages == ["destination already holds this version"]
    assert fake_redis.get(export.MARKER_PREFIX + first["version"]) is not None
