"""``import_annotations``: parameters checked at load, ``from`` read like ``to`` is written (roots,
service files, payload values), CVAT's TUS upload and import request over HTTP against the test
CVAT server, append and replace, once per file, S3 sources, and a delivery run end to end."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.delivery_log import DeliveryLog
from core.errors import PermanentError
from core.settings import WorkerSettings
from receiver.rules import RulesError, parse_rules
from receiver.rules.templating import render_params
from tests.conftest import SECRET, post
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer, task_data
from tests.fake_gateway import make_context
from tests.moto_s3 import bucket, s3_endpoint, use_endpoint
from workers.actions import REGISTRY, import_annotations, validate_params
from workers.storage import LocalDestination, parse_source

FMT = "CVAT 1.1"


def cvat_xml(*boxes: tuple[str, str, tuple[float, float, float, float]]) -> bytes:
    """A CVAT 1.1 annotations.xml with these (image name, label, box) entries."""
    images: dict[str, list[str]] = {}
    for name, label, (x1, y1, x2, y2) in boxes:
        images.setdefault(name, []).append(
            f'<box label="{label}" xtl="{x1}" ytl="{y1}" xbr="{x2}" ybr="{y2}" occluded="0"/>')
    body = "".join(f'<image id="{i}" name="{name}">{"".join(items)}</image>'
                   for i, (name, items) in enumerate(images.items()))
    return f'<?xml version="1.0"?><annotations><version>1.1</version>{body}</annotations>'.encode()


def zipped(xml: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("annotations.xml", xml)
    return buffer.getvalue()


@pytest.mark.parametrize("params", [
    {"from": "preannotations/{task_id}.zip", "format": FMT},
    {"from": "s3://preannotations/{task.name}.zip", "format": "COCO 1.0", "resource": "job", "mode": "replace"},
    {"from": "file:///srv/pre/x.xml", "format": FMT, "mode": "append"},
], ids=["path", "s3-job-replace", "file-url"])
def test_valid_params(params: dict[str, Any]) -> None:
    """Well-formed parameters pass."""
    assert validate_params("import_annotations", params) == []


@pytest.mark.parametrize(("params", "problem"), [
    ({"format": FMT}, "from is required"),
    ({"from": "x.zip"}, "format is required"),
    ({"from": "cvat-cloud://1/x.zip", "format": FMT}, "cvat-cloud:// cannot be read"),
    ({"from": "s3://bucket/../secrets", "format": FMT}, "'..' path segments are not allowed"),
    ({"from": "ftp://host/x.zip", "format": FMT}, "unsupported scheme 'ftp'"),
    ({"from": "pre/", "format": FMT}, "names a directory"),
    ({"from": "x.zip", "format": FMT, "mode": "merge"}, "mode: 'merge' is not one of append, replace"),
    ({"from": "x.zip", "format": FMT, "resource": "project"}, "resource: 'project' is not one of task, job"),
    ({"from": "x.zip", "format": "{task.name}"}, "format cannot hold a placeholder"),
    ({"from": "x.zip", "format": FMT, "to": "y"}, "unknown parameter 'to'"),
    ({"from": "x.zip", "format": "CVAT for images 1.1"}, "is not an import format of CVAT"),
], ids=["no-from", "no-format", "cvat-cloud", "dotdot", "scheme", "directory", "mode", "resource",
        "format-placeholder", "unknown", "export-name"])
def test_invalid_params(params: dict[str, Any], problem: str) -> None:
    """Each mistake is reported in words that name the parameter."""
    problems = validate_params("import_annotations", params)
    assert any(problem in p for p in problems), problems


def test_rules_file_errors_name_file_line_and_rule() -> None:
    """A bad import_annotations parameter in rules.yaml is a load error with its file, line and rule."""
    text = ("version: 1\nrules:\n  - id: preload\n    on: completed:request[create:task]\n    do:\n"
            "      - action: import_annotations\n        from: cvat-cloud://2/x.zip\n        format: CVAT 1.1\n")
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.yaml")
    assert any(line.startswith("rules.yaml:6: ") and "preload" in line and "cvat-cloud://" in line
               for line in str(info.value).splitlines()), str(info.value)


# -- from: the same safety as export's to ------------------------------------------------------------

HOSTILE_NAMES = ["../../webhook-secrets", "..%2F..%2Fwebhook-secrets", "%2e%2e%2fwebhook-secrets",
                 "..%252F..%252Fwebhook-secrets", "x%00/../../webhook-secrets"]


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    """A data directory holding the webhook secrets and a ``pre`` directory of annotation files."""
    monkeypatch.delenv("CVAT_HOOKS_SECRET_FILE", raising=False)
    monkeypatch.delenv("CVAT_HOOKS_RULES", raising=False)
    data = tmp_path / "data"
    (data / "pre").mkdir(parents=True)
    (data / "webhook-secrets").write_text("s3cret\n")
    return WorkerSettings(data_dir=data)


@pytest.mark.parametrize("template", ["pre/{task.name}.xml", "file://pre/{task.name}", "pre/{task.name}"],
                         ids=["bare", "file-url", "whole-name"])
@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=["dotdot", "encoded", "encoded-dots", "double", "nul"])
def test_payload_values_cannot_leave_the_directory(template: str, name: str, cfg: WorkerSettings) -> None:
    """A task name rendered into from (as the receiver renders it) stays inside pre/ once decoded."""
    rendered = render_params({"from": template}, {"task": {"name": name}},
                             path_params=REGISTRY["import_annotations"].path_params)["from"]
    source = parse_source(rendered, cfg)
    assert isinstance(source, LocalDestination)
    assert source.path.is_relative_to((cfg.data_dir / "pre").resolve())


@pytest.mark.parametrize("url", ["webhook-secrets", "file://webhook-secrets", "pre/../webhook-secrets",
                                 "journal/journal.log", "redis.rdb", "/etc/passwd"],
                         ids=lambda u: u)
def test_the_services_files_and_outside_files_are_never_read(url: str, cfg: WorkerSettings) -> None:
    """The service's own files and anything outside the roots are refused as a source."""
    with pytest.raises(PermanentError, match="service's own files|outside the storage roots"):
        parse_source(url, cfg)


def test_a_symlink_to_a_secret_is_refused(cfg: WorkerSettings) -> None:
    """A link inside a root pointing at the secrets is judged by where it points."""
    (cfg.data_dir / "pre" / "link.xml").symlink_to(cfg.data_dir / "webhook-secrets")
    with pytest.raises(PermanentError, match="service's own files"):
        parse_source("pre/link.xml", cfg)


# -- against the test CVAT server ------------------------------------------------------------------


def context(params: dict[str, Any], cfg: WorkerSettings, gateway: Any, redis: Any, *, task_id: int,
            job_id: int | None = None, **kw: Any) -> Any:
    event = {"event": "completed:request[create:task]", "resource": "request", "task_id": task_id,
             "job_id": job_id, "project_id": None}
    return make_context("import_annotations", params, event=event, gateway=gateway, redis=redis, settings=cfg, **kw)


def shapes(server: CvatTestServer, task_id: int) -> list[dict[str, Any]]:
    with server.state.lock:
        return list(server.state.tasks[task_id].get("annotations", {}).get("shapes", []))


@pytest.fixture
def task(cvat_server: CvatTestServer) -> int:
    """A task of 4 frames (2 jobs) with the labels car and person."""
    return cvat_server.add_task("pre", labels=["car", "person"], jobs=2, frames_per_job=2)


def test_imports_a_local_file_appending(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any,
                                        cfg: WorkerSettings, task: int) -> None:
    """The file's boxes land in the task next to what it had; CVAT is told import_mode=append."""
    (cfg.data_dir / "pre" / f"{task}.zip").write_bytes(
        zipped(cvat_xml(("img0.png", "car", (1, 2, 3, 4)), ("img3.png", "person", (5, 6, 7, 8)))))
    params = {"from": f"pre/{task}.zip", "format": FMT}
    result = import_annotations.run(context(params, cfg, cvat_gateway, redis, task_id=task))
    assert result["mode"] == "append" and result["resource"] == "task" and result["resource_id"] == task
    assert sorted((s["frame"], s["points"]) for s in shapes(cvat_server, task)) == [
        (0, [1.0, 2.0, 3.0, 4.0]), (3, [5.0, 6.0, 7.0, 8.0])]
    [finish] = [c for c in cvat_server.calls("POST", f"/api/tasks/{task}/annotations/") if "upload-finish" in c.headers]
    assert finish.query["import_mode"] == "append" and finish.query["format"] == FMT
    assert result["rq_id"] == task_data.import_rq_id("task", task)


def test_the_same_file_is_imported_once(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any,
                                        cfg: WorkerSettings, task: int) -> None:
    """A duplicate, replay or retry after success skips; a changed file imports again."""
    path = cfg.data_dir / "pre" / "t.xml"
    path.write_bytes(cvat_xml(("img1.png", "car", (1, 1, 2, 2))))
    params = {"from": "pre/t.xml", "format": FMT}
    first = import_annotations.run(context(params, cfg, cvat_gateway, redis, task_id=task))
    again = import_annotations.run(context(params, cfg, cvat_gateway, redis, task_id=task, run=1))
    assert again["skipped"] == "already imported" and again["version"] == first["version"]
    assert len(shapes(cvat_server, task)) == 1
    path.write_bytes(cvat_xml(("img1.png", "car", (1, 1, 9, 9))))
    changed = import_annotations.run(context(params, cfg, cvat_gateway, redis, task_id=task))
    assert changed["version"] != first["version"] and len(shapes(cvat_server, task)) == 2


def test_replace_clears_first(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any, cfg: WorkerSettings,
                              task: int) -> None:
    """mode: replace leaves only the file's annotations."""
    (cfg.data_dir / "pre" / "a.xml").write_bytes(cvat_xml(("img0.png", "car", (1, 1, 2, 2)),
                                                          ("img1.png", "car", (1, 1, 2, 2))))
    (cfg.data_dir / "pre" / "b.xml").write_bytes(cvat_xml(("img2.png", "person", (3, 3, 4, 4))))
    import_annotations.run(context({"from": "pre/a.xml", "format": FMT}, cfg, cvat_gateway, redis, task_id=task))
    import_annotations.run(context({"from": "pre/b.xml", "format": FMT, "mode": "replace"}, cfg, cvat_gateway,
                                   redis, task_id=task))
    assert [(s["frame"], s["points"]) for s in shapes(cvat_server, task)] == [(2, [3.0, 3.0, 4.0, 4.0])]


def test_a_job_gets_only_its_frames(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any,
                                    cfg: WorkerSettings, task: int) -> None:
    """resource: job imports into the event's job (its frame range)."""
    with cvat_server.state.lock:
        second_job = sorted(j["id"] for j in cvat_server.state.task_jobs(task))[1]
    (cfg.data_dir / "pre" / "j.xml").write_bytes(cvat_xml(("img2.png", "car", (1, 1, 2, 2))))
    result = import_annotations.run(context({"from": "pre/j.xml", "format": FMT, "resource": "job"}, cfg,
                                            cvat_gateway, redis, task_id=task, job_id=second_job))
    assert (result["resource"], result["resource_id"]) == ("job", second_job)
    assert [s["frame"] for s in shapes(cvat_server, task)] == [2]


def test_an_export_format_name_is_refused_with_the_import_name(cvat_gateway: Any, redis: Any,
                                                                cfg: WorkerSettings, task: int) -> None:
    """CVAT imports its XML as 'CVAT 1.1': the error suggests it and lists the valid names."""
    (cfg.data_dir / "pre" / "x.xml").write_bytes(cvat_xml())
    with pytest.raises(PermanentError, match="did you mean 'CVAT 1.1'") as info:
        import_annotations.run(context({"from": "pre/x.xml", "format": "CVAT for images 1.1"}, cfg, cvat_gateway,
                                       redis, task_id=task))
    assert "not offered by this CVAT server" in str(info.value), "the server's list decides at run time"
    assert "valid names: " in str(info.value)


def test_a_broken_file_fails_permanently_with_cvats_message(cvat_gateway: Any, redis: Any, cfg: WorkerSettings,
                                                           task: int) -> None:
    """An import CVAT reports failed will fail again with the same file: no retry, CVAT's reason shown."""
    (cfg.data_dir / "pre" / "broken.xml").write_bytes(b"<annotations><image")
    with pytest.raises(PermanentError, match="failed on the server: .*ParseError|failed on the server: .*Error"):
        import_annotations.run(context({"from": "pre/broken.xml", "format": FMT}, cfg, cvat_gateway, redis,
                                       task_id=task))
    assert not [k for k in redis.scan_iter(import_annotations.MARKER_PREFIX + "*")]


def test_a_missing_file_fails_permanently(cvat_gateway: Any, redis: Any, cfg: WorkerSettings, task: int) -> None:
    """A source that does not exist is the rule's (or the uploader's) to fix."""
    with pytest.raises(PermanentError, match="no such file"):
        import_annotations.run(context({"from": "pre/none.xml", "format": FMT}, cfg, cvat_gateway, redis,
                                       task_id=task))


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with s3_endpoint() as url:
        yield url


def test_imports_from_s3(cvat_server: CvatTestServer, cvat_gateway: Any, redis: Any, cfg: WorkerSettings,
                         task: int, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An s3:// source is downloaded into a private staging directory, imported, and removed."""
    use_endpoint(monkeypatch, moto_endpoint, tmp_path)
    with bucket("preannotations") as s3:
        s3.put_object(Bucket="preannotations", Key=f"tasks/{task}.zip",
                      Body=zipped(cvat_xml(("img1.png", "person", (4, 3, 2, 1)))))
        result = import_annotations.run(context({"from": f"s3://preannotations/tasks/{task}.zip", "format": FMT},
                                                cfg, cvat_gateway, redis, task_id=task))
        with pytest.raises(PermanentError, match="404"):
            import_annotations.run(context({"from": "s3://preannotations/tasks/none.zip", "format": FMT},
                                           cfg, cvat_gateway, redis, task_id=task))
    assert result["from"] == f"s3://preannotations/tasks/{task}.zip"
    assert [s["frame"] for s in shapes(cvat_server, task)] == [1]
    assert not list((cfg.data_dir / "tmp").iterdir()), "the downloaded copy is removed"


# -- a delivery, through the receiver and a real RQ worker --------------------------------------------

RULES = """
version: 1
rules:
  - id: preannotations
    on: completed:request[create:task]
    if: {request.status: finished}
    do:
      - action: import_annotations
        from: pre/task-{task_id}.xml
        format: CVAT 1.1
"""


@pytest.fixture
def e2e(settings: Any, cvat_server: CvatTestServer, monkeypatch: pytest.MonkeyPatch, worker_env: Any) -> Any:
    """Receiver settings with the rule above, and a worker environment pointed at the test CVAT."""
    monkeypatch.setenv("CVAT_URL", cvat_server.url)
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", DEFAULT_TOKEN)
    settings.rules_path.write_text(RULES)
    return settings


def test_a_finished_task_creation_loads_its_preannotations(e2e: Any, client: Any, redis: Any,
                                                           cvat_server: CvatTestServer, webhook_sink: Any) -> None:
    """completed:request[create:task], as the test CVAT sends it, loads pre/task-<id>.xml into the task."""
    from tests.test_end_to_end import drain

    task_id = cvat_server.add_task("delivered", labels=["car"], jobs=1, frames_per_job=2, org="acme")
    (e2e.data_dir / "pre").mkdir(parents=True, exist_ok=True)
    (e2e.data_dir / "pre" / f"task-{task_id}.xml").write_bytes(cvat_xml(("img1.png", "car", (1, 2, 3, 4))))
    cvat_server.add_webhook(webhook_sink.url + "/hook", project_id=None, org="acme", secret=SECRET,
                            events=["completed:request[create:task]"])
    task_data.data_ready(cvat_server, task_id)
    cvat_server.webhooks.join(10)
    [delivered] = webhook_sink.received
    answer = post(client, delivered.body)
    assert answer.status_code == 202, answer.json
    drain(e2e)
    record = DeliveryLog(redis, retention_seconds=60).get(answer.json["delivery_id"])
    assert record is not None
    [action] = record.actions.values()
    assert action["status"] == "succeeded", action
    assert [(s["frame"], s["points"]) for s in shapes(cvat_server, task_id)] == [(1, [1.0, 2.0, 3.0, 4.0])]
