"""HTTP endpoints: the only module that touches ``flask.request``."""

from __future__ import annotations

import socket
import threading

from flask import Blueprint, current_app, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from receiver.dispatch import Intake
from receiver.signature import HEADER
from workers import metrics
from workers.contract import QUEUES

bp = Blueprint("cvat_hooks", __name__)


def intake() -> Intake:
    return current_app.extensions["cvat_hooks"]


@bp.post("/webhooks/cvat")
def webhook():  # type: ignore[no-untyped-def]
    """Receive one CVAT delivery: verify, parse, match, record, enqueue; answer fast."""
    limit = intake().settings.max_body
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge()
    body = read_body(intake().settings.body_seconds)
    if body is None:
        metrics.safe_inc(intake().redis, "cvat_hooks_rejected_total", reason="body_timeout")
        return jsonify({"error": "body not received in time"}), 408, {"Connection": "close"}
    if request.content_length is None and len(body) >= limit and request.environ["wsgi.input"].read(1):
        # MAX_CONTENT_LENGTH stops reading a chunked body at the limit without a word: what is left
        # says it was larger (otherwise the cut body would only fail its signature, a 401).
        raise RequestEntityTooLarge()
    answer = intake().receive(body, request.headers.get(HEADER), peer=request.remote_addr or "-")
    return jsonify(answer.body), answer.status


def read_body(seconds: float) -> bytes | None:
    """The raw body, or ``None`` if the client did not send all of it within ``seconds``.

    gunicorn's gthread worker waits at most 5 s for a request's first byte, but once it reads a
    request, a client trickling its body holds that thread as long as it likes: ``--timeout`` only
    watches the worker process, which stays responsive. So at the deadline the socket's reading side
    is shut down: the blocked read returns what it has at once, and the client still gets its 408.
    """
    sock = request.environ.get("gunicorn.socket")
    timer = None
    if sock is not None:  # under gunicorn (not the test client or werkzeug's server)
        timer = threading.Timer(seconds, _stop_reading, args=(sock,))
        timer.daemon = True
        timer.start()
    try:
        body = request.get_data(cache=False)
    except (OSError, ClientDisconnected):  # gunicorn's NoMoreData (a chunked body cut short) is an OSError
        return None
    finally:
        if timer is not None:
            timer.cancel()
    if request.content_length is not None and len(body) < request.content_length:
        return None  # cut off before its Content-Length arrived
    return body


def _stop_reading(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass  # already closed: nothing to cut off


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    """The process is alive (used by the container HEALTHCHECK and liveness probes)."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Ready to take deliveries: Redis answers and rules are loaded."""
    checks: dict[str, str] = {}
    try:
        intake().redis.ping()
        checks["redis"] = "ok"
    except RedisError as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    rules = intake().rules.current
    checks["rules"] = f"{len(rules.rules)} rule(s) loaded"
    ok = checks["redis"] == "ok"
    return jsonify({"status": "ready" if ok else "not ready", "checks": checks}), 200 if ok else 503


@bp.get("/metrics")
def prometheus_metrics():  # type: ignore[no-untyped-def]
    """Prometheus metrics of every receiver and worker sharing this Redis."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return metrics.render(intake().redis, QUEUES), 200, {"Content-Type": CONTENT_TYPE_LATEST}


@bp.app_errorhandler(RequestEntityTooLarge)
def too_large(exc: RequestEntityTooLarge):  # type: ignore[no-untyped-def]
    """413 as JSON, like every other answer CVAT will show in its delivery log."""
    metrics.safe_inc(intake().redis, "cvat_hooks_rejected_total", reason="too_large")
    return jsonify({"error": f"body larger than {intake().settings.max_body} bytes"}), 413
