"""HTTP endpoints: the only module that touches ``flask.request``."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import RequestEntityTooLarge

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
    body = request.get_data(cache=False)  # MAX_CONTENT_LENGTH also caps chunked bodies
    answer = intake().receive(body, request.headers.get(HEADER), peer=request.remote_addr or "-")
    return jsonify(answer.body), answer.status


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
