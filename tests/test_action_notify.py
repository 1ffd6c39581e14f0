"""The notify action, against a real HTTP server on a loopback port and a real Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from redis import Redis

from core.errors import PermanentError, TransientError
from core.settings import WorkerSettings
from tests.conftest import free_port
from tests.fake_gateway import job_event, make_context
from workers.actions import notify, validate_params
from workers.actions.notify import host_allowed, redact_url

SECRET_PATH = "/services/T0001/B0002/s3cr3tT0k3n"
"""Slack-like: the path is the credential, and must never show up in results or errors."""


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Hook:
    """A webhook endpoint: records requests, answers with queued statuses (then 200)."""

    url: str
    requests: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append(Received(self.path, dict(self.headers.items()), json.loads(raw or b"null")))
            time.sleep(state.delay)
            status = state.statuses.pop(0) if state.statuses else 200
            try:
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/followed")  # following it would show as a request
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the timeout test)

        do_GET = do_POST  # noqa: N815 - a followed redirect arrives as a GET

    with serving(Handler) as base:
        state.url = f"{base}{SECRET_PATH}?sig=querysecret"
        yield state


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``handler`` on a loopback port, quiet, in a thread; yields its base URL."""
    handler.log_message = lambda self, format, *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


LOOPBACK = WorkerSettings(notify_allowed_hosts=("127.0.0.1",))
"""The test hook listens on loopback, which notify refuses unless the allow-list names it."""


def send(params: dict[str, Any], redis: Redis, *, settings: WorkerSettings | None = None,
         run: int = 0) -> tuple[dict[str, Any], Any]:
    ctx = make_context("notify", params, event=job_event(), redis=redis,
                       settings=settings or LOOPBACK, run=run)
    return notify.run(ctx), ctx


def assert_no_secret(text: str) -> None:
    assert "s3cr3tT0k3n" not in text and "querysecret" not in text and "T0001" not in text, text


# -- validate and helpers ----------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {"url": "https://hooks.slack.com/services/x", "text": "Job {job_id} done", "format": "slack"},
    {"url": "http://{host}/hook", "text": "hi", "timeout": 2.5, "headers": {"X-Token": "t"}},
    {"url": "https://example.com/teams", "text": "hi", "format": "teams", "timeout": 300},
], ids=["slack", "placeholder-host-and-headers", "teams-max-timeout"])
def test_valid_params(params: dict[str, Any]) -> None:
    """URLs, formats, timeouts and headers of the right shapes pass."""
    assert validate_params("notify", params) == []


@pytest.mark.parametrize(("params", "problem"), [
    ({"text": "hi"}, "url is required"),
    ({"url": "ftp://example.com/x", "text": "hi"}, "must start with http:// or https://"),
    ({"url": "https:///x", "text": "hi"}, "names no host"),
    ({"url": "https://example.com"}, "text is required"),
    ({"url": "https://example.com", "text": "hi", "format": "discord"}, "format: 'discord' is not one of"),
    ({"url": "https://example.com", "text": "hi", "timeout": 0}, "timeout must be a number of seconds"),
    ({"url": "https://example.com", "text": "hi", "timeout": "5"}, "timeout must be a number of seconds"),
    ({"url": "https://example.com", "text": "hi", "headers": {"X-N": 1}}, "headers must be a mapping"),
    ({"url": "https://example.com", "text": "hi", "body": "x"}, "unknown parameter 'body'"),
], ids=["no-url", "ftp", "no-host", "no-text", "bad-format", "zero-timeout", "string-timeout",
        "header-not-string", "typo"])
def test_invalid_params(params: dict[str, Any], problem: str) -> None:
    """Each mistake is reported in a sentence naming it."""
    problems = validate_params("notify", params)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(("url", "shown"), [
    ("https://hooks.slack.com/services/T0/B0/XYZ", "https://hooks.slack.com/services/…"),
    ("https://x.webhook.office.com/webhookb2/abc@def/IncomingWebhook/1/2", "https://x.webhook.office.com/webhookb2/…"),
    ("https://prod.logic.azure.com:443/workflows/1?sig=SECRET", "https://prod.logic.azure.com:443/workflows/…"),
    ("https://user:pw@example.com/hook", "https://example.com/hook"),
    ("http://example.com", "http://example.com"),
    ("https://example.com/" + "a" * 40, "https://example.com/" + "a" * 24 + "/…"),
], ids=["slack", "teams", "query", "userinfo", "no-path", "long-segment"])
def test_redact_url(url: str, shown: str) -> None:
    """Only scheme, host, port and a short first path segment are shown."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(("host", "allowed", "expected"), [
    ("hooks.slack.com", ("hooks.slack.com",), True),
    ("HOOKS.slack.com", ("hooks.slack.com",), True),
    ("evil.com", ("hooks.slack.com",), False),
    ("hooks.slack.com.evil.com", ("hooks.slack.com",), False),
    ("x.webhook.office.com", ("*.webhook.office.com",), True),
    ("webhook.office.com", ("*.webhook.office.com",), False),
    ("xwebhook.office.com", ("*.webhook.office.com",), False),
], ids=["exact", "case", "other", "suffix-trick", "wildcard", "wildcard-not-apex", "wildcard-boundary"])
def test_host_allowed(host: str, allowed: tuple[str, ...], expected: bool) -> None:
    """Exact names match case-insensitively; ``*.`` entries match subdomains only."""
    assert host_allowed(host, allowed) is expected


# -- sending -----------------------------------------------------------------------------------

def test_json_body_carries_the_text_and_event(hook: Hook, redis: Redis) -> None:
    """format json posts the text with the event essentials and ids, as application/json."""
    result, ctx = send({"url": hook.url, "text": "Job 1 done", "headers": {"X-Token": "abc"}}, redis)
    (request,) = hook.requests
    assert request.path == SECRET_PATH + "?sig=querysecret"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Token"] == "abc"
    body = request.body
    assert {k: body[k] for k in ("text", "event", "delivery_id", "rule_id", "project_id", "task_id",
                                 "job_id")} == {
        "text": "Job 1 done", "event": "update:job", "delivery_id": "d" * 64, "rule_id": "rule-1",
        "project_id": 1, "task_id": 2, "job_id": 1}
    assert body["object"]["id"] == 1
    port = hook.url.split(":")[2].split("/")[0]
    assert result == {"url": f"http://127.0.0.1:{port}/services/…", "status": 200, "format": "json",
                      "bytes": len(json.dumps(body).encode())}
    assert_no_secret(json.dumps(result) + json.dumps(ctx.note.steps))


def test_slack_body(hook: Hook, redis: Redis) -> None:
    """format slack posts exactly what a Slack incoming webhook takes."""
    send({"url": hook.url, "text": "Job 1 done", "format": "slack"}, redis)
    assert hook.requests[0].body == {"text": "Job 1 done"}


def test_teams_body_is_an_adaptive_card_message(hook: Hook, redis: Redis) -> None:
    """format teams posts a message with one Adaptive Card: the text, then the event's ids as facts."""
    send({"url": hook.url, "text": "Job 1 done", "format": "teams"}, redis)
    body = hook.requests[0].body
    assert body["type"] == "message"
    (attachment,) = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"]
    assert card["body"][0] == {"type": "TextBlock", "text": "Job 1 done", "wrap": True}
    assert card["body"][1]["facts"] == [{"title": "event", "value": "update:job"},
                                        {"title": "project_id", "value": "1"},
                                        {"title": "task_id", "value": "2"}, {"title": "job_id", "value": "1"}]


@pytest.mark.parametrize(("status", "error"), [
    (503, TransientError), (500, TransientError), (429, TransientError), (408, TransientError),
    (404, PermanentError), (400, PermanentError), (401, PermanentError), (302, PermanentError),
], ids=["503", "500", "429", "408", "404", "400", "401", "redirect-not-followed"])
def test_statuses_are_classified(status: int, error: type[Exception], hook: Hook, redis: Redis) -> None:
    """5xx/408/429 are retried, others fail at once; errors never show the secret part of the URL."""
    hook.statuses = [status]
    with pytest.raises(error, match=f"HTTP {status}") as caught:
        send({"url": hook.url, "text": "hi"}, redis)
    assert type(caught.value) is error
    assert len(hook.requests) == 1  # a redirect is not followed
    assert_no_secret(str(caught.value))


def test_unreachable_host_is_transient_and_quiet(redis: Redis) -> None:
    """A refused connection is retried, and its error shows no secret."""
    port = free_port()  # nobody listens on it once its socket is closed
    with pytest.raises(TransientError, match="no answer") as caught:
        send({"url": f"http://127.0.0.1:{port}{SECRET_PATH}?sig=querysecret", "text": "hi"}, redis)
    assert_no_secret(str(caught.value))
    assert caught.value.__suppress_context__  # urllib3's message, which quotes the URL, is not chained


def test_timeout_is_transient(hook: Hook, redis: Redis) -> None:
    """A server slower than the timeout is retried."""
    hook.delay = 1.0
    started = time.monotonic()
    with pytest.raises(TransientError, match="no answer"):
        send({"url": hook.url, "text": "hi", "timeout": 0.2}, redis)
    assert time.monotonic() - started < 0.9


def test_allow_list_refuses_other_hosts_before_sending(hook: Hook, redis: Redis) -> None:
    """With an allow-list, a host outside it fails permanently and nothing is sent."""
    settings = WorkerSettings(notify_allowed_hosts=("hooks.slack.com",))
    with pytest.raises(PermanentError, match="host '127.0.0.1' is not in CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS"):
        send({"url": hook.url, "text": "hi"}, redis, settings=settings)
    assert hook.requests == []


def test_allow_list_lets_listed_hosts_through(hook: Hook, redis: Redis) -> None:
    """A listed host is posted to."""
    send({"url": hook.url, "text": "hi"}, redis, settings=WorkerSettings(notify_allowed_hosts=("127.0.0.1",)))
    assert len(hook.requests) == 1


def test_a_sent_notification_is_not_sent_again(hook: Hook, redis: Redis) -> None:
    """After a 2xx, a rerun of the same call (a retry after a crash) skips; a replay (new run) sends."""
    params = {"url": hook.url, "text": "hi"}
    first, _ = send(params, redis)
    second, _ = send(params, redis)
    assert second == {"skipped": "already sent", **first}
    assert len(hook.requests) == 1
    send(params, redis, run=1)
    assert len(hook.requests) == 2


def test_a_failed_notification_is_sent_on_retry(hook: Hook, redis: Redis) -> None:
    """A 503 sets no marker, so the retry posts."""
    hook.statuses = [503]
    params = {"url": hook.url, "text": "hi"}
    with pytest.raises(TransientError):
        send(params, redis)
    result, _ = send(params, redis)
    assert result["status"] == 200 and len(hook.requests) == 2


def test_every_post_of_a_run_carries_its_idempotency_key(hook: Hook, redis: Redis) -> None:
    """A retry of one run (here after a 503; after a crash past the POST it is the same) repeats the
    key, so a receiver honouring it acts once; a replay is a new run with a new key."""
    hook.statuses = [503]
    params = {"url": hook.url, "text": "hi"}
    with pytest.raises(TransientError):
        send(params, redis)
    send(params, redis)
    send(params, redis, run=1)
    keys = [r.headers["Idempotency-Key"] for r in hook.requests]
    assert keys[0] == keys[1] != keys[2]
    assert keys[0].startswith("cvh-") and keys[2].endswith("-r1")


# -- where the POST really goes (security issue, item 2) ------------------------------------------

def _port(hook: Hook) -> int:
    return int(hook.url.split(":")[2].split("/")[0])


AMBIGUOUS = [
    # (id, URL as rendered; {port} is the hook's) -- each must be refused before anything is sent
    ("backslash-before-at", "http://hooks.slack.com\\@127.0.0.1:{port}/x"),
    ("backslash-in-path", "http://127.0.0.1:{port}\\@hooks.slack.com/x"),
    ("userinfo", "http://hooks.slack.com@127.0.0.1:{port}/x"),
    ("userinfo-with-port", "http://hooks.slack.com:443@127.0.0.1:{port}/x"),
    ("encoded-backslash-userinfo", "http://hooks.slack.com%5C@127.0.0.1:{port}/x"),
    ("tab-in-host", "http://hooks.slack.com\t@127.0.0.1:{port}/x"),
    ("newline", "http://127.0.0.1:{port}/x\r\nX-Injected: 1"),
    ("space", "http://hooks.slack.com /@127.0.0.1:{port}/x"),
    ("file-scheme", "file:///etc/passwd"),
]


@pytest.mark.parametrize("url", [u for _, u in AMBIGUOUS], ids=[i for i, _ in AMBIGUOUS])
def test_ambiguous_urls_are_refused_and_nothing_is_sent(url: str, hook: Hook, redis: Redis) -> None:
    """A URL two parsers could read differently (rendered from a payload or not) fails permanently."""
    settings = WorkerSettings(notify_allowed_hosts=("hooks.slack.com", "127.0.0.1"))
    with pytest.raises(PermanentError):
        send({"url": url.format(port=_port(hook)), "text": "hi"}, redis, settings=settings)
    assert hook.requests == []


@pytest.mark.parametrize("url", [u for _, u in AMBIGUOUS[:5]], ids=[i for i, _ in AMBIGUOUS[:5]])
def test_ambiguous_urls_fail_validation(url: str) -> None:
    """Rules with such a URL are refused when they load."""
    assert validate_params("notify", {"url": url.format(port=8000), "text": "hi"}) != []


INTERNAL = [
    # (id, host as written in the URL) -- all reach this machine or a private network
    ("loopback", "127.0.0.1"),
    ("short-loopback", "127.1"),
    ("localhost-name", "localhost"),
    ("ipv6-loopback", "[::1]"),
    ("ipv4-mapped", "[::ffff:127.0.0.1]"),
    ("unspecified", "0.0.0.0"),
]


@pytest.mark.parametrize("host", [h for _, h in INTERNAL], ids=[i for i, _ in INTERNAL])
def test_internal_addresses_are_refused_unless_listed(host: str, hook: Hook, redis: Redis) -> None:
    """Without the address (or its network) in the allow-list, non-public addresses are refused."""
    url = f"http://{host}:{_port(hook)}/x"
    for allowed in ((), ("localhost", "127.1", "*.slack.com")):
        with pytest.raises(PermanentError):
            send({"url": url, "text": "hi"}, redis, settings=WorkerSettings(notify_allowed_hosts=allowed))
    assert hook.requests == []


@pytest.mark.parametrize(("ip", "allowed", "expected"), [
    ("8.8.8.8", (), True),
    ("169.254.169.254", (), False),
    ("10.1.2.3", (), False),
    ("10.1.2.3", ("10.0.0.0/8",), True),
    ("192.168.1.1", ("10.0.0.0/8",), False),
    ("::ffff:169.254.169.254", (), False),
    ("fd00::1", (), False),
], ids=["public", "metadata", "private", "listed-network", "other-network", "mapped-metadata", "ula"])
def test_address_allowed(ip: str, allowed: tuple[str, ...], expected: bool) -> None:
    """Public addresses pass; internal ones only within a listed network."""
    import ipaddress

    assert notify.address_allowed(ipaddress.ip_address(ip), allowed) is expected


def test_name_is_resolved_once_and_that_address_used(hook: Hook, redis: Redis,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: a second lookup answering another address is never made; the POST goes to
    the checked address with the name as Host."""
    import socket

    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            lookups.append(host)
            host = "127.0.0.1" if len(lookups) == 1 else "127.0.0.2"  # nobody listens on .2
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = _port(hook)
    settings = WorkerSettings(notify_allowed_hosts=("rebind.test", "127.0.0.1"))
    result, _ = send({"url": f"http://rebind.test:{port}/x", "text": "hi"}, redis, settings=settings)
    assert result["status"] == 200 and lookups == ["rebind.test"]
    assert hook.requests[0].headers["Host"] == f"rebind.test:{port}"


# -- kept connections ---------------------------------------------------------------------------

@dataclass
class KeepAliveHook:
    """An HTTP/1.1 endpoint that keeps connections open, as real webhook hosts do: records the client
    address each POST came from (one address, one connection)."""

    url: str
    peers: list[tuple[str, int]] = field(default_factory=list)
    delay: float = 0.0
    hang_up: bool = False
    """Close each connection after its answer without saying so (a host's idle timeout)."""


@pytest.fixture
def keepalive() -> Iterator[KeepAliveHook]:
    state = KeepAliveHook(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.peers.append(self.client_address)
            time.sleep(state.delay)
            try:
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = state.hang_up

    with serving(Handler) as base:
        state.url = f"{base}/hook"
        yield state
        notify.KEPT.close()


def test_notifications_to_one_host_share_a_kept_connection(keepalive: KeepAliveHook, redis: Redis) -> None:
    for run in range(3):
        send({"url": keepalive.url, "text": "hi"}, redis, run=run)
    assert len(keepalive.peers) == 3 and len(set(keepalive.peers)) == 1, keepalive.peers


def test_a_connection_idle_too_long_is_not_used_again(keepalive: KeepAliveHook, redis: Redis,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "KEEP_ALIVE_SECONDS", 0.05)
    send({"url": keepalive.url, "text": "hi"}, redis)
    time.sleep(0.1)
    send({"url": keepalive.url, "text": "hi"}, redis, run=1)
    assert len(set(keepalive.peers)) == 2, keepalive.peers


def test_a_connection_that_failed_is_not_used_again(keepalive: KeepAliveHook, redis: Redis) -> None:
    """A timeout leaves the connection in an unknown state: the next POST opens a new one."""
    send({"url": keepalive.url, "text": "hi"}, redis)
    keepalive.delay = 0.5
    with pytest.raises(TransientError, match="no answer"):
        send({"url": keepalive.url, "text": "hi", "timeout": 0.1}, redis, run=1)
    keepalive.delay = 0.0
    send({"url": keepalive.url, "text": "hi"}, redis, run=2)
    assert len(keepalive.peers) == 3 and keepalive.peers[0] == keepalive.peers[1] != keepalive.peers[2]


def test_a_kept_connection_serves_one_name_only(keepalive: KeepAliveHook, redis: Redis) -> None:
    """Another name for the same address (``Host``, and the TLS server name for https) gets its own."""
    settings = WorkerSettings(notify_allowed_hosts=("127.0.0.1", "localhost"))
    send({"url": keepalive.url, "text": "hi"}, redis, settings=settings)
    send({"url": keepalive.url.replace("127.0.0.1", "localhost"), "text": "hi"}, redis, settings=settings, run=1)
    assert len(set(keepalive.peers)) == 2, keepalive.peers


def test_a_connection_the_host_closed_is_replaced_without_a_failure(keepalive: KeepAliveHook, hook: Hook,
                                                                    redis: Redis) -> None:
    """A host that hung up on the kept connection while it was idle (``keepalive.hang_up``), or that
    answers HTTP/1.0 and closes every connection (``hook``): each notification still goes out once."""
    keepalive.hang_up = True
    for run in range(3):
        assert send({"url": keepalive.url, "text": "hi"}, redis, run=run)[0]["status"] == 204
        time.sleep(0.05)  # the server's side of the connection is closed by now
        assert send({"url": hook.url, "text": "hi"}, redis, run=10 + run)[0]["status"] == 200
    assert len(set(keepalive.peers)) == 3 and len(hook.requests) == 3
