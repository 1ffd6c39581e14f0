"""``POST /webhooks/cvat``: the request CVAT sends at volume, served as plain WSGI in front of Flask.

Flask's machinery for one request (contexts, routing, its Request and Response objects, the JSON
provider) cost about 0.2 ms of the receiver's CPU per delivery, more than a seventh of it, for
nothing this endpoint uses: it reads one header and the raw body, and answers JSON. So
:class:`WebhookEndpoint` wraps the Flask app's ``wsgi_app`` (Flask's own way to add WSGI
middleware) and answers this one route itself; every other request goes on to Flask (the admin UI
and API, health, metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from core import json_text, metrics
from receiver.deadlines import BodyDeadlines
from receiver.dispatch import Answer, Intake

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

PATH = "/webhooks/cvat"
"""Where CVAT POSTs its signed deliveries (the webhook's Target URL)."""
SIGNATURE = "HTTP_X_SIGNATURE_256"
"""``X-Signature-256`` as WSGI names it."""
CLOSE = (("Connection", "close"),)
"""The headers of an answer that refuses a body: the connection is closed, else the server would read
the rest of a body it was sent (a declared 10 GB) before the next request."""
BODY_DEADLINES = BodyDeadlines()
READ_CHUNK = 65536
"""Bytes asked of the server per read of a body."""


class WebhookEndpoint:
    """WSGI middleware: requests to ``/webhooks/cvat`` answered here, any other passed to ``app``."""

    def __init__(self, app: WSGIApplication, intake: Intake) -> None:
        self.app = app
        self.intake = intake

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return self.app(environ, start_response)
        if environ.get("REQUEST_METHOD") == "POST":
            answer, headers = self.deliver(environ)
        else:
            answer, headers = Answer(405, {"error": "CVAT POSTs its deliveries here"}), [("Allow", "POST")]
        body = json_text.dumps(answer.body)
        status = HTTPStatus(answer.status)
        start_response(f"{status.value} {status.phrase}", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def deliver(self, environ: WSGIEnvironment) -> tuple[Answer, Sequence[tuple[str, str]]]:
        """Read one delivery within the size and time limits, then hand it to the intake."""
        settings = self.intake.settings
        peer = environ.get("REMOTE_ADDR") or "-"
        length = content_length(environ)
        if length is not None and length > settings.max_body:
            return too_large(self.intake, "POST", PATH, peer, f"{length} bytes"), CLOSE
        body = read_body(environ, length, settings.max_body, settings.body_seconds)
        if body is None:
            metrics.safe_inc(self.intake.redis, "cvat_hooks_rejected_total", reason="body_timeout")
            return Answer(408, {"error": "body not received in time"}), CLOSE
        if length is None and len(body) > settings.max_body:
            return too_large(self.intake, "POST", PATH, peer, "a chunked body"), CLOSE
        try:
            return self.intake.receive(body, environ.get(SIGNATURE), peer=peer), []
        except Exception:
            log.exception("delivery: failed unexpectedly (%d bytes from %s)", len(body), peer)
            return Answer(500, {"error": "internal error; see the receiver's log"}), []


def too_large(intake: Intake, method: str, path: str, peer: str, size: str) -> Answer:
    """413 for any route (this one, and the Flask routes' ``receiver.views.too_large``), counted and logged."""
    limit = intake.settings.max_body
    metrics.safe_inc(intake.redis, "cvat_hooks_rejected_total", reason="too_large")
    log.warning("request: 413 for %s %s from %s: %s, over CVAT_HOOKS_MAX_BODY (%d bytes)", method, path, peer, size,
                limit)
    return Answer(413, {"error": f"body larger than {limit} bytes"})


def content_length(environ: WSGIEnvironment) -> int | None:
    """The declared body size, read as werkzeug's ``get_content_length`` reads it (``None`` for a
    chunked body or none declared, 0 for a value that is not a size), but for the transfer coding's
    name taken without case, as HTTP and gunicorn take it (werkzeug's would read ``Chunked`` as no
    chunking)."""
    value = environ.get("CONTENT_LENGTH")
    encodings = environ.get("HTTP_TRANSFER_ENCODING", "")
    if value is None or "chunked" in (e.strip().lower() for e in encodings.split(",")):
        return None
    digits = value.strip(" \t")
    return int(digits) if digits.isascii() and digits.isdigit() else 0


def read_body(environ: WSGIEnvironment, length: int | None, limit: int, seconds: float) -> bytes | None:
    """The raw body (at most ``limit`` + 1 bytes of a chunked one, to tell it was larger), or ``None``
    if the client did not send all of it within ``seconds`` (``receiver.deadlines`` says why gunicorn
    alone does not bound that)."""
    stream = environ["wsgi.input"]
    if length is None and not environ.get("wsgi.input_terminated"):
        return b""  # a server that does not end a chunked body itself: reading could wait forever
    want = length if length is not None else limit + 1
    sock = environ.get("gunicorn.socket")
    try:
        if sock is None:  # the test client or another WSGI server: nothing to cut off
            body = _read(stream.read, want)
        else:
            with BODY_DEADLINES.reading(sock, seconds):
                body = _read(stream.read, want)
    except OSError:  # gunicorn's NoMoreData (a chunked body cut short) is an OSError
        return None
    if length is not None and len(body) < length:
        return None  # cut off before its Content-Length arrived
    return body


def _read(read: Callable[[int], Any], want: int) -> bytes:
    """Up to ``want`` bytes, reading until the stream ends."""
    chunks: list[bytes] = []
    got = 0
    while got < want:
        chunk = read(min(READ_CHUNK, want - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
