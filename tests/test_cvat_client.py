"""The real CVAT client (``workers.cvat_client``) against the test CVAT server, over real HTTP."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from core.errors import ErrorKind, PermanentError, TransientError, classify
from core.settings import CvatSettings
from tests import cvat_fixtures
from tests.conftest import free_port
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer, export_digest
from tests.cvat_server.exports import export_rq_id
from workers.cvat_client import FINE_STEP, WINDOW_CHECKS, CvatClient, check_offsets, make_gateway
from workers.gateway import ExportKind, ExportRequest, LabelSet, Resource

# The fixtures, for as long as conftest.py does not provide them to every module (harmless after).
cvat_server = cvat_fixtures.cvat_server
cvat_settings = cvat_fixtures.cvat_settings
cvat_gateway = cvat_fixtures.cvat_gateway
make_cvat_client = cvat_fixtures.make_cvat_client

MakeClient = Callable[..., CvatClient]


ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def only_rq_id(server: CvatTestServer) -> str:
    (rq_id,) = server.state.requests
    return rq_id


# -- reading ------------------------------------------------------------------------------------


def test_annotation_formats_lists_enabled_exporters_once(cvat_gateway: CvatClient,
                                                         cvat_server: CvatTestServer):
    """Formats are the enabled exporters, and the server is asked only once per client."""
    first = cvat_gateway.annotation_formats()
    second = cvat_gateway.annotation_formats()
    assert first == second
    assert {"CVAT for images 1.1", "COCO 1.0", "YOLO 1.1", "Datumaro 1.0"} <= set(first)
    assert "TFRecord 1.0" not in first
    assert len(cvat_server.calls("GET", "/api/server/annotation/formats")) == 1


@pytest.mark.parametrize(("resource", "resource_id", "name_field", "expected"), [
    (Resource.JOB, 1, "task_name", "wh-task-1"),
    (Resource.TASK, 2, "name", "wh-task-1"),
    (Resource.PROJECT, 1, "name", "webhook-demo"),
], ids=["job", "task", "project"])
def test_get_resource_returns_the_json(cvat_gateway: CvatClient, resource: Resource, resource_id: int,
                                       name_field: str, expected: str):
    """A job, task or project comes back as CVAT's JSON object."""
    data = cvat_gateway.get_resource(resource, resource_id)
    assert data["id"] == resource_id
    assert data[name_field] == expected


def test_list_jobs_reads_every_page(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """All jobs of a task are returned, however many pages CVAT splits them into."""
    task_id = cvat_server.add_task("big", labels=["a"], jobs=205, frames_per_job=1)
    jobs = cvat_gateway.list_jobs(task_id)
    assert len(jobs) == 205
    assert {j["task_id"] for j in jobs} == {task_id}
    assert len(cvat_server.calls("GET", "/api/jobs")) == 3


def test_task_labels_of_a_task_in_a_project_are_the_projects(cvat_gateway: CvatClient):
    """A task in a project reports the project's labels, with ``project_id`` set."""
    labels = cvat_gateway.task_labels(2)
    assert isinstance(labels, LabelSet)
    assert (labels.task_id, labels.project_id) == (2, 1)
    assert [label["name"] for label in labels.labels] == ["car", "person"]
    assert labels.labels[0]["attributes"][0]["name"] == "color"


def test_task_labels_of_a_standalone_task_are_its_own(cvat_gateway: CvatClient):
    """A task outside any project reports its own labels, ``project_id`` None."""
    labels = cvat_gateway.task_labels(3)
    assert (labels.task_id, labels.project_id) == (3, None)
    assert [label["name"] for label in labels.labels] == ["tree"]


# -- writing ------------------------------------------------------------------------------------


def test_add_labels_to_a_project_creates_only_missing_names(cvat_gateway: CvatClient,
                                                            cvat_server: CvatTestServer):
    """Existing names are skipped, so a retried ``add_labels`` does not fail on duplicates."""
    cvat_gateway.add_labels([{"name": "car"}, {"name": "bike", "type": "rectangle"}], project_id=1)
    (patch,) = cvat_server.calls("PATCH", "/api/projects/1")
    assert patch.json == {"labels": [{"name": "bike", "type": "rectangle"}]}
    names = [label["name"] for label in cvat_gateway.task_labels(2).labels]
    assert names == ["car", "person", "bike"]


def test_add_labels_to_a_standalone_task_fills_attribute_defaults(cvat_gateway: CvatClient):
    """Attributes given by name only are created as free-text attributes."""
    cvat_gateway.add_labels([{"name": "bush", "attributes": [{"name": "height"}]}], task_id=3)
    bush = next(lb for lb in cvat_gateway.task_labels(3).labels if lb["name"] == "bush")
    assert bush["task_id"] == 3
    assert bush["attributes"][0]["name"] == "height"
    assert bush["attributes"][0]["input_type"] == "text"


def test_add_labels_when_all_exist_sends_no_patch(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """Nothing to add means no PATCH at all."""
    cvat_gateway.add_labels([{"name": "tree"}], task_id=3)
    assert cvat_server.calls("PATCH") == []


def test_add_labels_to_a_task_in_a_project_is_refused(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """CVAT would silently ignore them, so the client refuses and names the project."""
    with pytest.raises(PermanentError, match="project 1"):
        cvat_gateway.add_labels([{"name": "bike"}], task_id=2)
    assert cvat_server.calls("PATCH") == []


def test_update_job_changes_stage_state_assignee(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """The PATCH carries the fields as given and the answer is the job's new JSON."""
    job = cvat_gateway.update_job(1, {"stage": "acceptance", "state": "completed", "assignee": 2})
    assert (job["stage"], job["state"], job["status"]) == ("acceptance", "completed", "completed")
    assert job["assignee"]["username"] == "alice"
    (patch,) = cvat_server.calls("PATCH", "/api/jobs/1")
    assert patch.json == {"stage": "acceptance", "state": "completed", "assignee": 2}


def test_update_job_can_unassign(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """``assignee: None`` is sent as JSON null and clears the assignee."""
    cvat_server.set_job(1, assignee_id=3)
    assert cvat_gateway.update_job(1, {"assignee": None})["assignee"] is None


def test_update_job_refuses_other_fields(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """Only stage, state and assignee may be changed; nothing is sent otherwise."""
    with pytest.raises(PermanentError, match="frame_count"):
        cvat_gateway.update_job(1, {"frame_count": 3})
    assert cvat_server.calls("PATCH") == []


def test_update_job_invalid_stage_reports_cvats_validation(cvat_gateway: CvatClient):
    """A value CVAT rejects is a permanent error quoting CVAT's reason."""
    expected = r"PATCH /api/jobs/1: 400 Bad Request: .*stage.*not a valid choice"
    with pytest.raises(PermanentError, match=expected):
        cvat_gateway.update_job(1, {"stage": "review"})


def test_find_user_id(cvat_gateway: CvatClient):
    """A username resolves to its id."""
    assert cvat_gateway.find_user_id("bob") == 3


def test_find_user_id_of_nobody_is_permanent(cvat_gateway: CvatClient):
    """An unknown username is a permanent error naming it."""
    with pytest.raises(PermanentError, match="'nobody'"):
        cvat_gateway.find_user_id("nobody")


def test_find_user_id_needs_an_exact_match(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """A user whose name merely contains the one asked for is not taken."""
    cvat_server.add_user("bobby")
    with pytest.raises(PermanentError):
        cvat_gateway.find_user_id("bob ")


# -- authentication and organization ------------------------------------------------------------


def test_pat_is_sent_as_bearer(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """A Personal Access Token authenticates every call as ``Authorization: Bearer``."""
    cvat_gateway.get_resource(Resource.TASK, 2)
    (call,) = cvat_server.calls()
    assert (call.auth, call.user) == ("bearer", "admin")


def test_password_login_uses_a_session_with_csrf(cvat_server: CvatTestServer, make_cvat_client: MakeClient):
    """Username/password log in once; reads and PATCHes then ride the session and CSRF token."""
    with make_cvat_client(access_token=None, username="alice", password="alice-password") as gateway:
        gateway.get_resource(Resource.JOB, 1)
        gateway.update_job(1, {"state": "in progress"})
    assert [c.path for c in cvat_server.calls("POST", "/api/auth/login")] == ["/api/auth/login"]
    used = [c for c in cvat_server.calls() if c.path.startswith("/api/jobs")]
    assert [(c.auth, c.user, c.status) for c in used] == [("session", "alice", 200)] * 2
    assert cvat_server.calls("POST", "/api/auth/logout"), "close() ends the session"


def test_expired_session_logs_in_again(cvat_server: CvatTestServer, make_cvat_client: MakeClient):
    """A 401 on an expired session is answered by a new login and the call succeeds."""
    with make_cvat_client(access_token=None, username="alice", password="alice-password") as gateway:
        gateway.get_resource(Resource.JOB, 1)
        cvat_server.expire_sessions()
        assert gateway.get_resource(Resource.JOB, 1)["id"] == 1
    assert len(cvat_server.calls("POST", "/api/auth/login")) == 2


def test_wrong_password_is_permanent(make_cvat_client: MakeClient):
    """Bad credentials fail permanently, and the password is not in the message."""
    with make_cvat_client(access_token=None, username="alice", password="s3cret-wrong") as gateway:
        with pytest.raises(PermanentError, match="POST /api/auth/login: 400") as caught:
            gateway.get_resource(Resource.JOB, 1)
    assert "s3cret-wrong" not in str(caught.value)


def test_wrong_token_is_permanent_401(make_cvat_client: MakeClient):
    """An unknown token is a permanent 401 and the token is not in the message."""
    with make_cvat_client(access_token="not-a-valid-token-123") as gateway:
        with pytest.raises(PermanentError, match="401 Unauthorized") as caught:
            gateway.get_resource(Resource.TASK, 2)
    assert "not-a-valid-token-123" not in str(caught.value)


def test_organization_is_sent_as_x_organization(cvat_server: CvatTestServer, make_cvat_client: MakeClient):
    """With an organization configured every call carries ``X-Organization: <slug>``."""
    with make_cvat_client(organization="acme") as gateway:
        gateway.get_resource(Resource.TASK, 2)
        gateway.annotation_formats()
    assert [c.headers.get("x-organization") for c in cvat_server.calls()] == ["acme", "acme"]


def test_organization_context_limits_users_to_members(make_cvat_client: MakeClient):
    """In ``acme`` alice (a member) is found and bob (not a member) is not."""
    with make_cvat_client(organization="acme") as gateway:
        assert gateway.find_user_id("alice") == 2
        with pytest.raises(PermanentError, match="'bob' in organization 'acme'"):
            gateway.find_user_id("bob")


def test_a_workers_client_is_kept_across_jobs(cvat_server: CvatTestServer, cvat_settings: CvatSettings):
    """make_gateway gives each job of a thread the same client: one login and one format list for
    two jobs, close() after a job keeps the session, another thread gets a client of its own, and
    end_session() logs out."""
    settings = replace(cvat_settings, access_token=None, username="alice", password="alice-password")
    gateway = make_gateway(settings)
    try:
        for _ in range(2):  # two jobs, each closing its gateway as workers.jobs does
            job = make_gateway(settings)
            assert job is gateway
            job.annotation_formats()
            job.get_resource(Resource.JOB, 1)
            job.close()
        other: list[CvatClient] = []
        thread = threading.Thread(target=lambda: other.append(make_gateway(settings)))
        thread.start()
        thread.join()
        assert other and other[0] is not gateway
        assert len(cvat_server.calls("POST", "/api/auth/login")) == 1
        assert len(cvat_server.calls("GET", "/api/server/annotation/formats")) == 1
        assert cvat_server.calls("POST", "/api/auth/logout") == []
    finally:
        gateway.end_session()
    assert len(cvat_server.calls("POST", "/api/auth/logout")) == 1


def test_a_kept_session_ends_when_the_process_exits(cvat_server: CvatTestServer):
    """A worker process that ends normally logs out of the session its kept client used."""
    code = ("from workers.cvat_client import make_gateway\n"
            "from workers.gateway import Resource\n"
            "from core.settings import CvatSettings\n"
            f"settings = CvatSettings(url={cvat_server.url!r}, username='alice', password='alice-password')\n"
            "make_gateway(settings).get_resource(Resource.JOB, 1)\n"
            "make_gateway(settings).close()\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    assert len(cvat_server.calls("POST", "/api/auth/login")) == 1
    assert len(cvat_server.calls("POST", "/api/auth/logout")) == 1


def test_no_connection_before_the_first_call(cvat_server: CvatTestServer):
    """Making the gateway does no I/O (a worker may never need CVAT)."""
    gateway = make_gateway(CvatSettings(url=cvat_server.url, access_token=DEFAULT_TOKEN))
    gateway.close()
    assert cvat_server.calls() == []


# -- failures -------------------------------------------------------------------------------------


def test_503_is_transient_and_not_retried_by_the_client(cvat_gateway: CvatClient,
                                                        cvat_server: CvatTestServer):
    """A 503 surfaces at once as TransientError (RQ retries); the next call succeeds."""
    cvat_server.fail_next(1, 503)
    with pytest.raises(TransientError, match=r"^CVAT GET /api/tasks/2: 503 Service Unavailable"):
        cvat_gateway.get_resource(Resource.TASK, 2)
    assert len(cvat_server.calls()) == 1
    assert cvat_gateway.get_resource(Resource.TASK, 2)["id"] == 2


def test_429_is_transient(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """Rate limiting is worth a retry."""
    cvat_server.fail_next(1, 429)
    with pytest.raises(TransientError, match="429 Too Many Requests"):
        cvat_gateway.list_jobs(2)


def test_404_is_permanent_with_a_clear_message(cvat_gateway: CvatClient):
    """A missing task names the call, the status and CVAT's words."""
    with pytest.raises(PermanentError) as caught:
        cvat_gateway.get_resource(Resource.TASK, 99)
    assert str(caught.value) == "CVAT GET /api/tasks/99: 404 Not Found: No Task matches the given query."
    assert classify(caught.value) is ErrorKind.PERMANENT


def test_timeout_is_transient(cvat_server: CvatTestServer, make_cvat_client: MakeClient):
    """A server slower than the read timeout gives a TransientError saying so."""
    cvat_server.timeout_sleep = 1.0
    gateway = make_cvat_client(read_timeout=0.2)
    cvat_server.fail_next(1, "timeout")
    with pytest.raises(TransientError, match="no answer within 0.2 s"):
        gateway.get_resource(Resource.TASK, 2)


def test_dropped_connection_is_transient(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """A connection closed without an answer is a TransientError."""
    cvat_server.fail_next(1, "reset")
    with pytest.raises(TransientError, match="connection dropped"):
        cvat_gateway.get_resource(Resource.TASK, 2)


def test_dropped_connection_on_a_patch_is_transient(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """A non-idempotent call whose connection drops is transient too (urllib3 raises it directly)."""
    cvat_server.fail_next(1, "reset", path="/api/jobs/1")
    with pytest.raises(TransientError, match="PATCH /api/jobs/1: connection dropped"):
        cvat_gateway.update_job(1, {"state": "completed"})


def test_refused_connection_is_transient():
    """Nobody listening on the port is a TransientError."""
    port = free_port()  # nobody listens on it once its socket is closed
    gateway = CvatClient(CvatSettings(url=f"http://127.0.0.1:{port}", access_token=DEFAULT_TOKEN))
    with gateway, pytest.raises(TransientError, match="could not connect"):
        gateway.get_resource(Resource.TASK, 2)


def test_server_down_is_transient_until_up(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """During an outage every call is transient; afterwards calls succeed."""
    cvat_server.down()
    with pytest.raises(TransientError, match="503"):
        cvat_gateway.find_user_id("bob")
    cvat_server.up()
    assert cvat_gateway.find_user_id("bob") == 3


@pytest.mark.parametrize("fault", [503, 401, 404, "reset", "timeout"], ids=str)
def test_secrets_never_appear_in_errors(cvat_server: CvatTestServer, make_cvat_client: MakeClient,
                                        fault: int | str):
    """Neither the token nor anything chained to the error carries a secret."""
    cvat_server.timeout_sleep = 0.5
    gateway = make_cvat_client(read_timeout=0.2)
    cvat_server.fail_next(1, fault)
    with pytest.raises((TransientError, PermanentError)) as caught:
        gateway.get_resource(Resource.TASK, 2)
    exc = caught.value
    assert DEFAULT_TOKEN not in str(exc) and DEFAULT_TOKEN not in repr(exc.args)
    assert exc.__cause__ is None and exc.__suppress_context__
    assert "Bearer" not in str(exc) and "Authorization" not in str(exc)


def test_request_log_keeps_no_credentials(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """The server's request log (what tests see) holds no Authorization header."""
    cvat_gateway.get_resource(Resource.TASK, 2)
    assert all("authorization" not in c.headers and DEFAULT_TOKEN not in str(c) for c in cvat_server.calls())


# -- exports --------------------------------------------------------------------------------------


def test_export_annotations_downloads_the_served_bytes(cvat_gateway: CvatClient, cvat_server: CvatTestServer,
                                                       tmp_path: Path):
    """The file written to ``dest`` is byte for byte what the server served."""
    dest = tmp_path / "out.zip"
    outcome = cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"), dest)
    assert outcome.path == dest
    assert outcome.size == dest.stat().st_size == cvat_server.export_size
    assert sha256(dest) == cvat_server.export_digest(only_rq_id(cvat_server))
    assert 0.2 <= outcome.server_seconds < 2
    (post,) = cvat_server.calls("POST", "/api/tasks/2/dataset/export")
    assert post.query == {"format": "COCO 1.0", "save_images": "false", "location": "local"}


def test_export_dataset_includes_images(cvat_gateway: CvatClient, cvat_server: CvatTestServer,
                                        tmp_path: Path):
    """A dataset export asks for images (``save_images=true``) and downloads it."""
    outcome = cvat_gateway.export(ExportRequest(Resource.PROJECT, 1, ExportKind.DATASET, "YOLO 1.1"),
                                  tmp_path / "ds.zip")
    (post,) = cvat_server.calls("POST", "/api/projects/1/dataset/export")
    assert post.query["save_images"] == "true"
    assert "subresource=dataset" in only_rq_id(cvat_server)
    assert outcome.size == cvat_server.export_size


def test_export_of_a_job(cvat_gateway: CvatClient, cvat_server: CvatTestServer, tmp_path: Path):
    """Jobs export through ``/api/jobs/{id}/dataset/export``."""
    dest = tmp_path / "job.zip"
    cvat_gateway.export(ExportRequest(Resource.JOB, 3, ExportKind.ANNOTATIONS, "CVAT for images 1.1"), dest)
    assert sha256(dest) == cvat_server.export_digest(only_rq_id(cvat_server))
    assert cvat_server.calls("GET", "/api/jobs/3/dataset/download")


def test_export_backup(cvat_gateway: CvatClient, cvat_server: CvatTestServer, tmp_path: Path):
    """A backup uses the backup endpoints, with no format, and downloads the file."""
    dest = tmp_path / "backup.zip"
    outcome = cvat_gateway.export(ExportRequest(Resource.TASK, 3, ExportKind.BACKUP, lightweight=True), dest)
    (post,) = cvat_server.calls("POST", "/api/tasks/3/backup/export")
    assert post.query == {"location": "local", "lightweight": "true"}
    assert cvat_server.calls("GET", "/api/tasks/3/backup/download")
    assert outcome.size == dest.stat().st_size
    assert sha256(dest) == cvat_server.export_digest(only_rq_id(cvat_server))


def test_backup_of_a_job_is_refused(cvat_gateway: CvatClient, cvat_server: CvatTestServer, tmp_path: Path):
    """CVAT has no job backups: a permanent error before any request."""
    with pytest.raises(PermanentError, match="back up"):
        cvat_gateway.export(ExportRequest(Resource.JOB, 1, ExportKind.BACKUP), tmp_path / "x.zip")
    assert cvat_server.calls() == []


def test_export_to_cloud_storage_downloads_nothing(cvat_gateway: CvatClient, cvat_server: CvatTestServer):
    """CVAT writes the file to its cloud storage; the client only waits for it."""
    outcome = cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0",
                                                cloud_storage_id=1, cloud_filename="exports/t2.zip"), None)
    assert (outcome.path, outcome.size) == (None, None)
    assert [(f.cloud_storage_id, f.filename, f.size) for f in cvat_server.cloud_files] == [
        (1, "exports/t2.zip", cvat_server.export_size)]
    (post,) = cvat_server.calls("POST", "/api/tasks/2/dataset/export")
    assert post.query["location"] == "cloud_storage" and post.query["cloud_storage_id"] == "1"
    assert not [c for c in cvat_server.calls() if "download" in c.path]


def test_export_to_an_unknown_cloud_storage_is_permanent(cvat_gateway: CvatClient):
    """A cloud storage id CVAT does not know fails permanently."""
    with pytest.raises(PermanentError, match="404"):
        cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0",
                                          cloud_storage_id=42, cloud_filename="x.zip"), None)


def test_export_with_an_unknown_format_is_permanent(cvat_gateway: CvatClient, tmp_path: Path):
    """CVAT's 400 for a format it lacks is permanent and quotes CVAT."""
    with pytest.raises(PermanentError, match="400 Bad Request: .*Unknown format"):
        cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "PASCAL 9"),
                            tmp_path / "x")


def test_export_failed_on_the_server_is_transient(cvat_gateway: CvatClient, cvat_server: CvatTestServer,
                                                  tmp_path: Path):
    """A request CVAT reports ``failed`` is a TransientError carrying CVAT's message."""
    cvat_server.fail_exports(1, "Traceback...\nOSError: [Errno 28] No space left on device")
    with pytest.raises(TransientError, match="failed on the server: OSError: .*No space left"):
        cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"),
                            tmp_path / "x")


def test_export_status_check_failure_is_transient(cvat_gateway: CvatClient, cvat_server: CvatTestServer,
                                                  tmp_path: Path):
    """A 502 while polling the request surfaces as a TransientError."""
    cvat_server.fail_next(1, 502, path="/api/requests/")
    with pytest.raises(TransientError, match=r"GET /api/requests/.*: 502 Bad Gateway"):
        cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"),
                            tmp_path / "x")


def test_truncated_download_is_transient(cvat_gateway: CvatClient, cvat_server: CvatTestServer,
                                         tmp_path: Path):
    """A download cut off half-way is a TransientError, not a short file reported as done."""
    cvat_server.fail_next(1, "truncate", path="/api/tasks/2/dataset/download")
    with pytest.raises(TransientError, match="download"):
        cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"),
                            tmp_path / "x")


def test_export_polls_the_status_only_a_few_times(cvat_gateway: CvatClient, cvat_server: CvatTestServer,
                                                  tmp_path: Path):
    """A 0.2 s export costs a handful of status checks (adaptive backoff), not dozens."""
    cvat_server.export_seconds = 0.2
    cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"),
                        tmp_path / "x.zip")
    polls = cvat_server.calls("GET", "/api/requests/")
    assert 2 <= len(polls) <= 5


def test_export_polls_on_a_schedule_slow_answers_do_not_delay(make_cvat_client: MakeClient,
                                                                cvat_server: CvatTestServer, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    """Status checks are due at fixed times from the export request, so the time an answer takes is not
    added to every pause: with 0.2 s answers, checks still start one period apart, not 0.7 s."""
    import workers.cvat_client as module

    call, starts = module.CvatClient._call, []

    def slow(self: CvatClient, endpoint: Any, **params: Any) -> Any:
        if "/requests/" in endpoint.path:
            starts.append(time.monotonic())
            time.sleep(0.2)
        return call(self, endpoint, **params)

    monkeypatch.setattr(module.CvatClient, "_call", slow)
    cvat_server.export_seconds = 3.0
    period = 0.5
    gateway = make_cvat_client(status_check_period=period)
    gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"), tmp_path / "x.zip")
    steady = [b - a for a, b in zip(starts[-3:], starts[-2:], strict=False)]  # once the pause is the period
    assert steady and max(steady) < period + 0.1, steady


def test_checks_due_during_a_slow_answer_are_sent_at_once_as_one(make_cvat_client: MakeClient,
                                                                   cvat_server: CvatTestServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """With 0.25 s answers and checks due every 0.2 s or less, each check goes out as soon as the
    last is answered (not at the next slot, up to 0.15 s later), one at a time."""
    import workers.cvat_client as module

    call, spans = module.CvatClient._call, []

    def slow(self: CvatClient, endpoint: Any, **params: Any) -> Any:
        if "/requests/" not in endpoint.path:
            return call(self, endpoint, **params)
        begun = time.monotonic()
        time.sleep(0.25)
        try:
            return call(self, endpoint, **params)
        finally:
            spans.append((begun, time.monotonic()))

    monkeypatch.setattr(module.CvatClient, "_call", slow)
    cvat_server.export_seconds = 1.5
    make_cvat_client(status_check_period=0.2).export(
        ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"), tmp_path / "x.zip")
    waits = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    assert len(waits) >= 3 and min(waits) >= 0 and max(waits) < 0.06, waits


def test_export_wait_has_a_deadline(cvat_server: CvatTestServer, make_cvat_client: MakeClient,
                                    tmp_path: Path):
    """An export that never finishes gives up with a TransientError after ``export_timeout``."""
    cvat_server.export_seconds = 30
    gateway = make_cvat_client(export_timeout=0.3)
    with pytest.raises(TransientError, match="did not finish within 0.3 s"):
        gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"), tmp_path / "x")


def test_export_reports_cvats_own_time_and_the_checks(cvat_gateway: CvatClient, cvat_server: CvatTestServer,
                                                       tmp_path: Path):
    """``cvat_seconds`` is the request's created -> finished as the server dated it, within the wait
    we saw; ``status_checks`` counts the status requests the server received; ``rq_id`` names it."""
    cvat_server.export_seconds = 0.3
    outcome = cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"),
                                  tmp_path / "x.zip")
    assert outcome.cvat_seconds is not None and 0.3 <= outcome.cvat_seconds <= outcome.server_seconds
    assert outcome.status_checks == len(cvat_server.calls("GET", "/api/requests/")) >= 1
    assert outcome.rq_id == only_rq_id(cvat_server)


def test_the_next_export_of_a_kind_is_checked_when_the_last_was_ready(
        make_cvat_client: MakeClient, cvat_server: CvatTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The status checks of an export are scheduled from when the earlier exports of the same
    resource, kind and format were ready; another kind starts without history."""
    import workers.cvat_client as module

    schedules: list[tuple[float, ...]] = []
    plan = module.check_offsets

    def spy(expected: Any, period: float) -> Any:
        schedules.append(tuple(expected))
        return plan(expected, period)

    monkeypatch.setattr(module, "check_offsets", spy)
    cvat_server.export_seconds = 0.3
    gateway = make_cvat_client()
    request = ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0")
    first = gateway.export(request, tmp_path / "1.zip")
    gateway.export(request, tmp_path / "2.zip")
    gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.DATASET, "COCO 1.0"), tmp_path / "3.zip")
    assert first.cvat_seconds is not None
    assert schedules[0] == () and schedules[2] == ()
    [ready] = schedules[1]
    assert first.cvat_seconds <= ready <= first.server_seconds


def test_export_downloads_from_the_configured_host(cvat_gateway: CvatClient, cvat_server: CvatTestServer,
                                                   tmp_path: Path):
    """A ``result_url`` naming another host is fetched from the configured one (credentials stay there)."""
    cvat_server.result_base = "http://cvat.invalid:8080"
    dest = tmp_path / "x.zip"
    outcome = cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"), dest)
    assert outcome.size == cvat_server.export_size
    assert sha256(dest) == cvat_server.export_digest(only_rq_id(cvat_server))


def test_large_export_streams_in_bounded_memory(tmp_path: Path):
    """A 32 MiB download from a server in another process never holds more than a few MiB here."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.cvat_server", "--export-size-mb", "32",
                             "--export-seconds", "0.05"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = re.search(r"http://\S+", proc.stdout.readline()).group(0)  # type: ignore[union-attr]
        dest = tmp_path / "big.zip"
        with CvatClient(CvatSettings(url=url, access_token=DEFAULT_TOKEN)) as gateway:
            tracemalloc.start()
            try:
                request = ExportRequest(Resource.TASK, 2, ExportKind.DATASET, "COCO 1.0")
                outcome = gateway.export(request, dest)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
    assert outcome.size == dest.stat().st_size == 32 * 1024 * 1024
    assert peak < 4 * 1024 * 1024
    rq_id = export_rq_id("task", 2, 1, "dataset", "COCO 1.0")
    assert sha256(dest) == export_digest(rq_id, 32 * 1024 * 1024)


# -- the status-check schedule (pure) -----------------------------------------------------------


@pytest.mark.parametrize(("expected", "period", "first"), [
    # No history: 50 ms, then each pause 1.5 times longer, up to the period.
    ((), 0.5, [0.05, 0.125, 0.2375, 0.40625, 0.65938, 1.03906, 1.53906, 2.03906]),
    # One earlier export ready at 0.3 s: a check at half that, one at 0.3, then backing off again.
    ((0.3,), 0.5, [0.15, 0.3, 0.375, 0.4875, 0.65625, 0.90938]),
    # Ready at 0.40 and 0.42 s: a check at each end of that window, 50 ms apart.
    ((0.42, 0.40), 0.5, [0.2, 0.4, 0.45, 0.525, 0.6375]),
    # Ready between 0.3 and 0.5 s: a check every 50 ms across the window.
    ((0.45, 0.3, 0.5), 0.5, [0.15, 0.3, 0.35, 0.4, 0.45, 0.5, 0.575, 0.6875]),
    # Of four or more, the slowest (a stall of CVAT's) is left out: the window stays 50 ms wide.
    ((0.45, 0.4, 0.42, 0.9), 0.5, [0.2, 0.4, 0.45, 0.525, 0.6375, 0.80625, 1.05938]),
    # A spread wider than the period: a check a period across it.
    ((0.5, 2.5), 0.5, [0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]),
    # A long export: a check a period until it, then quicker ones after it.
    ((3.0,), 0.5, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.075, 3.1875]),
    # A short period bounds every pause.
    ((0.2, 1.0), 0.1, [0.1, 0.2, 0.3, 0.4, 0.5]),
], ids=["no-history", "one-export", "tight-window", "spread-window", "outlier", "wide-window", "long-export",
        "short-period"])
def test_check_offsets(expected: tuple[float, ...], period: float, first: list[float]):
    """Status checks follow the usual backoff, and tighten around when recent exports were ready."""
    assert list(itertools.islice(check_offsets(expected, period), len(first))) == pytest.approx(first, abs=1e-4)


@pytest.mark.parametrize("expected", [(), (0.06,), (0.3, 0.31, 0.33), (0.2, 0.9), (1.0, 7.0), (40.0,)],
                         ids=["none", "instant", "steady", "spread", "wide", "long"])
def test_check_offsets_never_burst_nor_stall(expected: tuple[float, ...]):
    """However recent exports went, checks are at least 50 ms apart, never more than a period plus a
    step, and the window around recent times holds at most WINDOW_CHECKS of them."""
    period = 0.5
    times = list(itertools.takewhile(lambda t: t < 60, check_offsets(expected, period)))
    gaps = [b - a for a, b in itertools.pairwise([0.0, *times])]
    assert min(gaps) >= FINE_STEP - 1e-9 and max(gaps) <= period + FINE_STEP + 1e-9
    if expected:
        inside = [t for t in times if min(expected) <= t <= max(expected)]
        assert 1 <= len(inside) <= max(WINDOW_CHECKS, math.ceil((max(expected) - min(expected)) / period) + 1)


# -- the test server speaks what cvat-sdk expects ---------------------------------------------------


def test_sdk_typed_models_accept_the_servers_answers(cvat_server: CvatTestServer):
    """cvat-sdk's own typed calls deserialize every shape the test server answers."""
    from cvat_sdk import make_client  # type: ignore[import-untyped]

    with make_client(cvat_server.url, access_token=DEFAULT_TOKEN) as client:
        api = client.api_client
        assert api.server_api.retrieve_about()[0].version == "2.73.0"
        assert api.users_api.retrieve_self()[0].username == "admin"
        assert api.users_api.list(search="ali")[0].results[0].username == "alice"
        assert api.server_api.retrieve_annotation_formats()[0].exporters[0].name == "CVAT for images 1.1"
        assert client.projects.retrieve(1).name == "webhook-demo"
        task = client.tasks.retrieve(2)
        assert (task.project_id, task.jobs.count) == (1, 2)
        assert [label.name for label in task.get_labels()] == ["car", "person"]
        assert {job.id for job in task.get_jobs()} == {1, 3}
        job = client.jobs.retrieve(1)
        job.update({"stage": "validation", "assignee": 3})
        assert (job.stage, job.assignee.username) == ("validation", "bob")
        assert [label.name for label in job.get_labels()] == ["car", "person"]


def test_sdk_export_flow_works_unpatched(cvat_server: CvatTestServer, tmp_path: Path):
    """The SDK's own export (start, wait, download) runs against the server as against CVAT."""
    from cvat_sdk import make_client  # type: ignore[import-untyped]

    with make_client(cvat_server.url, access_token=DEFAULT_TOKEN) as client:
        client.config.status_check_period = 0.05
        client.tasks.retrieve(2).export_dataset("CVAT for images 1.1", tmp_path / "sdk.zip",
                                                include_images=False)
        client.tasks.retrieve(3).download_backup(tmp_path / "backup.zip")
    assert (tmp_path / "sdk.zip").stat().st_size == cvat_server.export_size
    assert (tmp_path / "backup.zip").stat().st_size == cvat_server.export_size


def test_sdk_password_login_works_unpatched(cvat_server: CvatTestServer):
    """The SDK's own password login finds both session cookies and can PATCH with CSRF."""
    from cvat_sdk import make_client  # type: ignore[import-untyped]

    with make_client(cvat_server.url, credentials=("bob", "bob-password")) as client:
        client.jobs.retrieve(2).update({"state": "in progress"})
        client.logout()
    patch = cvat_server.calls("PATCH", "/api/jobs/2")[0]
    assert (patch.auth, patch.user, patch.status) == ("session", "bob", 200)
