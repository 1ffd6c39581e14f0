"""HTTP endpoints: the only module that touches ``flask.request``."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from receiver.deadlines import BodyDeadlines
from receiver.dispatch import Intake
from receiver.signature import HEADER
from workers import metrics
from workers.contract import QUEUES

bp = Blueprint("cvat_hooks", __name__)
BODY_DEADLINES = BodyDeadlines()


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
    """The raw body, or ``None`` if the client did not send all of it within ``seconds``
    (``receiver.deadlines`` says why gunicorn alone does not bound that)."""
    sock = request.environ.get("gunicorn.socket")
    try:
        if sock is None:  # the test client or werkzeug's server: nothing to cut off
            body = request.get_data(cache=False)
        else:
            with BODY_DEADLINES.reading(sock, seconds):
                body = request.get_data(cache=False)
    except (OSError, ClientDisconnected):  # gunicorn's NoMoreData (a chunked body cut short) is an OSError
        return None
    if request.content_length is not None and len(body) < request.content_length:
        return None  # cut off before its Content-Length arrived
    return body


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    """The process is alive (used by the container HEALTHCHECK and liveness probes)."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Ready to take deliveries: Redis answers and cannot evict our keys, and good rules are loaded."""
    checks: dict[str, str] = {}
    try:
        intake().redis.ping()
        checks["redis"] = "ok"
    except RedisError as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    durability = current_app.extensions.get("cvat_hooks_durability")
    if checks["redis"] == "ok" and durability is not None:
        # Cached for a minute: an evicting Redis drops acknowledged jobs and dedupe keys.
        if problem := durability.get().eviction_problem():
            checks["redis"] = f"can lose acknowledged deliveries: {problem}"
    store = intake().rules
    store.maybe_reload()  # a fixed file makes a worker that started without rules ready again
    checks["rules"] = f"{len(store.current.rules)} rule(s) loaded"
    if store.problem:
        checks["rules"] += f"; {store.problem}"
    ok = checks["redis"] == "ok" and store.usable
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
