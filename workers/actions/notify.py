"""``notify``: POST a message (plain JSON, Slack or Microsoft Teams) to a URL.

Parameters::

    url: https://hooks.slack.com/services/...   # http or https
    text: "Job {job_id} of task {task_id} is {job.state}"   # placeholders rendered by the receiver
    format: json | slack | teams                # default json
    timeout: 5                                  # seconds; default CVAT_HOOKS_NOTIFY_TIMEOUT
    headers: {Authorization: "Bearer ${API_TOKEN}"}   # optional extra request headers

``url`` and ``headers`` may reference the worker's environment as ``${NAME}`` (``core.rule_secrets``):
the credential then never leaves the worker's memory (not the RQ job, the delivery record, Redis).

Bodies:

- ``json``: ``{"text", "event", "delivery_id", "rule_id", "resource", "resource_id", "updated_date",
  "webhook_id", "project_id", "task_id", "job_id", "org_id", "object"}``: the text and the event
  essentials, for a receiver of our own;
- ``slack``: ``{"text": ...}``, what a Slack incoming webhook takes;
- ``teams``: a message with one Adaptive Card (the text and a fact set of the event's ids), the
  shape accepted both by Teams Workflows webhooks and the older Office 365 connector webhooks
  (https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/connectors-using).

A 2xx answer is success; the rest is classified as everywhere (``core.errors.classify``: 5xx, 408
and 429 are retried, other statuses fail at once), connection errors and timeouts are retried.
Redirects are not followed: a redirect could lead to a host the allow-list would have refused.

Where the POST goes is decided once, at run time, on the rendered URL (a value rendered into it
from the payload included), and the request is built from that decision (security issue, item 2):

- the URL is parsed once, with urllib3's own parser (the sending client's), and refused if it holds
  a backslash, a control character or a space, userinfo (``user@``), a scheme other than http(s),
  or no host: a URL two parsers could read differently never gets as far as a host check;
- ``CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS``, when set, must list that host (``*.example.com`` allows any
  subdomain of example.com; an IP address or a network such as ``10.0.0.0/8`` allows those);
- the host is resolved once and the address checked: a loopback, private, link-local (cloud
  metadata), multicast or otherwise non-public address is refused unless the allow-list names it
  (or a network holding it), so a rule cannot make the worker, which sits inside the network, POST
  to an internal address;
- the connection goes to that very address, with the name as ``Host`` header and TLS server name
  (certificate checked against the name), so a second DNS answer cannot swap the address.

A worker keeps its connection to a host for the next notification to the same name and address
(:class:`KeptConnections`, idle for :data:`KEEP_ALIVE_SECONDS` at most). A host that closes a kept
connection just as it is used fails that attempt, which is retried like any connection error.

Webhook URLs are secrets (a Slack URL is its own credential), so results, notes and errors only
ever show ``scheme://host/first-segment/…``, never the rest of the path or the query.

Idempotency: after a 2xx, a Redis marker per (delivery, rule, action index, run) is set, so a retry
of the job after a crash past that point does not post twice. The window left is a crash or a lost
answer between the server acting and the marker being written; that is retried, as is any
notification whose answer never came (a duplicate message beats a lost one). Every POST of one run
carries the same ``Idempotency-Key`` (the job id; a forced replay is a new run with a new key), so a
receiver that honours it acts once even then.

Result: ``{"url": <redacted>, "status", "format", "bytes"}``.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from core.errors import ErrorKind, PermanentError, TransientError, classify
from core.rule_secrets import forbidden, is_reference, references, unseal
from workers.actions._params import call_key, has_placeholder, text, unknown_params
from workers.context import ActionContext

if TYPE_CHECKING:
    import urllib3

PARAMS = ("url", "text", "format", "timeout", "headers")
IDEMPOTENCY_HEADER = "Idempotency-Key"
FORMATS = ("json", "slack", "teams")
MAX_TIMEOUT = 300
"""Longest timeout a rule may ask for, in seconds (a notification is a light job)."""
MARKER_TTL = 30 * 86400
"""Seconds a sent-marker is kept (as long as delivery records)."""
_SEGMENT_CHARS = 24
"""Characters of the first path segment kept in a redacted URL."""
_CONTEXT_KEYS = ("event", "resource", "resource_id", "updated_date", "webhook_id",
                 "project_id", "task_id", "job_id", "org_id", "object")


def redact_url(url: str) -> str:
    """``scheme://host[:port]/first-segment/…``: enough to tell webhooks apart, never their secret."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable url>"
    segments = [s for s in parts.path.split("/") if s]
    shown = f"/{segments[0][:_SEGMENT_CHARS]}" if segments else ""
    hidden = len(segments) > 1 or parts.query or (segments and len(segments[0]) > _SEGMENT_CHARS)
    more = "/…" if hidden else ""
    return f"{parts.scheme}://{host}{port}{shown}{more}"


def public_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters as they may be shown (admin API, CLI): the URL cut down by :func:`redact_url`,
    header values masked (an ``Authorization`` header is as secret as the URL)."""
    shown = dict(params)
    if isinstance(shown.get("url"), str):
        url = shown["url"]
        shown["url"] = url if is_reference(url) else redact_url(url)
    if isinstance(shown.get("headers"), Mapping):
        shown["headers"] = {name: "***" for name in shown["headers"]}
    return shown


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """An allow-list entry as an address or network (``10.0.0.0/8``, ``127.0.0.1``), else ``None``."""
    try:
        return ipaddress.ip_network(entry.strip().strip("[]"), strict=False)
    except ValueError:
        return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A host that is an IP literal (IPv4-mapped IPv6 as its IPv4 address), else ``None``."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` is in the allow-list (exact, case-insensitive; ``*.x.com`` for subdomains;
    an IP literal also when a listed network holds it)."""
    host = host.lower().rstrip(".")
    ip = _address(host)
    for entry in allowed:
        entry = entry.lower().strip().rstrip(".")
        network = _network(entry)
        if network is not None:
            if ip is not None and ip.version == network.version and ip in network:
                return True
        elif entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allowed: tuple[str, ...]) -> bool:
    """Whether the worker may connect to ``ip``: a public address, or one the allow-list names (as
    an address or within a network); loopback, private, link-local and the like are refused."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return True
    for entry in allowed:
        network = _network(entry)
        if network is not None and ip.version == network.version and ip in network:
            return True
    return False


@dataclass(frozen=True)
class Target:
    """Where a notification goes, as the one parser read it; the request is built from this alone."""

    scheme: str
    host: str
    """Lower-case name or IP literal (IPv6 without brackets)."""
    port: int
    request_uri: str
    """Path and query, as sent on the request line."""

    @property
    def host_header(self) -> str:
        """The ``Host`` header: the name, with the port when it is not the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_target(url: str) -> Target:
    """Parse a rendered URL with urllib3's parser (the sender's), refusing anything ambiguous.

    Raises ``ValueError`` with a message that never quotes the URL (it is a secret).
    """
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    if "\\" in url:
        raise ValueError("url holds a backslash (parsers disagree on where its host ends)")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("url holds a space or a control character")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise ValueError("url must start with http:// or https://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in authority:
        raise ValueError("url must not hold userinfo (user@host): put credentials in headers")
    if not authority.isascii():
        raise ValueError("url host must be ASCII (IDNA-encode it)")
    try:
        parsed = parse_url(url)
    except LocationParseError:
        raise ValueError("url cannot be parsed") from None
    if parsed.auth or not parsed.host or (parsed.scheme or "").lower() not in ("http", "https"):
        raise ValueError("url names no host")
    scheme = parsed.scheme.lower()  # type: ignore[union-attr]
    port = parsed.port or (443 if scheme == "https" else 80)
    return Target(scheme, parsed.host.lower().strip("[]").rstrip("."), port, parsed.request_uri)


def validate(params: Mapping[str, Any]) -> list[str]:
    """URL scheme, text, format, timeout and header types (the host allow-list is checked at run time)."""
    problems = unknown_params(params, PARAMS)
    url = params.get("url")
    problems += _reference_problems(params)
    if isinstance(url, str) and url.startswith("${"):
        pass  # the worker's environment supplies it: checked when it is resolved, at run time
    elif not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        problems.append("url is required and must start with http:// or https://")
    elif not has_placeholder(url):
        try:
            parse_target(url)
        except ValueError as exc:
            problems.append(f"url {redact_url(url)!r}: {exc}")
    elif "\\" in url or "@" in url.split("/")[2]:
        problems.append(f"url {redact_url(url)!r} holds a backslash or userinfo")
    if not isinstance(params.get("text"), str) or not params["text"].strip():
        problems.append("text is required (the message; placeholders such as {job_id} are rendered)")
    if params.get("format", "json") not in FORMATS:
        problems.append(f"format: {params['format']!r} is not one of {', '.join(FORMATS)}")
    timeout = params.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not 0 < timeout <= MAX_TIMEOUT):
        problems.append(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT}], not {timeout!r}")
    headers = params.get("headers")
    if headers is not None and (not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
        problems.append("headers must be a mapping of header names to strings")
    return problems


def _reference_problems(params: Mapping[str, Any]) -> list[str]:
    """``${NAME}`` references the rules may not make (the service's own credentials)."""
    templates = [params.get("url")]
    if isinstance(params.get("headers"), Mapping):
        templates += list(params["headers"].values())
    return [why for template in templates if isinstance(template, str)
            for name in references(template) if (why := forbidden(name)) is not None]


def unsealed(params: Mapping[str, Any], lookup: Any) -> dict[str, Any]:
    """``params`` with the sealed URL and header values resolved (``core.rule_secrets.unseal``)."""
    resolved = dict(params)
    if isinstance(params.get("url"), str):
        resolved["url"] = unseal(params["url"], lookup)
    if isinstance(params.get("headers"), Mapping):
        resolved["headers"] = {k: unseal(v, lookup) if isinstance(v, str) else v
                               for k, v in params["headers"].items()}
    return resolved


def body(fmt: str, message: str, ctx: ActionContext) -> dict[str, Any]:
    """The JSON body for a format (a pure function of the text and the event essentials)."""
    event = ctx.event
    if fmt == "slack":
        return {"text": message}
    if fmt == "teams":
        facts = [{"title": name, "value": str(event[name])}
                 for name in ("event", "project_id", "task_id", "job_id") if event.get(name) is not None]
        card = {
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard",
            "version": "1.4",
            "body": [{"type": "TextBlock", "text": message, "wrap": True},
                     *([{"type": "FactSet", "facts": facts}] if facts else [])],
        }
        return {"type": "message", "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}]}
    return {"text": message, "delivery_id": ctx.call.delivery_id, "rule_id": ctx.call.rule_id,
            **{name: event.get(name) for name in _CONTEXT_KEYS}}


def resolve(target: Target, allowed: tuple[str, ...]) -> str:
    """The one address the POST will go to: the host's first address the worker may reach.

    Resolved once, here; :func:`post` connects to this address and never resolves the name again.
    """
    literal = _address(target.host)
    if literal is not None:
        candidates = [str(literal)]
    else:
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise TransientError(f"host {target.host!r} does not resolve ({type(exc).__name__})") from None
        candidates = list(dict.fromkeys(str(info[4][0]) for info in infos))
    refused = []
    for candidate in candidates:
        ip = ipaddress.ip_address(candidate.split("%")[0])
        if address_allowed(ip, allowed):
            return candidate
        refused.append(candidate)
    raise PermanentError(f"host {target.host!r} resolves to {', '.join(refused)}: not a public address; list it "
                         "(or its network) in CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS to allow it")


KEEP_ALIVE_SECONDS = 4.0
"""How long a worker keeps an idle connection to a notified host for its next notification: less than
the idle timeout of common servers (Apache 5 s, nginx 75 s), so a kept connection is seldom one the
server is closing as it is used again."""
MAX_KEPT = 16
"""Hosts a worker keeps a connection to at most (the least recently used one is closed first)."""


class KeptConnections:
    """One kept-alive connection per host a worker notifies, so a rule that notifies Slack on every
    event pays one TCP (and TLS) handshake, not one per notification (bench/: a POST on a new
    connection cost the worker about twice the CPU of one on a kept one).

    A connection is kept per (scheme, address, port, name): the address is the one :func:`resolve`
    checked, so a kept connection never goes anywhere a fresh one could not; the name is the TLS
    server name and ``Host``. One that failed is closed, never used again."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pools: OrderedDict[tuple[str, str, int, str], tuple[urllib3.HTTPConnectionPool, float]] = OrderedDict()

    @staticmethod
    def key(target: Target, address: str) -> tuple[str, str, int, str]:
        return target.scheme, address, target.port, target.host

    def pool(self, target: Target, address: str) -> urllib3.HTTPConnectionPool:
        """The pool for ``target`` at ``address``: the kept one, unless it has been idle too long."""
        key = self.key(target, address)
        with self.lock:
            kept = self.pools.pop(key, None)
            if kept is not None and time.monotonic() - kept[1] <= KEEP_ALIVE_SECONDS:
                pool = kept[0]
            else:
                if kept is not None:
                    kept[0].close()
                pool = _new_pool(target, address)
            self.pools[key] = (pool, time.monotonic())
            while len(self.pools) > MAX_KEPT:
                self.pools.popitem(last=False)[1][0].close()
            return pool

    def used(self, target: Target, address: str, *, ok: bool) -> None:
        """After a POST: keep the connection idle from now, or close it after a failure."""
        key = self.key(target, address)
        with self.lock:
            kept = self.pools.pop(key, None)
            if kept is None:
                return
            if ok:
                self.pools[key] = (kept[0], time.monotonic())
            else:
                kept[0].close()

    def close(self) -> None:
        with self.lock:
            while self.pools:
                self.pools.popitem()[1][0].close()


def _new_pool(target: Target, address: str) -> urllib3.HTTPConnectionPool:
    """A pool of one connection to ``address`` with the target's name for TLS (no retries)."""
    import urllib3  # lazily: the receiver imports this module to validate rules

    if target.scheme == "https":
        return urllib3.HTTPSConnectionPool(address, port=target.port, retries=False, maxsize=1,
                                           server_hostname=target.host, assert_hostname=target.host)
    return urllib3.HTTPConnectionPool(address, port=target.port, retries=False, maxsize=1)


KEPT = KeptConnections()


def post(target: Target, address: str, payload: dict[str, Any], *, timeout: float,
         headers: Mapping[str, str], shown: str) -> int:
    """POST JSON once to ``address`` (no retries, no redirects, no second DNS lookup) with the
    target's name as ``Host`` and TLS server name; errors say only the redacted URL."""
    import urllib3

    data = json.dumps(payload).encode()
    all_headers = {**{k: v for k, v in headers.items() if k.lower() != "host"},
                   "Host": target.host_header, "Content-Type": "application/json", "User-Agent": "cvat-hooks"}
    pool = KEPT.pool(target, address)
    ok = False
    try:
        response = pool.urlopen("POST", target.request_uri, body=data, headers=all_headers, redirect=False,
                                retries=False, assert_same_host=False, preload_content=True,
                                timeout=urllib3.Timeout(total=timeout))
        ok = True
    except (urllib3.exceptions.SSLError, urllib3.exceptions.LocationValueError) as exc:
        # Raised from None: urllib3's messages quote the full URL, a secret.
        raise PermanentError(f"notify {shown}: {type(exc).__name__}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise TransientError(f"notify {shown}: no answer ({type(exc).__name__})") from None
    finally:
        KEPT.used(target, address, ok=ok)
    return int(response.status)


class _StatusError(Exception):
    """An HTTP status as an exception, so ``classify`` (the one retry decision) can judge it."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def run(ctx: ActionContext) -> dict[str, Any]:
    """Send the notification once; see the module docstring."""
    params = unsealed(ctx.params, ctx.settings.rule_secret)
    problems = validate(params)
    if problems:
        raise PermanentError("; ".join(problems))
    url: str = params["url"]
    shown = redact_url(url)
    try:
        target = parse_target(url)
    except ValueError as exc:
        raise PermanentError(f"notify {shown}: {exc}") from None
    host = target.host
    allowed = ctx.settings.notify_allowed_hosts
    if allowed and not host_allowed(host, allowed):
        raise PermanentError(f"notify {shown}: host {host!r} is not in CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS "
                             f"({', '.join(allowed)})")
    marker = call_key("notified", ctx.call)
    previous = text(ctx.redis.get(marker))
    if previous is not None:
        ctx.note("already sent", url=shown)
        return {"skipped": "already sent", **json.loads(previous)}

    fmt = params.get("format", "json")
    payload = body(fmt, params["text"], ctx)
    timeout = float(params.get("timeout") or ctx.settings.notify_timeout)
    headers = {IDEMPOTENCY_HEADER: ctx.call.job_id, **(params.get("headers") or {})}
    try:
        address = resolve(target, allowed)
    except (PermanentError, TransientError) as exc:
        raise type(exc)(f"notify {shown}: {exc}") from None
    status = post(target, address, payload, timeout=timeout, headers=headers, shown=shown)
    if not 200 <= status < 300:
        kind = classify(_StatusError(status))
        error = TransientError if kind is ErrorKind.TRANSIENT else PermanentError
        raise error(f"notify {shown}: HTTP {status}")
    result = {"url": shown, "status": status, "format": fmt, "bytes": len(json.dumps(payload).encode())}
    ctx.redis.set(marker, json.dumps(result), ex=MARKER_TTL)
    return result  # no note of its own: the success step that follows carries this result
