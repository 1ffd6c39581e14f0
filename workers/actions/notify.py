"""``notify``: POST a message (plain JSON, Slack or Microsoft Teams) to a URL.

Parameters::

    url: https://hooks.slack.com/services/...   # http or https
    text: "Job {job_id} of task {task_id} is {job.state}"   # placeholders rendered by the receiver
    format: json | slack | teams                # default json
    timeout: 5                                  # seconds; default CVAT_HOOKS_NOTIFY_TIMEOUT
    headers: {Authorization: "Bearer ..."}      # optional extra request headers

Bodies:

- ``json``: ``{"text", "event", "delivery_id", "rule_id", "resource", "resource_id", "updated_date",
  "webhook_id", "project_id", "task_id", "job_id", "org_id", "object"}``: the text and the event
  essentials, for a receiver of our own;
- ``slack``: ``{"text": ...}``, what a Slack incoming webhook takes;
- ``teams``: a message with one Adaptive Card (the text and a fact set of the event's ids), the
  shape accepted both by Teams Workflows webhooks and the older Office 365 connector webhooks
  (https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/connectors-using).

A 2xx answer is success; the rest is classified as everywhere (``workers.errors.classify``: 5xx, 408
and 429 are retried, other statuses fail at once), connection errors and timeouts are retried.
Redirects are not followed: a redirect could lead to a host the allow-list would have refused.

``CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS``, when set, is checked here at run time: a rule (or a value
rendered into its URL) must not be a way to make the worker, which sits inside the network, POST to
internal addresses such as a cloud metadata service or an admin port. ``*.example.com`` allows any
subdomain of example.com.

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

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from workers.actions._params import call_key, has_placeholder, text, unknown_params
from workers.context import ActionContext
from workers.errors import ErrorKind, PermanentError, TransientError, classify

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
        shown["url"] = redact_url(shown["url"])
    if isinstance(shown.get("headers"), Mapping):
        shown["headers"] = {name: "***" for name in shown["headers"]}
    return shown


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` is in the allow-list (exact, case-insensitive; ``*.x.com`` for subdomains)."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().strip().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def validate(params: Mapping[str, Any]) -> list[str]:
    """URL scheme, text, format, timeout and header types (the host allow-list is checked at run time)."""
    problems = unknown_params(params, PARAMS)
    url = params.get("url")
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        problems.append("url is required and must start with http:// or https://")
    elif not has_placeholder(url.split("/")[2]) and not urlsplit(url).hostname:
        problems.append(f"url {redact_url(url)!r} names no host")
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


def post(url: str, payload: dict[str, Any], *, timeout: float, headers: Mapping[str, str]) -> int:
    """POST JSON once (no retries, no redirects) and return the status; errors say only the redacted URL."""
    import urllib3  # lazily: the receiver imports this module to validate rules

    shown = redact_url(url)
    data = json.dumps(payload).encode()
    all_headers = {**headers, "Content-Type": "application/json", "User-Agent": "cvat-hooks"}
    try:
        with urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(total=timeout)) as http:
            response = http.request("POST", url, body=data, headers=all_headers, redirect=False,
                                    preload_content=True)
    except (urllib3.exceptions.SSLError, urllib3.exceptions.LocationValueError) as exc:
        # Raised from None: urllib3's messages quote the full URL, a secret.
        raise PermanentError(f"notify {shown}: {type(exc).__name__}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise TransientError(f"notify {shown}: no answer ({type(exc).__name__})") from None
    return int(response.status)


class _StatusError(Exception):
    """An HTTP status as an exception, so ``classify`` (the one retry decision) can judge it."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def run(ctx: ActionContext) -> dict[str, Any]:
    """Send the notification once; see the module docstring."""
    params = ctx.params
    problems = validate(params)
    if problems:
        raise PermanentError("; ".join(problems))
    url: str = params["url"]
    shown = redact_url(url)
    host = urlsplit(url).hostname or ""
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
    status = post(url, payload, timeout=timeout, headers=headers)
    if not 200 <= status < 300:
        kind = classify(_StatusError(status))
        error = TransientError if kind is ErrorKind.TRANSIENT else PermanentError
        raise error(f"notify {shown}: HTTP {status}")
    result = {"url": shown, "status": status, "format": fmt, "bytes": len(json.dumps(payload).encode())}
    ctx.redis.set(marker, json.dumps(result), ex=MARKER_TTL)
    ctx.note(f"sent ({status})", url=shown)
    return result
