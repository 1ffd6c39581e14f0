"""``cvat-hooks send``: deliver a payload file to a receiver the way CVAT does, to try rules without CVAT.

CVAT (``cvat/apps/webhooks/utils.py``, ``perform_webhook_request``) POSTs the JSON body with
``Content-Type: application/json`` and, when the webhook has a secret, ``X-Signature-256``; it sends no
event or delivery header (the event is only in the body: /work/shared/cvat-payloads/README.md). The
file's bytes are sent as they are, signed by ``receiver.signature.sign``, the one signing function.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from urllib.parse import urlsplit, urlunsplit

from receiver.signature import HEADER, sign

WEBHOOK_PATH = "/webhooks/cvat"
TIMEOUT = 10.0
"""Seconds to wait for the receiver's answer (CVAT waits 10)."""


class SendError(RuntimeError):
    """The receiver could not be reached; the message says where and why."""


@dataclass(frozen=True)
class Answer:
    """What the receiver answered."""

    status: int
    reason: str
    body: str


def target_url(url: str) -> str:
    """The webhook URL of a receiver given by its base URL (``http://host:8000``) or its full URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000")
    if parts.path in ("", "/"):
        parts = parts._replace(path=WEBHOOK_PATH)
    return urlunsplit(parts)


def headers_for(body: bytes, secret: str | None) -> dict[str, str]:
    """The headers CVAT sends with ``body`` (no signature without a secret, as CVAT does)."""
    try:
        version = metadata.version("cvat-hooks")
    except metadata.PackageNotFoundError:
        version = "unknown"
    headers = {"Content-Type": "application/json", "User-Agent": f"cvat-hooks-send/{version}"}
    if secret:
        headers[HEADER] = sign(body, secret)
    return headers


def send(body: bytes, url: str, secret: str | None, *, timeout: float = TIMEOUT) -> Answer:
    """POST ``body`` to ``url`` signed with ``secret``; the answer, whatever its status."""
    request = urllib.request.Request(url, data=body, headers=headers_for(body, secret), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http(s) checked
            return Answer(answer.status, answer.reason, answer.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, str(exc.reason), exc.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise SendError(f"cannot reach {url}: {reason}") from exc
