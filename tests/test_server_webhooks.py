"""Server webhooks (``--server``: user and organization events, CVAT 2.76+, admin only) against a test
CVAT server that reports version 2.76.0, with a live receiver and a real Redis.

(How a 2.73 CVAT refuses them is in ``test_registration.py``, against the default 2.73 server.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from core.cvat_events import SERVER_EVENTS
from operations import webhook_registry as registry
from tests import live_receiver as live
from tests.cvat_fixtures import CLIENT_TIMEOUT
from tests.cvat_server import CvatTestServer

live_receiver = live.live_receiver
cli = live.cli


@pytest.fixture
def cvat_server() -> Iterator[CvatTestServer]:
    """The test CVAT server, as CVAT 2.76 (which has server webhooks)."""
    server = CvatTestServer(version="2.76.0", timeout_sleep=CLIENT_TIMEOUT + 1.0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server_webhook(cli, live_receiver) -> int:
    """This deployment's server webhook, for every server event, posting to the live receiver."""
    result = cli("register", "--server", "--url", live_receiver.url, "--all")
    assert result.exit_code == 0, result.output
    return 1


def test_register_lists_and_unregisters_a_server_webhook(cli, cvat_server, live_receiver, server_webhook,
                                                         redis):
    """register --server makes a server webhook (no project, no organization) for the server events,
    remembered as this deployment's; a new user's event reaches the receiver; unregister --server
    deletes it and forgets it."""
    webhook = cvat_server.state.webhooks[server_webhook]
    assert (webhook["type"], webhook["project_id"], webhook["org_id"]) == ("server", None, None)
    assert webhook["events"] == sorted(SERVER_EVENTS)
    assert registry.load(redis).webhooks[server_webhook].type == "server"
    user = cvat_server.add_user("dora")
    (delivery,) = cvat_server.emit("create:user", user)
    assert delivery["status_code"] == 200 and delivery["request"]["user"]["username"] == "dora"
    listed = json.loads(cli("webhooks", "list", "--json").stdout)
    assert [(w["id"], w["type"], w["where"], w["owner"]) for w in listed] == [(1, "server", "server", "this")]
    again = cli("register", "--server", "--url", live_receiver.url, "--all")
    assert "updated webhook 1 (server)" in again.output and len(cvat_server.state.webhooks) == 1
    result = cli("unregister", "--server")
    assert result.exit_code == 0 and "deleted webhook 1 (server)" in result.output
    assert cvat_server.state.webhooks == {} and registry.load(redis).webhooks == {}


def test_a_missed_server_event_is_redelivered(cli, cvat_server, live_receiver, server_webhook):
    """Receiver down while a user is created: reconcile redelivers that server event once."""
    live_receiver.stop()
    user = cvat_server.add_user("erin")
    (failed,) = cvat_server.emit("create:user", user)
    assert failed["status_code"] == 502
    live_receiver.start()
    report = json.loads(cli("reconcile", "--json").stdout)
    assert (report["webhooks"], report["redelivered_count"]) == ([1], 1)
    assert report["redelivered"][0]["event"] == "create:user"
    assert cvat_server.webhooks.join()
    again = json.loads(cli("reconcile", "--json").stdout)
    assert (again["redelivered_count"], again["errors"]) == (0, [])


def test_ping_a_server_webhook(cli, server_webhook):
    """ping --server: CVAT pings the server webhook and the receiver records it."""
    result = cli("ping", "--server")
    assert result.exit_code == 0 and "webhook 1 -> " in result.output and "OK: round trip" in result.output


def test_server_webhooks_need_an_administrator(cli, cvat_server, live_receiver, monkeypatch):
    """A non-admin's register --server is refused by CVAT (403), and the message says why."""
    cvat_server.add_token("alice-token", "alice")
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", "alice-token")
    result = cli("register", "--server", "--url", live_receiver.url, "--all")
    assert result.exit_code != 0 and "403" in result.output and "administrator" in result.output
    assert cvat_server.state.webhooks == {}


def test_rules_without_server_events_cannot_make_a_server_webhook(cli, cvat_server, live_receiver):
    """The shipped rules listen to task and job events only: register --server without --all says so."""
    result = cli("register", "--server", "--url", live_receiver.url)
    assert result.exit_code != 0 and "which a server webhook cannot send" in result.output
    assert cvat_server.state.webhooks == {}
