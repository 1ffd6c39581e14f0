"""``ping`` and ``doctor`` against the test CVAT server, a live receiver and a real Redis."""

from __future__ import annotations

import json

import pytest

from operations.doctor import status_hint
from operations.reconcile import Report, record
from tests import cvat_fixtures
from tests import live_receiver as live
from tests.cvat_server import DEFAULT_TOKEN
from workers.worker import build_worker

cvat_server = cvat_fixtures.cvat_server
webhook_sink = cvat_fixtures.webhook_sink
live_receiver = live.live_receiver
cli = live.cli


@pytest.fixture
def registered(cli, live_receiver):
    """A project webhook for project 1 pointing at the live receiver."""
    result = cli("register", "--project", "1", "--url", live_receiver.url)
    assert result.exit_code == 0, result.output
    return live_receiver


@pytest.fixture
def worker_alive(settings):
    """An RQ worker registered in Redis, as a running ``cvat-hooks worker`` is."""
    worker = build_worker(settings.workers, name="doctor-test-worker")
    worker.register_birth()
    yield worker
    worker.register_death()


def checks(result) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


# -- ping ---------------------------------------------------------------------------------------


def test_ping_reports_the_round_trip(cli, registered, redis):
    """ping: CVAT pings, the receiver records the ping, and the round trip is printed."""
    result = cli("ping", "--webhook", "1")
    assert result.exit_code == 0, result.output
    assert "webhook 1 -> " in result.output and "OK: round trip" in result.output
    again = cli("ping", "--project", "1")  # the same payload again: a duplicate, still a fresh record
    assert again.exit_code == 0 and "OK: round trip" in again.output, again.output


def test_ping_with_a_secret_the_receiver_does_not_have(cli, registered, cvat_server):
    """A webhook whose secret differs from the receiver's: ping fails, naming the 401 and the secret."""
    cvat_server.state.webhooks[1]["secret"] = "changed-in-the-cvat-ui"
    result = cli("ping")
    assert result.exit_code == 1
    assert "FAILED" in result.output and "401" in result.output and "secret" in result.output


def test_ping_of_a_target_that_is_not_this_receiver(cli, registered, cvat_server, webhook_sink):
    """CVAT got 200 from a URL that is not this receiver: ping says the record never arrived."""
    cvat_server.state.webhooks[1]["target_url"] = webhook_sink.url + "/webhooks/cvat"
    result = cli("ping", "--webhook", "1", "--timeout", "0.3")
    assert result.exit_code == 1
    assert "CVAT got 200" in result.output and "no record of the ping" in result.output


def test_ping_of_an_unreachable_receiver_hints_at_the_proxy(cli, registered):
    """A receiver CVAT cannot reach: 502, with the SMOKESCREEN_OPTS hint."""
    registered.stop()
    result = cli("ping", "--project", "1")
    assert result.exit_code == 1 and "502" in result.output and "SMOKESCREEN_OPTS" in result.output


def test_ping_of_an_inactive_webhook(cli, registered, cvat_server):
    """An inactive webhook: CVAT sends nothing, and ping says so."""
    cvat_server.state.webhooks[1]["is_active"] = False
    result = cli("ping", "--webhook", "1")
    assert result.exit_code == 1 and "inactive" in result.output


@pytest.mark.parametrize(("status", "response", "expected"), [
    (200, "{}", "delivered"),
    (401, '{"error": "X-Signature-256 mismatch"}', "secret for this webhook differs"),
    (401, '{"error": "X-Signature-256 missing"}', "no secret in CVAT"),
    (407, "", "SMOKESCREEN_OPTS"),
    (502, "Connection refused", "SMOKESCREEN_OPTS"),
    (504, "", "did not answer"),
    (404, "<html>", "/webhooks/cvat"),
    (503, "{}", "Redis"),
    (418, "teapot", "418: teapot"),
    (None, None, "no answer"),
], ids=["ok", "mismatch", "unsigned", "proxy", "unreachable", "timeout", "wrong-path", "no-redis", "other",
        "none"])
def test_status_hint(status, response, expected):
    """Each delivery status CVAT records is explained in terms of the receiver."""
    assert expected in status_hint(status, response)


# -- doctor -------------------------------------------------------------------------------------


def test_doctor_all_ok(cli, registered, redis, settings, worker_alive, cvat_server):
    """With CVAT, a registered webhook, Redis, rules, a worker and a reconcile run: every check OK,
    exit 0, and no token or secret anywhere in the report."""
    assert cli("ping").exit_code == 0
    record(redis, Report(trigger="cli", dry_run=False, since=0.0), 3600)
    result = cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    found = checks(result)
    assert {name: c["status"] for name, c in found.items()} == {
        "rules": "OK", "cvat": "OK", "token": "OK", "webhook 1 (project 1)": "OK", "secrets": "OK",
        "journal": "OK", "redis": "OK", "redis durability": "OK", "workers": "OK", "queues": "OK", "failed jobs": "OK",
        "reconcile": "OK"}
    assert "2.73.0" in found["cvat"]["reason"] and "admin" in found["token"]["reason"]
    assert found["webhook 1 (project 1)"]["details"]["recent_statuses"] == {"200": 1}
    secret = cvat_server.state.webhooks[1]["secret"]
    for text in (result.output, cli("doctor").output):
        assert DEFAULT_TOKEN not in text and secret not in text


def test_doctor_fails_when_cvat_is_down(cli, registered, cvat_server, worker_alive):
    """CVAT answering 503 to everything: the cvat check FAILs and doctor exits 1."""
    cvat_server.down()
    result = cli("doctor")
    assert result.exit_code == 1
    line = next(x for x in result.output.splitlines() if x.startswith("FAIL") and " cvat " in x)
    assert "503" in line


def test_doctor_reports_what_is_wrong_with_a_webhook(cli, registered, cvat_server, settings):
    """Failed deliveries (receiver down), events the rules need but the webhook lacks, no worker:
    each is named, with the SMOKESCREEN_OPTS hint for 502."""
    cvat_server.state.webhooks[1]["events"] = ["create:task"]
    registered.stop()
    cvat_server.emit("create:task", 2)
    found = checks(cli("doctor", "--json"))
    webhook = found["webhook 1 (project 1)"]
    assert webhook["status"] == "FAIL"
    assert "502x1" in webhook["reason"] and "SMOKESCREEN_OPTS" in webhook["reason"]
    assert webhook["details"]["missing_events"] == ["create:job", "update:job"]
    assert found["workers"]["status"] == "FAIL"
    assert found["reconcile"]["status"] == "WARN"


def test_doctor_without_cvat_configured(cli, monkeypatch):
    """No CVAT_URL: a FAIL saying what to set, and the local checks still run."""
    monkeypatch.delenv("CVAT_URL")
    result = cli("doctor", "--json")
    found = checks(result)
    assert result.exit_code == 1
    assert found["cvat"]["status"] == "FAIL" and "CVAT_URL" in found["cvat"]["reason"]
    assert found["redis"]["status"] == "OK" and found["rules"]["status"] == "OK"


def test_doctor_checks_only_this_deployments_webhooks(cli, registered, cvat_server, webhook_sink):
    """Another deployment's webhook and a not-yet-adopted cvat-hooks one get no webhook check: they are
    named (with the register command that adopts the latter), and a remembered webhook CVAT no longer
    lists is reported."""
    other = cvat_server.add_webhook(webhook_sink.url + "/webhooks/cvat", project_id=1)
    cvat_server.state.webhooks[other]["description"] = "cvat-hooks 0123456789ab"
    legacy = cvat_server.add_webhook("http://127.0.0.1:9/webhooks/cvat", project_id=1)
    cvat_server.state.webhooks[legacy]["description"] = "cvat-hooks"
    found = checks(cli("doctor", "--json"))
    assert [name for name in found if name.startswith("webhook ")] == ["webhook 1 (project 1)"]
    assert found["unadopted webhooks"]["status"] == "WARN"
    assert (f"{legacy} (project 1)" in found["unadopted webhooks"]["reason"]
            and "cvat-hooks register --project 1 --url http://127.0.0.1:9/webhooks/cvat"
            in found["unadopted webhooks"]["reason"])
    assert found["other deployments"]["status"] == "OK" and "cvat-hooks 0123456789ab" in \
        found["other deployments"]["reason"]
    del cvat_server.state.webhooks[1]
    again = checks(cli("doctor", "--json"))
    assert again["remembered webhooks"]["details"]["webhook_ids"] == [1]
    assert again["webhooks"]["status"] == "WARN" and "no webhook of this deployment" in again["webhooks"]["reason"]


def test_doctor_reports_the_receivers_journal(cli, settings, monkeypatch):
    """Deliveries waiting in this machine's journal for Redis, then a damaged entry the drain set
    aside: each is a WARN saying what it is and where (the journal is the receiver's own files)."""
    from receiver.journal import QUARANTINE, Journal

    monkeypatch.delenv("CVAT_URL")
    journal = Journal(settings.data_dir / "journal")
    journal.append(b'{"event": "ping"}', 1.0)
    found = checks(cli("doctor", "--json"))["journal"]
    assert found["status"] == "WARN" and "wait in" in found["reason"] and found["details"]["bytes"] > 0
    with journal.current.open("ab") as fh:
        fh.write(b"not an entry\n")
    assert journal.drain(lambda body, at: None) == 1
    found = checks(cli("doctor", "--json"))["journal"]
    assert found["status"] == "WARN" and found["details"]["damaged"] == 1
    assert str(journal.directory / QUARANTINE) in found["reason"]
    (journal.directory / QUARANTINE).unlink()
    assert checks(cli("doctor", "--json"))["journal"]["status"] == "OK"
