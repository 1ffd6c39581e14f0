"""``register``, ``unregister``, ``webhooks list`` against the test CVAT server, with real signed deliveries.

The receiver runs on a real port (``live_receiver``) so the test CVAT server's deliveries reach it;
every assertion about a secret is made by CVAT signing a delivery and the receiver accepting it.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from operations import webhook_registry as registry
from operations.cvat_webhooks import receiver_url
from operations.webhook_registry import DEPLOYMENT_KEY
from receiver.secrets_store import SecretStore, add_secret, parse_secrets
from receiver.settings import Settings
from receiver.signature import Verdict, sign
from tests import cvat_fixtures
from tests import live_receiver as live
from tests.conftest import SECRET
from tests.cvat_server import CvatTestServer
from tests.cvat_server.webhooks import ORGANIZATION_EVENTS, PROJECT_EVENTS

# Fixtures shared with test_doctor and test_reconcile.
cvat_server = cvat_fixtures.cvat_server
webhook_sink = cvat_fixtures.webhook_sink
live_receiver = live.live_receiver
cli = live.cli

RULES_EVENTS = ["create:job", "create:task", "update:job"]  # create:job: the rules watch a job transition
"""What the shipped rules.yaml listens to."""


def secrets_file(settings: Settings) -> Path:
    return settings.data_dir / "webhook-secrets"


def only_webhook(server: CvatTestServer) -> dict:
    (webhook,) = server.state.webhooks.values()
    return webhook


# -- register -----------------------------------------------------------------------------------


def test_register_twice_gives_one_webhook_with_the_rules_events(cli, cvat_server, live_receiver, settings,
                                                                redis):
    """Registering twice leaves one webhook, subscribed to exactly the rules' events, marked and
    remembered as this deployment's, whose secret the receiver (started before the secret existed)
    accepts on a real delivery."""
    first = cli("register", "--project", "1", "--url", live_receiver.url)
    again = cli("register", "--project", "1", "--url", live_receiver.url + "/")
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    webhook = only_webhook(cvat_server)
    deployment = redis.get(DEPLOYMENT_KEY).decode()
    assert (webhook["type"], webhook["project_id"], webhook["target_url"], webhook["description"]) == (
        "project", 1, live_receiver.webhook_url, f"cvat-hooks {deployment}")
    assert list(registry.load(redis).webhooks) == [webhook["id"]]
    assert webhook["events"] == RULES_EVENTS and webhook["is_active"]
    assert "created webhook" in first.output and "updated webhook" in again.output
    assert "secret: unchanged" in again.output
    assert parse_secrets(secrets_file(settings).read_text()) == (webhook["secret"],)
    assert webhook["secret"] in first.output and webhook["secret"] not in again.output
    (delivery,) = cvat_server.emit("create:task", 2)
    assert delivery["status_code"] == 202, delivery["response"]


def test_secrets_file_is_private(cli, live_receiver, settings):
    """The secrets file is written with mode 0600 and a note naming the webhook above the secret."""
    cli("register", "--project", "1", "--url", live_receiver.url)
    path = secrets_file(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert f"project 1 -> {live_receiver.webhook_url}" in path.read_text()


@pytest.mark.parametrize(("args", "expected"), [
    (["--project", "1"], sorted(PROJECT_EVENTS)),
    (["--org", "acme"], sorted(ORGANIZATION_EVENTS)),
], ids=["project", "organization"])
def test_register_all_subscribes_to_every_event_of_the_type(cli, cvat_server, live_receiver, args, expected):
    """--all subscribes to every event CVAT offers for that webhook type."""
    result = cli("register", *args, "--url", live_receiver.url, "--all")
    assert result.exit_code == 0, result.output
    assert only_webhook(cvat_server)["events"] == expected


def test_organization_webhook_delivers_the_organizations_events(cli, cvat_server, live_receiver):
    """--org creates an organization webhook in that organization; its events reach the receiver."""
    result = cli("register", "--org", "acme", "--url", live_receiver.url)
    assert result.exit_code == 0, result.output
    webhook = only_webhook(cvat_server)
    assert (webhook["type"], webhook["org_id"], webhook["project_id"]) == ("organization", 1, None)
    assert webhook["events"] == RULES_EVENTS
    task = cvat_server.add_task("acme-task", labels=["car"], org="acme")
    (delivery,) = cvat_server.emit("create:task", task)
    assert delivery["status_code"] == 202, delivery["response"]


def test_events_a_project_webhook_cannot_send_are_reported(cli, cvat_server, live_receiver, settings):
    """Rules needing an organization event still register a project webhook, with a warning."""
    notify = "do: [{action: notify, url: 'http://127.0.0.1:9/x', text: hi}]"
    settings.rules_path.write_text(f"version: 1\nrules:\n"
                                   f"  - id: new-projects\n    on: create:project\n    {notify}\n"
                                   f"  - id: jobs\n    on: update:job\n    {notify}\n")
    result = cli("register", "--project", "1", "--url", live_receiver.url)
    assert result.exit_code == 0, result.output
    assert only_webhook(cvat_server)["events"] == ["update:job"]
    assert "cannot send create:project" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "http://x"], "give one of --project ID, --org SLUG and --server"),
    (["--project", "1", "--org", "acme", "--url", "http://x"], "give one of --project ID, --org SLUG and --server"),
    (["--project", "1", "--server", "--url", "http://x"], "give one of --project ID, --org SLUG and --server"),
    (["--project", "1", "--url", "ftp://x"], "is not an http(s) URL"),
    (["--project", "99", "--url", "http://x"], "404"),
], ids=["no-scope", "two-scopes", "project-and-server", "bad-url", "unknown-project"])
def test_register_refuses_bad_requests(cli, cvat_server, args, message):
    """Bad requests exit non-zero with a one-line reason and create nothing."""
    result = cli("register", *args)
    assert result.exit_code != 0 and message in result.output
    assert cvat_server.state.webhooks == {}


def test_rotation_accepts_old_and_new_secret(cli, cvat_server, live_receiver, settings):
    """--rotate-secret: a delivery CVAT signed with the old secret before the switch (on the wire
    during it) is accepted, and so is the very next one CVAT signs with the new secret, even by a
    receiver that has just read its secrets (and would not look again for an hour)."""
    cli("register", "--project", "1", "--url", live_receiver.url)
    old = only_webhook(cvat_server)["secret"]
    store = live_receiver.app.extensions["cvat_hooks"].secrets
    store.refresh()
    store.check_every = 3600.0
    live_receiver.stop()
    (in_flight,) = cvat_server.emit("create:task", 2)  # signed with the old secret, not delivered
    assert in_flight["status_code"] == 502
    sent = cvat_server.webhooks.sent[-1]
    live_receiver.start()
    result = cli("register", "--project", "1", "--url", live_receiver.url, "--rotate-secret")
    assert result.exit_code == 0, result.output
    new = only_webhook(cvat_server)["secret"]
    assert new != old and new in result.output and "previous secret stays accepted" in result.output
    assert parse_secrets(secrets_file(settings).read_text()) == (old, new)
    late = live_receiver.app.test_client().post("/webhooks/cvat", data=sent.body, headers=sent.headers)
    assert late.status_code == 202, late.json
    task = cvat_server.add_task("after-rotation", project_id=1)
    (after,) = cvat_server.emit("create:task", task)  # at once: no wait for the receiver's re-read
    assert after["status_code"] == 202, after["response"]


def test_unknown_secret_is_still_refused_after_a_rotation(cli, cvat_server, live_receiver):
    """Re-reading the secrets file never lets a delivery signed with an unknown secret through."""
    cli("register", "--project", "1", "--url", live_receiver.url)
    cvat_server.state.webhooks[1]["secret"] = "not-a-secret-we-know"
    (delivery,) = cvat_server.emit("update:job", 1)
    assert delivery["status_code"] == 401


# -- unregister and list --------------------------------------------------------------------------


def test_unregister_removes_only_cvat_hooks_webhooks(cli, cvat_server, live_receiver, webhook_sink):
    """unregister --project deletes our webhook there and leaves a hand-made one alone."""
    cli("register", "--project", "1", "--url", live_receiver.url)
    foreign = cvat_server.add_webhook(webhook_sink.url + "/other", project_id=1)
    result = cli("unregister", "--project", "1")
    assert result.exit_code == 0 and "deleted webhook 1 (project 1)" in result.output
    assert list(cvat_server.state.webhooks) == [foreign]
    again = cli("unregister", "--project", "1")
    assert again.exit_code != 0 and "no webhook of this deployment in project 1" in again.output


def test_unregister_by_url(cli, cvat_server, live_receiver):
    """unregister --url deletes the webhook posting to that URL only."""
    cli("register", "--project", "1", "--url", live_receiver.url)
    cli("register", "--project", "1", "--url", "http://127.0.0.1:9")
    result = cli("unregister", "--project", "1", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 0, result.output
    assert [w["target_url"] for w in cvat_server.state.webhooks.values()] == [live_receiver.webhook_url]


def test_webhooks_list_shows_every_webhook_with_its_last_delivery(cli, cvat_server, live_receiver,
                                                                   webhook_sink):
    """webhooks list: ours and others, with type, events, activity and the last delivery's status."""
    cli("register", "--project", "1", "--url", live_receiver.url)
    cli("register", "--org", "acme", "--url", live_receiver.url)
    cvat_server.add_webhook(webhook_sink.url + "/other", project_id=1, is_active=False)
    cvat_server.emit("create:task", 2)
    listed = json.loads(cli("webhooks", "list", "--json").stdout)
    assert [(w["id"], w["type"], w["cvat_hooks"], w["is_active"], len(w["events"])) for w in listed] == [
        (1, "project", True, True, 3), (2, "organization", True, True, 3), (3, "project", False, False, 21)]
    assert listed[0]["last_status"] == 202 and listed[0]["last_delivery_date"]
    assert listed[1]["last_status"] is None
    text = cli("webhooks", "list").output.splitlines()
    assert text[0].startswith("*    1  project 1") and " last 202 " in text[0]
    assert "INACTIVE" in text[2] and not text[2].startswith("*")


# -- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("public", "target"), [
    ("https://hooks.example.com", "https://hooks.example.com/webhooks/cvat"),  # the usual
    ("https://hooks.example.com/", "https://hooks.example.com/webhooks/cvat"),  # trailing slash
    ("https://example.com/cvat-hooks", "https://example.com/cvat-hooks/webhooks/cvat"),  # behind a prefix
    ("http://10.0.0.5:8000/webhooks/cvat", "http://10.0.0.5:8000/webhooks/cvat"),  # already complete
    ("http://10.0.0.5:8000/webhooks/cvat/", "http://10.0.0.5:8000/webhooks/cvat"),  # complete, with slash
], ids=["plain", "slash", "prefix", "complete", "complete-slash"])
def test_receiver_url(public, target):
    """The target URL is the public URL plus /webhooks/cvat unless it already ends with it."""
    assert receiver_url(public) == target


def test_secret_store_rereads_the_file_at_most_once_a_second(tmp_path: Path):
    """A new secret is picked up after a second on the fast path, at once on a signature mismatch,
    and a secret deleted from the file is no longer accepted."""
    path, now = tmp_path / "webhook-secrets", [0.0]
    store = SecretStore([SECRET], [path], clock=lambda: now[0])
    add_secret(path, "second-secret", "test")
    assert store.current() == (SECRET,)
    now[0] = 1.5
    assert store.current() == (SECRET, "second-secret")
    add_secret(path, "third-secret", "test")
    body = b'{"event": "ping"}'
    assert store.verify(body, sign(body, "third-secret")) is Verdict.VALID
    path.write_text("# emptied\n")
    now[0] = 3.0
    assert store.verify(body, sign(body, "third-secret")) is Verdict.MISMATCH
    assert store.current() == (SECRET,)


def test_settings_read_the_default_secrets_file(tmp_path: Path):
    """Without CVAT_HOOKS_SECRET_FILE a receiver reads <data dir>/webhook-secrets (where register writes)."""
    add_secret(tmp_path / "webhook-secrets", "registered-secret", "test")
    settings = Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path), "CVAT_HOOKS_SECRET": "env-secret"})
    assert settings.secrets == ("env-secret", "registered-secret")
    assert settings.registered_secrets_file == tmp_path / "webhook-secrets"
    other = Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path),
                               "CVAT_HOOKS_SECRET_FILE": str(tmp_path / "mine")})
    assert other.registered_secrets_file == tmp_path / "mine"
    assert other.secret_files == (tmp_path / "mine", tmp_path / "webhook-secrets")
    assert other.secrets == ("registered-secret",)


# -- server webhooks on a CVAT without them (2.73) --------------------------------------------------


def test_register_server_on_cvat_2_73_says_it_has_no_server_webhooks(cli, cvat_server, live_receiver):
    """CVAT 2.73 answers 400 to the server type's event list: register --server names the version and
    the one needed, and creates nothing."""
    result = cli("register", "--server", "--url", live_receiver.url, "--all")
    assert result.exit_code != 0
    assert "this CVAT (version 2.73.0) has no server webhooks (needs 2.76 or newer)" in result.output
    (events,) = cvat_server.calls("GET", "/api/webhooks/events")
    assert (events.query, events.status) == ({"type": "server"}, 400)
    assert cvat_server.state.webhooks == {} and cvat_server.calls("POST", "/api/webhooks") == []


def test_a_refused_server_type_is_explained_too(cvat_gateway, cvat_server, redis, tmp_path):
    """Should a CVAT list server events yet refuse the type on creation (as 2.73 refuses it), the
    refusal is explained the same way."""
    from core.cvat_events import SERVER_EVENTS
    from operations.cvat_webhooks import Scope
    from operations.registration import RegistrationError, register

    class ListsServerEvents:
        """The real client, but its event list claims the server type (our boundary, not CVAT's)."""

        def __getattr__(self, name: str):
            return getattr(cvat_gateway, name)

        def webhook_events(self, webhook_type: str) -> list[str]:
            return list(SERVER_EVENTS)

    with pytest.raises(RegistrationError, match=r"version 2\.73\.0\) has no server webhooks"):
        register(ListsServerEvents(), Scope(server=True), "http://127.0.0.1:9", needed=None, redis=redis,
                 secrets_file=tmp_path / "webhook-secrets")
    (create,) = cvat_server.calls("POST", "/api/webhooks")
    assert create.status == 400 and cvat_server.state.webhooks == {}
