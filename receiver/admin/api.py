"""The admin JSON API under ``/api/``: deliveries, one delivery, replay, rules, stats.

Bearer-token only (see :mod:`receiver.admin.auth`). Every answer is JSON, errors included, with
``Cache-Control: no-store`` since records hold payloads.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from redis.exceptions import RedisError

from core.replay import NothingToReplay, replay
from receiver.admin import auth
from receiver.admin.queries import BadFilter, Filters, rules_json, stats, valid_delivery_id
from receiver.current import intake
from receiver.rematch import rematch
from workers.actions import public_params

log = logging.getLogger(__name__)

bp = Blueprint("cvat_hooks_api", __name__, url_prefix="/api")

ENDPOINTS = (
    "GET /api/deliveries?event=&rule=&status=&since=&until=&limit=",
    "GET /api/deliveries/<id>",
    "POST /api/deliveries/<id>/replay {\"force\": false, \"rematch\": false}",
    "GET /api/rules",
    "GET /api/stats",
)



def _error(status: int, message: str, **extra: Any) -> tuple[Response, int]:
    """Every error is JSON with an ``error`` message, so scripts can show it as is."""
    return jsonify({"error": message, **extra}), status


@bp.before_request
def require_token():  # type: ignore[no-untyped-def]
    """Refuse everything without the admin token (404 when none is configured: never open by default)."""
    settings = intake().settings
    reason = auth.disabled_reason(settings)
    if reason:
        return _error(404, reason)
    if not auth.bearer_ok(request.headers.get("Authorization"), settings.admin_token or ""):
        log.warning("admin api: refused %s %s from %s (admin token missing or wrong)",
                    request.method, request.path, request.remote_addr or "-")
        response, status = _error(401, "admin token missing or wrong: send "
                                       "'Authorization: Bearer <CVAT_HOOKS_ADMIN_TOKEN>'")
        response.headers["WWW-Authenticate"] = 'Bearer realm="cvat-hooks admin"'
        return response, status
    return None


@bp.after_request
def no_store(response: Response) -> Response:
    """Answers hold payloads: no cache may keep them; never sniffed as HTML."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.errorhandler(RedisError)
def redis_down(exc: RedisError):  # type: ignore[no-untyped-def]
    """Redis unreachable: say so (503), without the connection details."""
    log.error("admin api: redis unavailable: %s", type(exc).__name__)
    return _error(503, f"redis unavailable ({type(exc).__name__})")


@bp.get("/")
def index():  # type: ignore[no-untyped-def]
    """What this API offers, so a curl of ``/api/`` is self-explaining."""
    return jsonify({"endpoints": list(ENDPOINTS)})


@bp.get("/deliveries")
def deliveries():  # type: ignore[no-untyped-def]
    """Recent deliveries (summaries), newest first, filtered like ``cvat-hooks deliveries list``."""
    try:
        filters = Filters.from_args(request.args)
    except BadFilter as exc:
        return _error(400, str(exc))
    found = [d.summary() for d in filters.apply(intake().deliveries)]
    return jsonify({"deliveries": found, "count": len(found), "filters": filters.to_json()})


def _find(delivery_id: str):  # type: ignore[no-untyped-def]
    """The delivery with this id or unique prefix, or ``None``."""
    if not valid_delivery_id(delivery_id):
        return None
    return intake().deliveries.find(delivery_id)


@bp.get("/deliveries/<delivery_id>")
def delivery(delivery_id: str):  # type: ignore[no-untyped-def]
    """One delivery in full: payload, matched rules with reasons, actions, timeline."""
    found = _find(delivery_id)
    if found is None:
        return _error(404, "no such delivery (unknown, expired, or an ambiguous prefix)")
    return jsonify(found.to_json(shown=public_params))


@bp.post("/deliveries/<delivery_id>/replay")
def replay_delivery(delivery_id: str):  # type: ignore[no-untyped-def]
    """Queue new runs of a delivery's failed actions (every finished one with ``force``); with
    ``rematch``, judge it again with the rules in force and run the actions that match now."""
    body = request.get_json(force=True, silent=True) if request.get_data(cache=True) else {}
    if not isinstance(body, dict):
        return _error(400, 'body: a JSON object such as {"force": false, "rematch": false}, or nothing')
    force, again = body.get("force", False), body.get("rematch", False)
    if not isinstance(force, bool) or not isinstance(again, bool):
        return _error(400, "force, rematch: true or false")
    found = _find(delivery_id)
    if found is None:
        return _error(404, "no such delivery (unknown, expired, or an ambiguous prefix)")
    try:
        if again:
            result = rematch(intake().deliveries, found, intake().rules.current, force=force,
                             service_account=intake().service_account.name())
            answer = {**result.to_json(), "force": force, "rematch": True}
        else:
            answer = {"delivery_id": found.id, "jobs": replay(intake().deliveries, found, force=force),
                      "force": force, "rematch": False}
    except NothingToReplay as exc:
        remedy = exc.refusal.remedy
        message = f'{exc} ({{"{remedy}": true}} would run it)' if remedy else str(exc)
        return _error(409, message, delivery_id=found.id, remedy=remedy.value if remedy else None)
    log.info("delivery %s: replay%s from the admin api queued %d job(s)", found.id,
             " (re-matched)" if again else "", len(answer["jobs"]))
    return jsonify(answer), 202


@bp.get("/rules")
def rules():  # type: ignore[no-untyped-def]
    """The rules in force: ids, descriptions, events, lines, actions; the file, its digest, warnings;
    their version and the last refused edit of the file (``status``)."""
    store = intake().rules
    return jsonify({**rules_json(store.current, intake().redactor), "status": intake().redactor.data(store.status())})


@bp.get("/stats")
def queue_stats():  # type: ignore[no-untyped-def]
    """Queue depths, running/scheduled/failed jobs, workers alive, deliveries and actions by outcome."""
    return jsonify(stats(intake().redis))


@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(rest: str):  # type: ignore[no-untyped-def]
    """Anything else under ``/api/``: 404 as JSON, and only after the token check."""
    return _error(404, "no such endpoint", endpoints=list(ENDPOINTS))
