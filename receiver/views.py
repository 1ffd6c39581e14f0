"""The service's own HTTP endpoints (the webhook is ``receiver.endpoint``, the admin UI and API ``receiver.admin``)."""

from __future__ import annotations

import html
import logging
from importlib import metadata

from flask import Blueprint, current_app, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import RequestEntityTooLarge

from core import metrics
from core.contract import QUEUES
from receiver import endpoint
from receiver.current import intake

bp = Blueprint("cvat_hooks", __name__)
log = logging.getLogger(__name__)
LINKS = {
    "webhooks": (endpoint.PATH, "where CVAT POSTs its signed deliveries (the webhook's Target URL)"),
    "readyz": ("/readyz", "readiness: Redis, rules, and whether actions can reach CVAT"),
    "healthz": ("/healthz", "liveness"),
    "metrics": ("/metrics", "Prometheus metrics of every receiver and worker"),
    "admin": ("/ui/", "deliveries, rules and replays (needs CVAT_HOOKS_ADMIN_TOKEN)"),
    "api": ("/api/", "the admin JSON API (Authorization: Bearer <admin token>)"),
    "readme": ("/readme", "the README: set-up, configuration, rules, commands"),
}
"""What ``GET /`` points to: path and what is there."""


@bp.get("/")
def index():  # type: ignore[no-untyped-def]
    """What this service is and where to look: JSON, or a small HTML page for a browser."""
    version = _version()
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        items = "".join(f'<li><a href="{html.escape(path)}">{html.escape(path)}</a>: {html.escape(text)}</li>'
                        for path, text in LINKS.values())
        page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>cvat-hooks {version}</title></head>"
                f"<body><h1>cvat-hooks {html.escape(version)}</h1><p>Receives CVAT webhooks, matches them "
                f"against rules.yaml and runs the actions on RQ workers.</p><ul>{items}</ul></body></html>")
        return page, 200, {"Content-Type": "text/html; charset=utf-8"}
    return jsonify({"service": "cvat-hooks", "version": version,
                    "about": "receives CVAT webhooks, matches them against rules.yaml, runs the actions on RQ workers",
                    "links": {name: {"href": path, "what": text} for name, (path, text) in LINKS.items()}})


@bp.get("/readme")
def readme():  # type: ignore[no-untyped-def]
    """The README this version was installed with (from the package's metadata: works for any install)."""
    try:
        text = metadata.metadata("cvat-hooks").json.get("description")
    except metadata.PackageNotFoundError:
        text = None
    if not text:
        return jsonify({"error": "no README in this installation's metadata"}), 404
    return text, 200, {"Content-Type": "text/markdown; charset=utf-8"}


def _version() -> str:
    try:
        return metadata.version("cvat-hooks")
    except metadata.PackageNotFoundError:
        return "unknown"


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    """The process is alive (used by the container HEALTHCHECK and liveness probes)."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    """Ready to take deliveries: Redis answers and cannot evict our keys, and good rules are loaded.

    ``checks.cvat`` says when the workers have no CVAT to call. Readiness stays true then: receiving,
    verifying and recording still work (and ``replay`` runs them once CVAT is set), while a receiver
    taken out of its Service would lose the deliveries CVAT sends meanwhile."""
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
    rules = intake().redactor.data(store.status())  # unauthenticated: a rules line must not show a secret
    checks["rules"] = f"{rules['rule_count']} rule(s) loaded, version {rules['version']}"
    if rules["problem"]:
        # Still ready (200) on the last good rules: deliveries keep being judged and queued, so the
        # load balancer must keep sending them; the failing check is for people and alerts.
        checks["rules"] = f"failing: {rules['problem']} ({checks['rules']})"
    checks["cvat"] = intake().settings.cvat_problem or "configured"
    ok = checks["redis"] == "ok" and store.usable
    failing = [name for name, bad in (("redis", checks["redis"] != "ok"), ("rules", bool(store.problem))) if bad]
    return jsonify({"status": "ready" if ok else "not ready", "checks": checks, "failing": failing,
                    "rules": rules}), 200 if ok else 503


@bp.get("/metrics")
def prometheus_metrics():  # type: ignore[no-untyped-def]
    """Prometheus metrics of every receiver and worker sharing this Redis."""
    from prometheus_client import CONTENT_TYPE_LATEST

    body = metrics.render(intake().redis, QUEUES, rules=intake().rules.status())
    return body, 200, {"Content-Type": CONTENT_TYPE_LATEST}


@bp.app_errorhandler(RequestEntityTooLarge)
def too_large(exc: RequestEntityTooLarge):  # type: ignore[no-untyped-def]
    """413 as JSON, like every other answer CVAT will show in its delivery log."""
    size = f"{request.content_length} bytes" if request.content_length is not None else "a chunked body"
    answer = endpoint.too_large(intake(), request.method, request.path, request.remote_addr or "-", size)
    return jsonify(answer.body), answer.status
