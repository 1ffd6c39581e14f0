"""The admin JSON API and the UI's server side: auth, filters, detail, replay, rules, stats, escaping."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from core import metrics
from core.contract import EXPORT_QUEUE, ActionCall
from core.delivery_log import INDEX_KEY, DeliveryLog
from core.queueing import queue
from receiver.admin import auth
from receiver.app import create_app
from tests.conftest import SECRET, capture, post, signed, succeed, with_settings

ADMIN = "admin-token-for-tests-8c1f0e-4b7d2a9e6f13"
"""The admin token of these tests (never the webhook secret, ``SECRET``)."""
BEARER = {"Authorization": f"Bearer {ADMIN}"}
XSS = "<script>alert('pwned')</script>"


def _tampered(cookie: str) -> str:
    """The cookie with its last character changed (to a different one, whatever it was)."""
    return cookie[:-1] + ("1" if cookie[-1] == "0" else "0")


@pytest.fixture
def admin_settings(settings):
    """The shared test settings plus an admin token."""
    return with_settings(settings, admin_token=ADMIN)


@pytest.fixture
def api(admin_settings):
    """A test client of an app with the admin API and UI enabled."""
    return create_app(admin_settings).test_client()


def deliver(client, name: str) -> str:
    """Post a captured CVAT delivery; its delivery id."""
    body, _ = capture(name)
    answer = post(client, body)
    assert answer.status_code in (200, 202), answer.json
    return answer.json["delivery_id"]


def fail_action(redis, delivery_id: str) -> str:
    """Mark the only action of a delivery as given up, as a worker would; its job id."""
    log = DeliveryLog(redis, retention_seconds=3600)
    [job_id] = log.get(delivery_id).actions
    log.action_failed(delivery_id, job_id, attempt=3, started=time.time() - 1, error_class="CvatUnavailable",
                      message="CVAT answered 502", kind="transient", next_retry_at=None)
    return job_id


def login(client, token: str = ADMIN):
    """POST the login form."""
    return client.post("/ui/login", data={"token": token, "next": "/ui/"})


def csrf_of(page: bytes) -> str:
    """The CSRF token a rendered form carries."""
    return re.search(rb'name="csrf_token" value="([^"]+)"', page)[1].decode()


# -- auth --------------------------------------------------------------------------------------------------

API_AUTH = [
    # (admin token configured, Authorization header, expected status)
    (None, None, 404),                       # never open by default: 404 saying what to set
    (None, f"Bearer {ADMIN}", 404),          # any token is useless while none is configured
    (ADMIN, None, 401),                      # missing
    (ADMIN, "Bearer wrong-token", 401),      # wrong
    (ADMIN, f"Bearer {SECRET}", 401),        # the webhook secret is not the admin token
    (ADMIN, f"Bearer {ADMIN}x", 401),        # a longer token that starts with the right one
    (ADMIN, f"Basic {ADMIN}", 401),          # right value, wrong scheme
    (ADMIN, ADMIN, 401),                     # no scheme at all
    (SECRET, f"Bearer {SECRET}", 404),       # an admin token equal to the webhook secret is refused
    (ADMIN, f"Bearer {ADMIN}", 200),         # correct
    (ADMIN, f"bearer  {ADMIN} ", 200),       # the scheme is case-insensitive, spaces tolerated
]


@pytest.mark.parametrize("configured,header,status", API_AUTH,
                         ids=["unset", "unset-with-token", "missing", "wrong", "webhook-secret", "longer",
                              "basic", "no-scheme", "admin-equals-secret", "correct", "lenient-format"])
def test_api_auth(settings, configured, header, status):
    """The API opens only to the admin token; 404 naming the variable when it is unset or unsafe."""
    client = create_app(with_settings(settings, admin_token=configured)).test_client()
    answer = client.get("/api/deliveries", headers={"Authorization": header} if header else {})
    assert answer.status_code == status
    assert answer.is_json
    if status == 404:
        assert "CVAT_HOOKS_ADMIN_TOKEN" in answer.json["error"]
    if status == 401:
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    if header:
        assert ADMIN not in answer.get_data(as_text=True)


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/"), ("GET", "/api/deliveries"), ("GET", "/api/deliveries/abcdef0123"),
    ("POST", "/api/deliveries/abcdef0123/replay"), ("GET", "/api/rules"), ("GET", "/api/stats"),
    ("GET", "/api/no-such-endpoint"),
], ids=["index", "list", "detail", "replay", "rules", "stats", "unknown"])
def test_every_api_endpoint_needs_the_token(api, method, path):
    """No endpoint under /api/ answers anything but 401 without the token."""
    assert api.open(path, method=method).status_code == 401
    assert api.open(path, method=method, headers={"Authorization": f"Bearer {SECRET}"}).status_code == 401


UI_LOGIN = [
    # (admin token configured, token typed into the form, expected status of the POST)
    (None, ADMIN, 404),          # the UI is closed while no admin token is configured
    (ADMIN, "", 401),            # missing
    (ADMIN, "wrong-token", 401),  # wrong
    (ADMIN, SECRET, 401),        # the webhook secret does not open the UI
    (ADMIN, ADMIN, 303),         # correct: redirected to the list with a session cookie
]


@pytest.mark.parametrize("configured,typed,status", UI_LOGIN,
                         ids=["unset", "missing", "wrong", "webhook-secret", "correct"])
def test_ui_login(settings, configured, typed, status):
    """The login form sets a session only for the admin token; the list then opens, else it redirects."""
    client = create_app(with_settings(settings, admin_token=configured)).test_client()
    answer = login(client, typed)
    assert answer.status_code == status
    listed = client.get("/ui/")
    if status == 404:
        assert "CVAT_HOOKS_ADMIN_TOKEN" in answer.get_data(as_text=True)
        assert listed.status_code == 404
    elif status == 303:
        assert answer.headers["Location"] == "/ui/"
        assert listed.status_code == 200
    else:
        assert "Set-Cookie" not in answer.headers
        assert listed.status_code == 302 and listed.headers["Location"].startswith("/ui/login")
    if typed:
        assert typed not in answer.get_data(as_text=True)


def test_session_cookie_is_an_hmac_httponly_strict(api):
    """The session cookie is HttpOnly, SameSite=Strict, scoped to /ui/, and never holds the token."""
    cookie = login(api).headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
    assert ADMIN not in cookie


FORGED = [
    # (cookie value, why it must not open the UI)
    (ADMIN, "the token itself"),
    (auth.new_session(SECRET), "signed with the webhook secret"),
    (auth.new_session("some-other-admin-token"), "signed with an old admin token"),
    (auth.new_session(ADMIN, now=time.time() - auth.SESSION_SECONDS - 5), "expired"),
    (_tampered(auth.new_session(ADMIN)), "tampered"),
    ("v1.1.2.3", "garbage"),
]


@pytest.mark.parametrize("cookie,why", FORGED, ids=[f[1] for f in FORGED])
def test_forged_session_cookies_redirect_to_login(api, cookie, why):
    """A session cookie that is not a fresh HMAC under the admin token leads back to the login form."""
    api.set_cookie(auth.SESSION_COOKIE, cookie, path="/ui/")
    answer = api.get("/ui/deliveries/abcdef")
    assert answer.status_code == 302, why
    assert answer.headers["Location"] == "/ui/login?next=/ui/deliveries/abcdef"


def test_fresh_session_cookie_opens_the_ui(api):
    """The counterpart of the forged cookies: a cookie made with the admin token opens the UI."""
    api.set_cookie(auth.SESSION_COOKIE, auth.new_session(ADMIN), path="/ui/")
    assert api.get("/ui/").status_code == 200


@pytest.mark.parametrize("target,expected", [
    ("/ui/deliveries/abc?x=1", "/ui/deliveries/abc?x=1"),  # a page of ours: kept
    ("https://evil.example/", "/ui/"),                    # another site: refused
    ("//evil.example/ui/", "/ui/"),                       # scheme-relative: refused
    ("/ui//evil.example", "/ui/"),                        # double slash anywhere: refused
    ("/ui/\\evil.example", "/ui/"),                       # backslash (browsers read it as /): refused
], ids=["ours", "absolute", "scheme-relative", "double-slash", "backslash"])
def test_login_never_redirects_off_site(api, target, expected):
    """After login the browser only ever goes to a /ui/ page (no open redirect)."""
    answer = api.post("/ui/login", data={"token": ADMIN, "next": target})
    assert answer.headers["Location"] == expected


def test_replay_form_needs_its_csrf_token(api, redis):
    """A replay POST without the session's CSRF token (or with another session's) is refused, 403."""
    delivery_id = deliver(api, "update_job_completed.json")
    fail_action(redis, delivery_id)
    other = create_app(api.application.extensions["cvat_hooks"].settings).test_client()
    login(other)
    foreign = csrf_of(other.get(f"/ui/deliveries/{delivery_id}").data)
    login(api)
    url = f"/ui/deliveries/{delivery_id}/replay"
    assert api.post(url).status_code == 403
    assert api.post(url, data={"csrf_token": foreign}).status_code == 403
    assert queue(EXPORT_QUEUE, redis).count == 1  # nothing queued by the refused forms
    own = csrf_of(api.get(f"/ui/deliveries/{delivery_id}").data)
    assert api.post(url, data={"csrf_token": own}).status_code == 303


def test_tokens_never_logged(api, caplog):
    """Neither the admin token nor a wrong guess appears in the log, even on failures."""
    caplog.set_level(logging.DEBUG)
    login(api, "guess-that-is-wrong")
    api.get("/api/stats", headers={"Authorization": "Bearer another-wrong-guess"})
    login(api)
    api.get("/api/stats", headers=BEARER)
    assert "refused" in caplog.text and "failed login" in caplog.text
    for value in (ADMIN, "guess-that-is-wrong", "another-wrong-guess"):
        assert value not in caplog.text


# -- deliveries ----------------------------------------------------------------------------------------------


@pytest.fixture
def mixed(api, redis):
    """Four deliveries: a completed job (queued), a ping, a no-match, and a new task; ids by name."""
    ids = {name: deliver(api, f"{name}.json")
           for name in ("update_job_completed", "ping", "update_job_only_updated_date", "create_task")}
    # The completed job was received two hours ago (scores of the index are receipt times).
    redis.zadd(INDEX_KEY, {ids["update_job_completed"]: time.time() - 7200})
    return ids


LIST_FILTERS = [
    # (query, names expected, newest first)
    ("", ["create_task", "update_job_only_updated_date", "ping", "update_job_completed"]),
    ("?event=update:*", ["update_job_only_updated_date", "update_job_completed"]),
    ("?event=ping", ["ping"]),
    ("?rule=export-finished-jobs", ["update_job_completed"]),
    ("?status=no_match", ["update_job_only_updated_date"]),
    ("?status=pending", ["create_task", "update_job_completed"]),
    ("?since=1h", ["create_task", "update_job_only_updated_date", "ping"]),
    ("?until=1h", ["update_job_completed"]),
    ("?since=3h&until=90m&event=update:job", ["update_job_completed"]),
    ("?limit=2", ["create_task", "update_job_only_updated_date"]),
]


@pytest.mark.parametrize("query,names", LIST_FILTERS, ids=[q or "all" for q, _ in LIST_FILTERS])
def test_list_filters(api, mixed, query, names):
    """The list answers summaries newest first, filtered by event, rule, status, time and limit."""
    answer = api.get(f"/api/deliveries{query}", headers=BEARER)
    assert answer.status_code == 200
    assert [d["delivery_id"] for d in answer.json["deliveries"]] == [mixed[n] for n in names]
    assert answer.json["count"] == len(names)


def test_list_since_accepts_iso(api, mixed):
    """``since`` also takes an ISO time (Z or offset)."""
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    answer = api.get(f"/api/deliveries?since={start}", headers=BEARER)
    assert mixed["update_job_completed"] not in [d["delivery_id"] for d in answer.json["deliveries"]]
    assert answer.json["count"] == 3


@pytest.mark.parametrize("query,word", [
    ("status=bogus", "status"), ("limit=0", "limit"), ("limit=many", "limit"), ("limit=100000", "limit"),
    ("since=yesterday", "since"), ("until=2h30", "until"),
], ids=["status", "limit-zero", "limit-text", "limit-huge", "since", "until"])
def test_list_rejects_bad_filters(api, query, word):
    """A filter that cannot be understood is a 400 naming it, not an empty list."""
    answer = api.get(f"/api/deliveries?{query}", headers=BEARER)
    assert answer.status_code == 400
    assert answer.json["error"].startswith(word)


def test_list_summary_shape(api, mixed):
    """Each summary says id, time, event, status, rules, actions and duplicates."""
    [summary] = api.get("/api/deliveries?rule=export-finished-jobs", headers=BEARER).json["deliveries"]
    assert summary["event"] == "update:job" and summary["status"] == "pending"
    assert summary["rules"] == ["export-finished-jobs"]
    assert list(summary["actions"].values()) == ["queued"]
    assert summary["duplicates"] == 0 and summary["received_at"].endswith("Z")


def test_detail_by_prefix(api, redis):
    """One delivery by a unique id prefix: payload, matched rule with its reasons, actions, timeline."""
    delivery_id = deliver(api, "update_job_completed.json")
    fail_action(redis, delivery_id)
    answer = api.get(f"/api/deliveries/{delivery_id[:10]}", headers=BEARER)
    assert answer.status_code == 200
    record = answer.json
    assert record["delivery_id"] == delivery_id and record["status"] == "failed"
    assert record["payload"]["job"]["state"] == "completed"
    [matched] = record["matched"]
    assert matched["rule_id"] == "export-finished-jobs"
    assert any("became 'completed'" in reason for reason in matched["reasons"])
    [action] = record["actions"]
    assert action["status"] == "failed" and action["action"] == "export"
    assert action["error"] == {"class": "CvatUnavailable", "message": "CVAT answered 502",
                               "kind": "transient", "attempt": 3}
    assert [s["step"] for s in record["timeline"]] == ["received", "failed"]


@pytest.mark.parametrize("delivery_id", ["0000000000000000", "abc", "../../etc/passwd", "<script>"],
                         ids=["unknown", "short-prefix", "path", "markup"])
def test_detail_unknown_is_404_json(api, delivery_id):
    """An unknown, too short or malformed id is a JSON 404 that does not echo markup."""
    answer = api.get(f"/api/deliveries/{delivery_id}", headers=BEARER)
    assert answer.status_code == 404 and answer.is_json
    assert "<script>" not in answer.get_data(as_text=True)


# -- replay --------------------------------------------------------------------------------------------------


def test_replay_failed_action_queues_a_new_run(api, redis):
    """Replaying a failed action queues run 1 (job id ``-r1``); a second replay without force is 409."""
    delivery_id = deliver(api, "update_job_completed.json")
    job_id = fail_action(redis, delivery_id)
    answer = api.post(f"/api/deliveries/{delivery_id}/replay", json={"force": False}, headers=BEARER)
    assert answer.status_code == 202
    assert answer.json["jobs"] == [f"{job_id}-r1"]
    assert f"{job_id}-r1" in queue(EXPORT_QUEUE, redis).job_ids
    first, rerun = (ActionCall.from_json(queue(EXPORT_QUEUE, redis).fetch_job(j).args[0])
                    for j in (job_id, f"{job_id}-r1"))
    assert rerun.event == first.event and rerun.event["object"]["id"] == first.event["job_id"]
    again = api.post(f"/api/deliveries/{delivery_id}/replay", headers=BEARER)
    assert again.status_code == 409
    assert "no failed action" in again.json["error"]
    detail = api.get(f"/api/deliveries/{delivery_id}", headers=BEARER).json
    runs = {a["job_id"]: a["status"] for a in detail["actions"]}
    assert runs == {job_id: "failed", f"{job_id}-r1": "queued"}


def test_replay_force_reruns_a_succeeded_action(api, redis):
    """A succeeded delivery is 409 without force and queues a new run with it."""
    delivery_id = deliver(api, "update_job_completed.json")
    log = DeliveryLog(redis, retention_seconds=3600)
    [job_id] = log.get(delivery_id).actions
    succeed(log, delivery_id, job_id, {"uri": "file:///x.zip"})
    url = f"/api/deliveries/{delivery_id}/replay"
    assert api.post(url, json={}, headers=BEARER).status_code == 409
    forced = api.post(url, json={"force": True}, headers=BEARER)
    assert forced.status_code == 202 and forced.json["jobs"] == [f"{job_id}-r1"]


@pytest.mark.parametrize("body", [b'{"force": "yes"}', b"[true]", b"{not json"],
                         ids=["string", "list", "broken"])
def test_replay_rejects_a_bad_body(api, redis, body):
    """A replay body that is not ``{"force": bool}`` is a 400, and queues nothing."""
    delivery_id = deliver(api, "update_job_completed.json")
    fail_action(redis, delivery_id)
    answer = api.post(f"/api/deliveries/{delivery_id}/replay", data=body, headers=BEARER,
                      content_type="application/json")
    assert answer.status_code == 400
    assert queue(EXPORT_QUEUE, redis).count == 1


def test_replay_unknown_delivery_is_404(api):
    """Replaying a delivery the log does not have is a 404."""
    assert api.post("/api/deliveries/abcdef0123456789/replay", headers=BEARER).status_code == 404


# -- rules and stats -----------------------------------------------------------------------------------------


def test_rules(api, admin_settings):
    """The loaded rules with ids, events, lines and actions, plus the file, its digest and warnings."""
    answer = api.get("/api/rules", headers=BEARER).json
    assert answer["source"] == str(admin_settings.rules_path)
    assert re.fullmatch(r"[0-9a-f]{64}", answer["digest"])
    assert answer["warnings"] == []
    by_id = {r["id"]: r for r in answer["rules"]}
    export = by_id["export-finished-jobs"]
    assert export["on"] == ["update:job"] and export["line"] > 0
    assert export["description"].startswith("Export each job")
    assert export["actions"][0]["action"] == "export"
    assert export["actions"][0]["params"]["to"] == "exports/{project_id}/{task_id}/job-{job_id}.zip"
    assert by_id["check-new-task-labels"]["actions"][0]["params"]["require"] == ["car", "person"]


def test_stats(api, redis):
    """Stats count queued jobs per queue, deliveries and action runs by outcome, and throughput."""
    deliver(api, "update_job_completed.json")
    deliver(api, "ping.json")
    deliver(api, "update_job_completed.json")  # a duplicate
    metrics.inc(redis, "cvat_hooks_action_runs_total", 2, action="export", outcome="failed")
    post(api, b'{"event": "ping"}', signed(b'{"event": "ping"}', "not-the-secret"))
    answer = api.get("/api/stats", headers=BEARER).json
    assert answer["queues"][EXPORT_QUEUE] == {"queued": 1, "running": 0, "scheduled": 0, "failed": 0}
    assert answer["deliveries"] == {"queued": 1, "ping": 1, "duplicate": 1}
    assert answer["actions"] == {"failed": 2}
    assert answer["rejected"] == {"signature_mismatch": 1}
    assert answer["throughput"] == {"last_minute": 2, "last_hour": 2}
    assert answer["workers"] == 0 and answer["failed_jobs"] == 0


# -- the UI's pages ------------------------------------------------------------------------------------------


def xss_delivery(client) -> str:
    """Deliver a signed update:job whose text fields hold markup; its delivery id."""
    body, _ = capture("update_job_completed.json")
    data = json.loads(body)
    data["job"]["task_name"] = XSS
    data["sender"]["username"] = '"><img src=x onerror=alert(1)>'
    raw = json.dumps(data).encode()
    answer = post(client, raw, signed(raw))
    assert answer.status_code == 202, answer.json
    return answer.json["delivery_id"]


def test_payload_markup_is_escaped(api):
    """Markup in payload values is shown as text on the detail page, never as HTML."""
    delivery_id = xss_delivery(api)
    login(api)
    page = api.get(f"/ui/deliveries/{delivery_id}").get_data(as_text=True)
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page
    assert XSS not in page and "<img src=x" not in page
    csp = api.get(f"/ui/deliveries/{delivery_id}").headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp


@pytest.mark.parametrize("uri,linked", [
    ("https://minio.example/exports/1/2/job-1.zip", True),
    ("http://files.example/job-1.zip", True),
    ("javascript:alert(1)", False),
    ("s3://bucket/exports/job-1.zip", False),
], ids=["https", "http", "javascript", "s3"])
def test_result_uri_link(api, redis, uri, linked):
    """A result's http(s) ``uri`` is a link; any other scheme is plain text."""
    delivery_id = deliver(api, "update_job_completed.json")
    log = DeliveryLog(redis, retention_seconds=3600)
    [job_id] = log.get(delivery_id).actions
    succeed(log, delivery_id, job_id, {"uri": uri, "size": 12})
    login(api)
    page = api.get(f"/ui/deliveries/{delivery_id}").get_data(as_text=True)
    assert uri in page
    assert (f'href="{uri}"' in page) is linked


def test_list_page_shows_statuses_and_header(api, redis):
    """The list shows each delivery with its status class and the header's throughput and failures."""
    failed = deliver(api, "update_job_completed.json")
    fail_action(redis, failed)
    deliver(api, "ping.json")
    metrics.inc(redis, "cvat_hooks_action_runs_total", 1, action="export", outcome="failed")
    login(api)
    page = api.get("/ui/").get_data(as_text=True)
    assert 'class="badge st-failed">failed' in page and 'class="badge st-ping">ping' in page
    assert re.search(r'id="fig-hour"><b>2</b>', page)
    assert re.search(r'id="fig-failed-actions" title="[^"]+"><b>1</b>', page)
    filtered = api.get("/ui/?status=ping").get_data(as_text=True)
    assert 'class="badge st-ping"' in filtered and 'class="badge st-failed"' not in filtered


def test_ui_replay_flashes_and_shows_the_new_run(api, redis):
    """The Replay button queues the run and the detail page it returns to says so, once."""
    delivery_id = deliver(api, "update_job_completed.json")
    job_id = fail_action(redis, delivery_id)
    login(api)
    token = csrf_of(api.get(f"/ui/deliveries/{delivery_id}").data)
    answer = api.post(f"/ui/deliveries/{delivery_id}/replay", data={"csrf_token": token})
    assert answer.status_code == 303 and answer.headers["Location"] == f"/ui/deliveries/{delivery_id}"
    page = api.get(answer.headers["Location"]).get_data(as_text=True)
    assert f"Replay queued 1 job(s): {job_id}-r1" in page
    assert "Replay queued" not in api.get(f"/ui/deliveries/{delivery_id}").get_data(as_text=True)
    again = api.post(f"/ui/deliveries/{delivery_id}/replay", data={"csrf_token": token})
    assert "Nothing replayed" in api.get(again.headers["Location"]).get_data(as_text=True)


# -- issue 18: search by CVAT ids, paging, requeue and bulk forms behind login and CSRF ------------------


def test_search_by_cvat_ids_and_paging(api, redis):
    """?job= / ?task= / ?project= select by the ids the event implies; ?page= walks past the first page."""
    body, _ = capture("update_job_completed.json")
    data = json.loads(body)
    for n in range(7):
        data["job"]["id"] = 2001 + n
        raw = json.dumps(data).encode()
        assert post(api, raw, signed(raw)).status_code == 202
    deliver(api, "create_task.json")
    task_id = json.loads(capture("create_task.json")[0])["task"]["id"]
    found = api.get("/api/deliveries?job=2003", headers=BEARER).json
    assert found["count"] == 1 and found["filters"]["job"] == 2003
    assert api.get(f"/api/deliveries?task={task_id}", headers=BEARER).json["count"] >= 1
    pages = [api.get(f"/api/deliveries?limit=3&page={n}", headers=BEARER).json for n in (1, 2, 3, 4)]
    assert [p["count"] for p in pages] == [3, 3, 2, 0]
    seen = [d["delivery_id"] for p in pages for d in p["deliveries"]]
    assert len(set(seen)) == 8
    for bad in ("job=abc", "task=-1", "page=0"):
        answer = api.get(f"/api/deliveries?{bad}", headers=BEARER)
        assert answer.status_code == 400 and bad.split("=")[0] in answer.json["error"]


def test_requeue_and_bulk_need_login_and_csrf(api, redis):
    """The requeue and bulk-replay forms are POSTs behind the login and the session's CSRF token."""
    delivery_id = deliver(api, "update_job_completed.json")
    fail_action(redis, delivery_id)
    for url, data in (("/ui/queues/requeue", {"job_id": "x"}), ("/ui/bulk", {"status": "failed"})):
        assert api.post(url, data=data).status_code == 302  # not logged in: to the login page
    login(api)
    for url, data in (("/ui/queues/requeue", {"job_id": "x"}), ("/ui/bulk", {"status": "failed"})):
        assert api.post(url, data=data).status_code == 403
    token = csrf_of(api.get("/ui/queues").data)
    answer = api.post("/ui/queues/requeue", data={"job_id": "cvh-nope", "csrf_token": token})
    assert answer.status_code == 303
    assert "is not among the failed jobs" in api.get(answer.headers["Location"]).get_data(as_text=True)
    confirm = api.get("/ui/bulk?status=failed").get_data(as_text=True)
    assert "The filters select <b>1</b> delivery" in confirm
    assert api.get("/ui/bulk").status_code == 400  # no filters: no bulk replay of everything
