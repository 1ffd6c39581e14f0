"""The test CVAT server itself: CVAT's REST behaviour, fault injection, and webhook deliveries."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
import urllib3

from tests import cvat_fixtures
from tests.conftest import free_port
from tests.cvat_server import (
    DEFAULT_TOKEN,
    CvatTestServer,
    WebhookSink,
    export_digest,
    jsonb_order,
    wait_until,
)
from workers.cvat_client import CvatClient
from workers.gateway import ExportKind, ExportRequest, Resource

# The fixtures, for as long as conftest.py does not provide them to every module (harmless after).
cvat_server = cvat_fixtures.cvat_server
cvat_settings = cvat_fixtures.cvat_settings
cvat_gateway = cvat_fixtures.cvat_gateway
webhook_sink = cvat_fixtures.webhook_sink

CAPTURES = Path(__file__).resolve().parent / "payloads" / "cvat-2.73"
SECRET = "mykey"


Response = urllib3.BaseHTTPResponse


def call(server: CvatTestServer, method: str, path: str, *, body: Any = None,
         token: str | None = DEFAULT_TOKEN, headers: dict[str, str] | None = None) -> Response:
    """One raw HTTP request to the server (no SDK in between)."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    return urllib3.request(method, server.url + path, headers=all_headers, retries=False, timeout=5,
                           body=json.dumps(body).encode() if body is not None else None)


def verify(secret: str, body: bytes, header: str) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


def capture(name: str) -> dict[str, Any]:
    return json.loads(json.loads((CAPTURES / name).read_text())["body_raw"])


# -- REST behaviour ---------------------------------------------------------------------------------


def test_lists_are_paginated_like_drf(cvat_server: CvatTestServer):
    """``page``/``page_size`` give ``count``, ``next`` and ``previous`` links."""
    first = call(cvat_server, "GET", "/api/jobs?task_id=2&page_size=1").json()
    assert first["count"] == 2 and first["previous"] is None and len(first["results"]) == 1
    second = call(cvat_server, "GET", first["next"][len(cvat_server.url):]).json()
    assert second["next"] is None and second["previous"] is not None
    assert {first["results"][0]["id"], second["results"][0]["id"]} == {1, 3}
    assert call(cvat_server, "GET", "/api/jobs?task_id=2&page=9").status == 404


def test_credentials_are_required_except_for_about(cvat_server: CvatTestServer):
    """Without a token CVAT answers 401, but ``/api/server/about`` is public."""
    assert call(cvat_server, "GET", "/api/tasks/2", token=None).status == 401
    assert call(cvat_server, "GET", "/api/tasks/2", token="wrong").json() == {"detail": "Invalid token."}
    assert call(cvat_server, "GET", "/api/server/about", token=None).json()["version"] == "2.73.0"


def test_session_patch_needs_the_csrf_token(cvat_server: CvatTestServer):
    """A session cookie alone cannot PATCH: Django's CSRF check wants the X-CSRFToken header."""
    cvat_server.set_job(1, assignee_id=3)  # bob may change the job he is assigned
    login = call(cvat_server, "POST", "/api/auth/login", body={"username": "bob", "password": "bob-password"},
                 token=None)
    pairs = [c.split(";")[0].split("=", 1) for c in login.headers.getlist("Set-Cookie")]
    cookies = {name: value for name, value in pairs}
    cookie = f"sessionid={cookies['sessionid']}; csrftoken={cookies['csrftoken']}"
    bare = call(cvat_server, "PATCH", "/api/jobs/1", body={"state": "completed"}, token=None,
                headers={"Cookie": cookie})
    assert bare.status == 403
    ok = call(cvat_server, "PATCH", "/api/jobs/1", body={"state": "completed"}, token=None,
              headers={"Cookie": cookie, "X-CSRFToken": cookies["csrftoken"]})
    assert ok.status == 200 and ok.json()["state"] == "completed"


@pytest.mark.parametrize(("org", "token_user", "status"), [
    ("nowhere", "admin", 404),  # no such organization
    ("acme", "bob", 403),       # bob is not a member
    ("acme", "alice", 200),     # alice is
], ids=["unknown-org", "not-a-member", "member"])
def test_organization_context(cvat_server: CvatTestServer, org: str, token_user: str, status: int):
    """``X-Organization`` must name an organization the user belongs to."""
    cvat_server.add_token(f"token-of-{token_user}", token_user)
    answer = call(cvat_server, "GET", "/api/users", token=f"token-of-{token_user}",
                  headers={"X-Organization": org})
    assert answer.status == status


def test_job_stage_change_resets_its_state(cvat_server: CvatTestServer):
    """As in CVAT, a new stage without a state starts the job over at ``new``."""
    cvat_server.set_job(1, state="completed")
    job = call(cvat_server, "PATCH", "/api/jobs/1", body={"stage": "validation"}).json()
    assert (job["stage"], job["state"], job["status"]) == ("validation", "new", "validation")


def test_labels_patched_onto_a_project_task_are_ignored(cvat_server: CvatTestServer):
    """CVAT silently drops labels PATCHed onto a task in a project (they belong to the project)."""
    answer = call(cvat_server, "PATCH", "/api/tasks/2", body={"labels": [{"name": "bike"}]})
    assert answer.status == 200
    names = [lb["name"] for lb in call(cvat_server, "GET", "/api/labels?task_id=2").json()["results"]]
    assert names == ["car", "person"]


def test_duplicate_label_name_is_rejected(cvat_server: CvatTestServer):
    """A second label of the same name is CVAT's 400 "All label names must be unique"."""
    answer = call(cvat_server, "PATCH", "/api/projects/1", body={"labels": [{"name": "car"}]})
    assert (answer.status, answer.json()) == (400, ["All label names must be unique"])


def test_fault_injection_counts_and_filters_by_path(cvat_server: CvatTestServer):
    """``fail_next(n, status, path)`` hits only the next n matching requests; 429 has Retry-After."""
    cvat_server.fail_next(2, 429, path="/api/jobs")
    assert call(cvat_server, "GET", "/api/tasks/2").status == 200
    first = call(cvat_server, "GET", "/api/jobs/1")
    assert (first.status, first.headers["Retry-After"]) == (429, "1")
    assert call(cvat_server, "GET", "/api/jobs?task_id=2").status == 429
    assert call(cvat_server, "GET", "/api/jobs/1").status == 200
    assert [c.fault for c in cvat_server.calls()] == [None, "429", "429", None]


def test_down_answers_503_until_up(cvat_server: CvatTestServer):
    """An outage refuses everything, about included."""
    cvat_server.down()
    assert call(cvat_server, "GET", "/api/server/about").status == 503
    cvat_server.up()
    assert call(cvat_server, "GET", "/api/server/about").status == 200


def test_reset_drops_the_connection(cvat_server: CvatTestServer):
    """A ``reset`` fault closes the connection without any answer."""
    cvat_server.fail_next(1, "reset")
    with pytest.raises(urllib3.exceptions.ProtocolError):
        call(cvat_server, "GET", "/api/tasks/2")


def test_export_request_and_download_look_like_cvat(cvat_server: CvatTestServer):
    """rq_id, the finished request and ``result_url`` have CVAT 2.73's shapes; the file streams with
    Content-Length and Content-Disposition and is the deterministic content."""
    started = call(cvat_server, "POST", "/api/tasks/2/dataset/export?format=CVAT%20for%20images%201.1"
                                        "&save_images=false")
    assert started.status == 202
    rq_id = started.json()["rq_id"]
    assert rq_id == capture("completed_request_export_annotations.json")["request"]["id"]
    assert call(cvat_server, "GET", f"/api/requests/{rq_id}").json()["status"] in ("queued", "started")
    assert wait_until(lambda: cvat_server.state.requests[rq_id]["status"] == "finished")
    finished = call(cvat_server, "GET", f"/api/requests/{rq_id.replace('&', '%26')}").json()
    reference = capture("completed_request_export_annotations.json")["request"]
    assert list(finished) == list(reference)
    assert list(finished["operation"]) == list(reference["operation"])
    assert finished["result_url"] == reference["result_url"].replace("http://127.0.0.1:8080", cvat_server.url)
    download = call(cvat_server, "GET", finished["result_url"][len(cvat_server.url):])
    assert download.headers["Content-Length"] == str(cvat_server.export_size)
    disposition = download.headers["Content-Disposition"]
    assert disposition.startswith('attachment; filename="task_wh-task-1_annotations_')
    assert hashlib.sha256(download.data).hexdigest() == export_digest(rq_id, cvat_server.export_size)


# -- webhooks ---------------------------------------------------------------------------------------


def test_webhook_api_through_the_sdks_typed_models(cvat_server: CvatTestServer, webhook_sink: WebhookSink):
    """Create, list, read, ping, change and delete a webhook with cvat-sdk's own typed calls."""
    from cvat_sdk import make_client  # type: ignore[import-untyped]
    from cvat_sdk.api_client import models  # type: ignore[import-untyped]

    with make_client(cvat_server.url, access_token=DEFAULT_TOKEN) as client:
        api = client.api_client.webhooks_api
        created, _ = api.create(models.WebhookWriteRequest(
            target_url=webhook_sink.url + "/hook", type="project", project_id=1, secret=SECRET,
            events=["update:job", "create:task"], description="jobs"))
        assert (created.type.value, created.project_id, sorted(e.value for e in created.events)) == (
            "project", 1, ["create:task", "update:job"])
        assert [w.id for w in api.list(project_id=1)[0].results] == [created.id]
        delivery, _ = api.create_ping(created.id)
        assert (delivery.event, delivery.status_code) == ("ping", 200)
        assert api.retrieve(created.id)[0].last_status == 200
        changed, _ = api.partial_update(created.id, patched_webhook_write_request={"is_active": False})
        assert changed.is_active is False
        assert api.list_deliveries(created.id)[0].count == 1
        assert "update:job" in [e.key for e in api.retrieve_events(type="project")[0].events]
        api.destroy(created.id)
    assert call(cvat_server, "GET", f"/api/webhooks/{created.id}").status == 404


def test_ping_is_sent_signed_and_shaped_like_cvats(cvat_server: CvatTestServer, webhook_sink: WebhookSink):
    """A ping carries the webhook and the sender (no webhook_id), signed over the exact bytes."""
    webhook_id = cvat_server.add_webhook(webhook_sink.url + "/hook", secret=SECRET)
    answer = call(cvat_server, "POST", f"/api/webhooks/{webhook_id}/ping").json()
    (received,) = webhook_sink.received
    assert answer["status_code"] == 200 and answer["request"] == json.loads(received.body)
    assert verify(SECRET, received.body, received.headers["X-Signature-256"])
    assert received.headers["Content-Type"] == "application/json"
    reference = capture("ping.json")
    payload = json.loads(received.body)
    assert list(payload) == list(reference) and list(payload["webhook"]) == list(reference["webhook"])
    assert payload["webhook"]["events"] == reference["webhook"]["events"]


def test_job_patch_delivers_update_job_like_the_capture(cvat_server: CvatTestServer,
                                                        webhook_sink: WebhookSink, cvat_gateway: CvatClient):
    """Our client's PATCH makes CVAT send ``update:job`` with before_update/changes as in 2.73."""
    cvat_server.add_webhook(webhook_sink.url + "/hook", secret=SECRET)
    cvat_gateway.update_job(1, {"stage": "acceptance", "state": "completed"})
    assert cvat_server.webhooks.join()
    (received,) = webhook_sink.received
    payload = json.loads(received.body)
    reference = capture("update_job_completed.json")
    assert list(payload) == list(reference)
    assert list(payload["job"]) == list(reference["job"])
    assert list(payload["before_update"]) == list(reference["before_update"])
    assert payload["changes"]["state"] == reference["changes"]["state"]
    assert received.body == json.dumps(payload).encode()  # json.dumps, ASCII, default separators
    assert verify(SECRET, received.body, received.headers["X-Signature-256"])


def test_newer_cvat_mode_sends_update_without_before_update(cvat_server: CvatTestServer,
                                                           webhook_sink: WebhookSink):
    """With ``include_before_update=False`` an update carries only the new state."""
    cvat_server.add_webhook(webhook_sink.url + "/hook")
    cvat_server.webhooks.include_before_update = False
    cvat_server.user_edit("/api/jobs/1", {"state": "in progress"}, user="alice")
    assert cvat_server.webhooks.join()
    payload = json.loads(webhook_sink.received[0].body)
    assert list(payload) == ["event", "webhook_id", "job", "sender"]
    assert payload["sender"]["username"] == "alice"
    assert "X-Signature-256" not in webhook_sink.received[0].headers  # no secret, no signature


def test_redelivery_reorders_keys_and_signs_the_new_bytes(cvat_server: CvatTestServer,
                                                          webhook_sink: WebhookSink):
    """A redelivery sends equal JSON with jsonb's key order, and a signature for those bytes."""
    webhook_id = cvat_server.add_webhook(webhook_sink.url + "/hook", secret=SECRET)
    (delivery,) = cvat_server.emit("update:job", 1, before={"state": "new"})
    answer = call(cvat_server, "POST", f"/api/webhooks/{webhook_id}/deliveries/{delivery['id']}/redelivery")
    assert answer.status == 200 and cvat_server.webhooks.join()
    first, again = webhook_sink.received
    assert json.loads(first.body) == json.loads(again.body)
    assert first.body != again.body
    jsonb_keys = ["job", "event", "sender", "changes", "webhook_id", "before_update"]
    assert list(json.loads(again.body)) == jsonb_keys
    assert again.body == json.dumps(jsonb_order(json.loads(first.body))).encode()
    assert verify(SECRET, again.body, again.headers["X-Signature-256"])
    deliveries = call(cvat_server, "GET", f"/api/webhooks/{webhook_id}/deliveries").json()["results"]
    assert [d["redelivery"] for d in deliveries] == [True, False]


def test_export_completion_is_delivered(cvat_server: CvatTestServer, webhook_sink: WebhookSink,
                                        cvat_gateway: CvatClient, tmp_path: Path):
    """A finished export sends ``completed:request[export:annotations]``, webhook_id last."""
    cvat_server.add_webhook(webhook_sink.url + "/hook", secret=SECRET)
    cvat_gateway.export(ExportRequest(Resource.TASK, 2, ExportKind.ANNOTATIONS, "COCO 1.0"), tmp_path / "x")
    assert cvat_server.webhooks.join()
    payload = json.loads(webhook_sink.received[0].body)
    reference = capture("completed_request_export_annotations.json")
    assert list(payload) == list(reference) == ["event", "request", "webhook_id"]
    assert payload["event"] == "completed:request[export:annotations]"
    assert payload["request"]["status"] == "finished" and payload["request"]["result_url"]


def test_only_matching_active_webhooks_receive(cvat_server: CvatTestServer, webhook_sink: WebhookSink):
    """Inactive, unsubscribed and other projects' webhooks get nothing."""
    wanted = cvat_server.add_webhook(webhook_sink.url + "/yes", events=["update:job"])
    cvat_server.add_webhook(webhook_sink.url + "/inactive", is_active=False)
    cvat_server.add_webhook(webhook_sink.url + "/tasks-only", events=["update:task"])
    other = cvat_server.add_project("other")
    cvat_server.add_webhook(webhook_sink.url + "/other-project", project_id=other)
    deliveries = cvat_server.emit("update:job", 1)
    assert [d["webhook_id"] for d in deliveries] == [wanted]
    assert [r.path for r in webhook_sink.received] == ["/yes"]


def test_organization_webhook_receives_its_organizations_events(cvat_server: CvatTestServer,
                                                                webhook_sink: WebhookSink):
    """An organization webhook hears about tasks of that organization only."""
    cvat_server.add_webhook(webhook_sink.url + "/org", org="acme", events=["create:task"])
    acme_task = cvat_server.add_task("acme-task", labels=["x"], org="acme")
    assert len(cvat_server.emit("create:task", acme_task)) == 1
    assert cvat_server.emit("create:task", 3) == []


def test_unreachable_target_is_recorded_as_502(cvat_server: CvatTestServer):
    """A target nobody listens on gives a delivery with status 502, as CVAT records it."""
    port = free_port()  # nobody listens on it once its socket is closed
    cvat_server.add_webhook(f"http://127.0.0.1:{port}/hook")
    (delivery,) = cvat_server.emit("update:job", 1)
    assert delivery["status_code"] == 502


def test_failed_deliveries_are_retried_when_configured(cvat_server: CvatTestServer,
                                                       webhook_sink: WebhookSink):
    """With retry intervals set, 5xx answers are retried and each attempt is recorded."""
    cvat_server.webhooks.retry_intervals = (0.01, 0.01)
    cvat_server.add_webhook(webhook_sink.url + "/hook", secret=SECRET)
    webhook_sink.answer(503, 500)
    deliveries = cvat_server.emit("update:job", 1)
    assert [d["status_code"] for d in deliveries] == [503, 500, 200]
    assert len({r.body for r in webhook_sink.received}) == 1  # the same bytes each time


def test_payload_is_ascii_json(cvat_server: CvatTestServer, webhook_sink: WebhookSink):
    """Non-ASCII names travel as ``\\u`` escapes (``json.dumps`` defaults), signed as sent."""
    cvat_server.add_webhook(webhook_sink.url + "/hook", secret=SECRET)
    cvat_server.user_edit("/api/tasks/2", {"name": "tâche-été"})
    assert cvat_server.webhooks.join()
    body = webhook_sink.received[0].body
    assert b"t\\u00e2che-\\u00e9t\\u00e9" in body and body.isascii()
    assert verify(SECRET, body, webhook_sink.received[0].headers["X-Signature-256"])
    assert json.loads(body)["changes"]["name"] == {"from": "wh-task-1", "to": "tâche-été"}


def test_create_issue_event_like_the_capture(cvat_server: CvatTestServer, webhook_sink: WebhookSink):
    """``add_issue`` sends ``create:issue`` with the issue shaped as in CVAT 2.73."""
    cvat_server.add_webhook(webhook_sink.url + "/hook")
    cvat_server.add_issue(1)
    assert cvat_server.webhooks.join()
    payload = json.loads(webhook_sink.received[0].body)
    reference = capture("create_issue.json")
    assert list(payload) == list(reference)
    assert list(payload["issue"]) == list(reference["issue"])


def test_emitted_update_without_changes_is_like_the_side_effect_capture(cvat_server: CvatTestServer,
                                                                         webhook_sink: WebhookSink):
    """``emit("update:job", id)`` alone reports only a new ``updated_date``, as CVAT's side-effect saves."""
    cvat_server.add_webhook(webhook_sink.url + "/hook")
    (delivery,) = cvat_server.emit("update:job", 1)
    reference = capture("update_job_only_updated_date.json")
    assert list(delivery["request"]["before_update"]) == list(reference["before_update"]) == ["updated_date"]
    assert delivery["changed_fields"] == "updated_date"
