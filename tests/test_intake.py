"""The receiver's HTTP path with real signed CVAT deliveries and a real redis-server."""

from __future__ import annotations

import json
import logging
import time

import pytest
from redis import Redis

from core.contract import EXPORT_QUEUE, LIGHT_QUEUE
from core.delivery_log import DeliveryLog
from core.queueing import queue
from receiver.app import create_app
from receiver.settings import ConfigError, Settings
from tests.conftest import PAYLOADS, SECRET, capture, post, signed, with_settings

CAPTURES = [
    # (file, status, answer status field, rules expected to match)
    ("ping.json", 200, "ping", []),
    ("update_job_completed.json", 202, "queued", ["export-finished-jobs"]),
    ("update_job_only_updated_date.json", 200, "no_match", []),
    ("create_task.json", 202, "queued", ["check-new-task-labels"]),
    ("create_issue.json", 200, "no_match", []),
    ("completed_request_create_task.json", 200, "no_match", []),
    ("completed_request_export_annotations.json", 200, "no_match", []),
]


@pytest.mark.parametrize("name,status,outcome,rules", CAPTURES, ids=[c[0] for c in CAPTURES])
def test_real_capture_gets_the_right_answer(client, redis, name, status, outcome, rules):
    """Each real CVAT 2.73 delivery, with its own signature, gets the answer its content deserves."""
    body, headers = capture(name)
    answer = post(client, body, {"X-Signature-256": headers["X-Signature-256"],
                                 "Content-Type": headers["Content-Type"]})
    assert answer.status_code == status, answer.json
    assert answer.json["status"] == outcome
    record = DeliveryLog(redis, retention_seconds=60).get(answer.json["delivery_id"])
    assert record is not None
    assert record.rule_ids == rules


DOCS = [("docs_ping.json", 200), ("docs_create_task.json", 202), ("docs_update_task.json", 200),
        ("docs_delete_task.json", 200)]


@pytest.mark.parametrize("name,status", DOCS, ids=[d[0] for d in DOCS])
def test_documented_examples_are_accepted(client, name, status):
    """CVAT's documented example bodies (older shape, labels inline) are read too."""
    body = (PAYLOADS / name).read_bytes()
    assert post(client, body).status_code == status


def test_queued_jobs_follow_the_contract(client, redis):
    """A 202 lists the jobs, and each is on the queue of its action class with a JSON argument."""
    body, headers = capture("update_job_completed.json")
    answer = post(client, body, signed(body))
    assert answer.status_code == 202
    [job_id] = answer.json["jobs"]
    exports = queue(EXPORT_QUEUE, redis)
    assert exports.job_ids == [job_id]
    assert queue(LIGHT_QUEUE, redis).job_ids == []
    job = exports.fetch_job(job_id)
    assert job.func_name == "workers.jobs.run_action"
    arg = job.args[0]
    assert arg["rule_id"] == "export-finished-jobs" and arg["action"] == "export"
    assert arg["params"]["to"] == "exports/1/2/job-1.zip"
    assert arg["event"]["job_id"] == 1 and arg["event"]["task_id"] == 2
    assert job.retries_left == arg["retry"]["attempts"]
    json.dumps(arg)  # JSON only


def test_one_changed_byte_is_rejected(client, redis):
    """Changing a single byte of a signed body makes it a 401, and nothing is queued."""
    body, headers = capture("update_job_completed.json")
    tampered = body.replace(b'"acceptance"', b'"acceptancf"', 1)
    assert len(tampered) == len(body) and tampered != body
    answer = post(client, tampered, {"X-Signature-256": headers["X-Signature-256"]})
    assert answer.status_code == 401
    assert queue(EXPORT_QUEUE, redis).count == 0
    assert redis.zcard("cvat-hooks:deliveries") == 0


@pytest.mark.parametrize("headers", [
    {},
    {"X-Signature-256": ""},
    {"X-Signature-256": "sha1=abc"},
    {"X-Signature-256": "sha256=" + "0" * 64},
], ids=["missing", "empty", "wrong-algorithm", "wrong-digest"])
def test_bad_signatures_are_401(client, redis, headers):
    """No or wrong X-Signature-256 is a 401 and enqueues nothing."""
    body, _ = capture("create_task.json")
    assert post(client, body, headers).status_code == 401
    assert queue(LIGHT_QUEUE, redis).count == 0


def test_rotated_secrets_are_all_accepted(settings, redis):
    """With several secrets configured, a delivery signed with any of them is accepted."""
    client = create_app(with_settings(settings, secrets=("new-secret-1", SECRET))).test_client()
    body, headers = capture("create_task.json")
    assert post(client, body, {"X-Signature-256": headers["X-Signature-256"]}).status_code == 202
    other, _ = capture("ping.json")
    assert post(client, other, signed(other, "new-secret-1")).status_code == 200


@pytest.mark.parametrize("body,error", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"webhook_id": 1}', "no 'event'"),
    (b'{"event": 7}', "no 'event'"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"event": "update:job", "x": NaN}', "not valid JSON"),
    (b'{"event": "ping", "a": ' + b"[" * 200 + b"]" * 200 + b"}", "nested"),
], ids=["broken", "array", "no-event", "event-not-string", "bad-utf8", "nan", "too-deep"])
def test_unreadable_signed_bodies_are_400(client, redis, body, error):
    """A correctly signed body that is not a CVAT event is a 400 that says why."""
    answer = post(client, body)
    assert answer.status_code == 400
    assert error in answer.json["error"]
    assert redis.zcard("cvat-hooks:deliveries") == 0


def test_oversized_body_is_413(settings):
    """A body over the limit is refused with 413 before it is read or verified."""
    client = create_app(with_settings(settings, max_body=2000)).test_client()
    body = json.dumps({"event": "ping", "pad": "x" * 3000}).encode()
    answer = post(client, body)
    assert answer.status_code == 413
    assert "2000" in answer.json["error"]


def test_cvat_retry_is_a_duplicate(client, redis):
    """CVAT's automatic retry (the same bytes again) is recognised and queues nothing more."""
    body, headers = capture("update_job_completed.json")
    first = post(client, body, signed(body))
    second = post(client, body, signed(body))
    assert (first.status_code, second.status_code) == (202, 200)
    assert second.json == {"status": "duplicate", "delivery_id": first.json["delivery_id"]}
    assert queue(EXPORT_QUEUE, redis).count == 1
    record = DeliveryLog(redis, retention_seconds=60).get(first.json["delivery_id"])
    assert record.record["duplicates"] == 1
    assert [s["step"] for s in record.timeline] == ["received", "duplicate"]
    assert record.timeline[0]["message"] == "update:job: matched 1 rule(s), queued 1 job(s)"


def test_manual_redelivery_with_reordered_keys_is_a_duplicate(client, redis):
    """CVAT's manual redelivery re-sends the content with keys reordered: still the same event."""
    body, _ = capture("update_job_completed.json")
    payload = json.loads(body)

    def reorder(value):
        if isinstance(value, dict):
            return {k: reorder(value[k]) for k in reversed(list(value))}
        return value

    redelivered = json.dumps(reorder(payload)).encode()
    assert redelivered != body
    first = post(client, body)
    second = post(client, redelivered)
    assert second.status_code == 200 and second.json["status"] == "duplicate"
    assert second.json["delivery_id"] == first.json["delivery_id"]
    assert queue(EXPORT_QUEUE, redis).count == 1


def test_dedupe_key_lasts_at_least_seven_days(client, redis):
    """The memory of a delivery outlives CVAT's ~4 days of retries."""
    body, _ = capture("create_task.json")
    delivery_id = post(client, body).json["delivery_id"]
    assert redis.ttl(f"cvat-hooks:seen:{delivery_id}") >= 7 * 86400 - 5


def test_redis_down_and_journal_full_is_503(settings, redis_server):
    """When neither Redis nor the local journal can keep the event, the answer is 503 (CVAT retries)."""
    from dataclasses import replace

    from tests.conftest import free_port

    dead = replace(settings, journal_max_bytes=10,
                   workers=replace(settings.workers, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    client = create_app(dead).test_client()
    body, _ = capture("create_task.json")
    answer = post(client, body)
    assert answer.status_code == 503
    assert "retry" in answer.json["error"]
    assert client.get("/readyz").status_code == 503


def test_health_and_readiness(client):
    """/healthz answers while alive; /readyz checks Redis and rules."""
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["checks"]["redis"] == "ok"
    assert "2 rule(s)" in ready.json["checks"]["rules"]


def test_production_start_without_secret_refuses(settings):
    """A receiver with no secret and no explicit insecure flag does not start."""
    with pytest.raises(ConfigError, match="CVAT_HOOKS_SECRET"):
        create_app(with_settings(settings, secrets=()))


def test_insecure_flag_accepts_unsigned(settings, redis):
    """Only the explicit insecure development flag lets unsigned deliveries in."""
    client = create_app(with_settings(settings, secrets=(), insecure_no_signature=True)).test_client()
    body, _ = capture("create_task.json")
    assert post(client, body, {}).status_code == 202


def test_transition_from_last_seen_state_without_before_update(client, redis):
    """Without CVAT's before_update/changes, became: completed is decided from what we last saw."""
    older, _ = capture("update_job_only_updated_date.json")
    newer, _ = capture("update_job_completed.json")

    def strip(body: bytes) -> bytes:
        payload = json.loads(body)
        payload.pop("before_update"), payload.pop("changes")
        return json.dumps(payload).encode()

    first = post(client, strip(older))
    assert first.json["status"] == "no_match"
    second = post(client, strip(newer))
    assert second.status_code == 202, second.json
    record = DeliveryLog(redis, retention_seconds=60).get(second.json["delivery_id"])
    assert record.record["transitions"]["source"] == "last-seen"


def test_first_sight_without_before_update_does_not_fire(client, redis):
    """With no before_update and nothing seen before, a transition is unknown and does not fire."""
    body, _ = capture("update_job_completed.json")
    payload = json.loads(body)
    payload.pop("before_update"), payload.pop("changes")
    answer = post(client, json.dumps(payload).encode())
    assert answer.json["status"] == "no_match"
    record = DeliveryLog(redis, retention_seconds=60).get(answer.json["delivery_id"])
    assert record.record["transitions"]["source"] == "unknown"


def test_older_event_after_newer_never_fires_backwards(client, redis):
    """An update older than what was already seen is stale: no transition fires from it."""
    newer, _ = capture("update_job_completed.json")
    payload = json.loads(newer)
    payload.pop("before_update"), payload.pop("changes")
    post(client, json.dumps(payload).encode())
    stale = dict(payload, job=dict(payload["job"], state="new", updated_date="2026-11-22T17:39:00.000000Z"))
    answer = post(client, json.dumps(stale).encode())
    record = DeliveryLog(redis, retention_seconds=60).get(answer.json["delivery_id"])
    assert record.record["transitions"]["source"] == "stale"


def test_secret_never_appears_in_logs_or_records(client, redis, caplog):
    """Across good, bad and tampered deliveries, the secret is in no log line and no Redis value."""
    caplog.set_level(logging.DEBUG)
    for name, *_ in CAPTURES:
        body, headers = capture(name)
        post(client, body, {"X-Signature-256": headers["X-Signature-256"]})
        post(client, body + b" ", {"X-Signature-256": headers["X-Signature-256"]})
    post(client, b"{broken")
    assert SECRET not in caplog.text
    assert "X-Signature-256 mismatch" in caplog.text
    for key in redis.scan_iter():
        kind = redis.type(key)
        values = {b"string": lambda k: [redis.get(k)], b"hash": lambda k: list(redis.hgetall(k).values()),
                  b"list": lambda k: redis.lrange(k, 0, -1), b"zset": lambda k: redis.zrange(k, 0, -1),
                  b"set": lambda k: list(redis.smembers(k))}.get(kind, lambda k: [])(key)
        for value in values:
            assert SECRET.encode() not in (value or b""), key


def test_receipt_records_why_rules_matched(client, redis: Redis):
    """The delivery record says which rules matched and why."""
    body, _ = capture("update_job_completed.json")
    delivery_id = post(client, body).json["delivery_id"]
    record = DeliveryLog(redis, retention_seconds=60).get(delivery_id).record
    [matched] = record["matched"]
    assert any("became" in reason for reason in matched["reasons"])
    assert record["transitions"]["source"] == "payload"


def test_settings_read_secret_list_from_env():
    """CVAT_HOOKS_SECRET is a comma list, so a secret can be rotated."""
    settings = Settings.from_env({"CVAT_HOOKS_SECRET": "a-one, b-two", "CVAT_HOOKS_REDIS_URL": "redis://x"})
    assert settings.secrets == ("a-one", "b-two")
    assert "a-one" not in repr(settings)


@pytest.mark.parametrize("name,status,outcome,rules", CAPTURES, ids=[c[0] for c in CAPTURES])
def test_real_capture_over_a_real_socket(redis, live_receiver, name, status, outcome, rules):
    """The same captures over real HTTP (a loopback socket, CVAT's headers as sent), and a one-byte
    change to each is refused with 401."""
    import urllib.error
    import urllib.request

    body, headers = capture(name)
    sent = {k: v for k, v in headers.items() if k in ("X-Signature-256", "Content-Type", "User-Agent")}

    def send(data: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(live_receiver.url + "/webhooks/cvat", data=data, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    flipped = bytearray(body)
    flipped[len(body) // 2] ^= 0x01
    assert send(bytes(flipped))[0] == 401
    code, answer = send(body)
    assert (code, answer["status"]) == (status, outcome)


LOOP_RULES = """version: 1
rules:
  - id: send-to-acceptance
    on: update:job
    if: {job.state: {became: completed}}
    do:
      - {action: update_job, stage: acceptance}
  - id: export-accepted
    on: update:job
    if: {job.stage: acceptance}
    do:
      - {action: export, format: CVAT for images 1.1, to: "exports/job-{job_id}.zip"}
"""

OWN_EVENT_CASES = [
    # (id, sender of the update:job, CVAT_HOOKS_SERVICE_ACCOUNT, what the workers learned, rules fired)
    ("own-account-from-setting", "admin", "admin", None, ["export-accepted"]),
    ("own-account-learned-by-workers", "admin", None, "admin", ["export-accepted"]),
    ("another-user", "alice", "admin", None, ["send-to-acceptance", "export-accepted"]),
    ("account-unknown", "admin", None, None, ["send-to-acceptance", "export-accepted"]),
]


@pytest.mark.parametrize("sender,configured,learned,fired", [c[1:] for c in OWN_EVENT_CASES],
                         ids=[c[0] for c in OWN_EVENT_CASES])
def test_own_update_does_not_retrigger_its_rule_but_chains_to_others(settings, redis, caplog, sender,
                                                                     configured, learned, fired):
    """An update:job caused by cvat-hooks's own CVAT account does not re-fire the update_job rule but
    still starts another rule's export; the same event from another user (or an unknown account) fires both."""
    from dataclasses import replace

    from core.service_account import KEY

    settings.rules_path.write_text(LOOP_RULES)
    cvat = replace(settings.workers.cvat, service_account=configured)
    client = create_app(with_settings(settings, workers=replace(settings.workers, cvat=cvat))).test_client()
    if learned:
        redis.set(KEY, learned)
    payload = json.loads(capture("update_job_completed.json")[0])
    payload["sender"]["username"] = sender
    body = json.dumps(payload).encode()
    with caplog.at_level(logging.INFO, "receiver.dispatch"):
        answer = post(client, body, signed(body))
    assert answer.status_code == 202, answer.json
    record = DeliveryLog(redis, retention_seconds=60).get(answer.json["delivery_id"])
    assert record.rule_ids == fired
    assert queue(EXPORT_QUEUE, redis).count == 1
    assert queue(LIGHT_QUEUE, redis).count == (1 if "send-to-acceptance" in fired else 0)
    stopped_line = ("rule send-to-acceptance not matched: caused by cvat-hooks's own CVAT account (admin) "
                    "and this rule's action update_job causes update:job")
    assert (stopped_line in caplog.text) is ("send-to-acceptance" not in fired)


def test_without_any_good_rules_deliveries_are_refused_until_the_file_is_fixed(settings, redis):
    """A receiver that started on a broken rules file with no good rules kept anywhere answers 503
    (CVAT retries) rather than judging events by no rules; once the file is fixed it queues again."""
    good = settings.rules_path.read_text()
    settings.rules_path.write_text("version: 1\nrules: [{id: broken}]\n")
    client = create_app(settings).test_client()
    body, headers = capture("update_job_completed.json")
    refused = post(client, body, {"X-Signature-256": headers["X-Signature-256"]})
    assert refused.status_code == 503 and "rules" in refused.json["error"]
    assert DeliveryLog(redis, retention_seconds=60).get(refused.json["delivery_id"]) is None
    settings.rules_path.write_text(good)
    time.sleep(1.1)  # the store looks at the file at most once a second
    assert post(client, body, {"X-Signature-256": headers["X-Signature-256"]}).status_code == 202
