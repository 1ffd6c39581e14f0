"""The admin web page under ``/ui/``: recent deliveries, one delivery, replay. Server-rendered.

Everything shown comes from the delivery log, and payload values are written by whoever can make
CVAT send an event, so every value goes through Jinja's autoescape and a strict Content-Security-
Policy (inline ``<style>``/``<script>`` only with this response's nonce) backs that up.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for
from itsdangerous import BadSignature, URLSafeTimedSerializer
from redis.exceptions import RedisError

from receiver.admin import auth
from receiver.admin.queries import STATUSES, BadFilter, Filters, stats, valid_delivery_id
from receiver.dispatch import Intake
from workers.delivery_log import Delivery
from workers.replay import NothingToReplay, replay

log = logging.getLogger(__name__)

bp = Blueprint("cvat_hooks_ui", __name__, url_prefix="/ui", template_folder="templates")

WINDOWS = (("", "any time"), ("15m", "last 15 minutes"), ("1h", "last hour"), ("6h", "last 6 hours"),
           ("24h", "last 24 hours"), ("7d", "last 7 days"))
"""The time windows offered by the list's filter form (the API takes any ``since``)."""
FLASH_SECONDS = 60
"""Seconds a flash message survives between a POST and the page it redirects to."""
CSP = ("default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def intake() -> Intake:
    """The receiver's resources, hung on the app by ``receiver.app.init_intake``."""
    return current_app.extensions["cvat_hooks"]


def _token() -> str:
    """The admin token (only called once :func:`receiver.admin.auth.disabled_reason` said it is set)."""
    return intake().settings.admin_token or ""


def _page(template: str, status: int = 200, **context: Any) -> tuple[str, int]:
    """A rendered page and its status."""
    return render_template(template, **context), status


def _message(title: str, message: str, status: int) -> tuple[str, int]:
    """A page that only says something (disabled, refused, not found, Redis down)."""
    return _page("admin_message.html", status, title=title, message=message)


@bp.before_request
def require_login():  # type: ignore[no-untyped-def]
    """Closed without a configured token; otherwise a valid session, and a CSRF token on every POST."""
    g.csp_nonce = secrets.token_urlsafe(16)
    reason = auth.disabled_reason(intake().settings)
    if reason:
        return _message("Admin UI disabled", reason, 404)
    if request.endpoint == "cvat_hooks_ui.login":
        return None
    nonce = auth.session_nonce(request.cookies.get(auth.SESSION_COOKIE), _token())
    if nonce is None:
        target = request.full_path.rstrip("?") if request.method == "GET" else None
        return redirect(url_for(".login", next=target))
    g.csrf_token = auth.csrf_token(_token(), nonce)
    if request.method == "POST" and not auth.csrf_ok(request.form.get(auth.CSRF_FIELD), _token(), nonce):
        log.warning("admin ui: refused %s %s from %s (CSRF token missing or wrong)",
                    request.method, request.path, request.remote_addr or "-")
        return _message("Form refused", "This form is out of date or did not come from this page: "
                        "reload the page and try again.", 403)
    return None


@bp.after_request
def security_headers(response: Response) -> Response:
    """No caching of payloads, no framing (clickjacking), no referrer to result links, a strict CSP."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Content-Security-Policy"] = CSP.format(nonce=g.get("csp_nonce", "none"))
    return response


@bp.context_processor
def page_context() -> dict[str, Any]:
    """What every template may use: the CSP nonce and, once logged in, the CSRF token."""
    return {"csp_nonce": g.get("csp_nonce", ""), "csrf_token": g.get("csrf_token"),
            "csrf_field": auth.CSRF_FIELD}


@bp.errorhandler(RedisError)
def redis_down(exc: RedisError):  # type: ignore[no-untyped-def]
    """Redis unreachable: a page that says so, without connection details."""
    log.error("admin ui: redis unavailable: %s", type(exc).__name__)
    return _message("Redis unavailable", f"The delivery log cannot be read now ({type(exc).__name__}).", 503)


@bp.route("/login", methods=["GET", "POST"])
def login():  # type: ignore[no-untyped-def]
    """Ask for the admin token once; keep a session cookie that is an HMAC, never the token."""
    target = auth.safe_next(request.values.get("next"))
    if request.method == "GET":
        return _page("admin_login.html", next=target, error=None)
    if not auth.token_ok(request.form.get("token"), _token()):
        log.warning("admin ui: failed login from %s", request.remote_addr or "-")
        return _page("admin_login.html", 401, next=target, error="That is not the admin token.")
    response = redirect(target, 303)
    response.set_cookie(auth.SESSION_COOKIE, auth.new_session(_token()), max_age=auth.SESSION_SECONDS,
                        path=auth.COOKIE_PATH, httponly=True, samesite="Strict", secure=request.is_secure)
    return response


@bp.post("/logout")
def logout():  # type: ignore[no-untyped-def]
    """Forget the session in this browser (CSRF-checked, so another site cannot log you out)."""
    response = redirect(url_for(".login"), 303)
    response.delete_cookie(auth.SESSION_COOKIE, path=auth.COOKIE_PATH, httponly=True, samesite="Strict")
    return response


@bp.get("/")
def deliveries():  # type: ignore[no-untyped-def]
    """Recent deliveries with their status, filtered by event, rule, status and time window."""
    error = None
    try:
        filters = Filters.from_args(request.args)
    except BadFilter as exc:
        error, filters = str(exc), Filters()
    rows = [d.summary() for d in filters.apply(intake().deliveries)] if error is None else []
    windows = list(WINDOWS)
    if filters.since and filters.since not in dict(WINDOWS):
        windows.append((filters.since, f"since {filters.since}"))
    return _page("admin_list.html", 400 if error else 200, rows=rows, filters=filters, error=error,
                 header=stats(intake().redis), statuses=STATUSES, windows=windows,
                 rule_ids=[r.id for r in intake().rules.current.rules])


def _find(delivery_id: str) -> Delivery | None:
    """The delivery with this id or unique prefix; malformed ids are not even looked up."""
    return intake().deliveries.find(delivery_id) if valid_delivery_id(delivery_id) else None


@bp.get("/deliveries/<delivery_id>")
def delivery(delivery_id: str):  # type: ignore[no-untyped-def]
    """One delivery: payload, matched rules and why, each action's attempts, errors and results."""
    found = _find(delivery_id)
    if found is None:
        return _message("No such delivery", "Unknown, expired, or an ambiguous id prefix.", 404)
    flash = _read_flash()
    body, status = _page("admin_detail.html", d=found, summary=found.summary(), header=stats(intake().redis),
                         payload=json.dumps(found.record.get("payload"), indent=2, ensure_ascii=False),
                         actions=_actions(found), flash=flash)
    response = current_app.make_response((body, status))
    if flash is not None:
        response.delete_cookie(auth.FLASH_COOKIE, path=auth.COOKIE_PATH, httponly=True, samesite="Strict")
    return response


@bp.post("/deliveries/<delivery_id>/replay")
def replay_delivery(delivery_id: str):  # type: ignore[no-untyped-def]
    """Queue new runs of the failed actions (finished ones too with *force*); back to the detail page."""
    found = _find(delivery_id)
    if found is None:
        return _message("No such delivery", "Unknown, expired, or an ambiguous id prefix.", 404)
    force = request.form.get("force") == "1"
    try:
        job_ids = replay(intake().deliveries, found, force=force)
        flash = {"kind": "ok", "message": f"Replay queued {len(job_ids)} job(s): {', '.join(job_ids)}"}
        log.info("delivery %s: replay from the admin ui queued %d job(s)", found.id, len(job_ids))
    except NothingToReplay as exc:
        reason = str(exc).replace("use --force to run", "tick 'force' to run")
        flash = {"kind": "warn", "message": f"Nothing replayed: {reason}"}
    response = redirect(url_for(".delivery", delivery_id=found.id), 303)
    response.set_cookie(auth.FLASH_COOKIE, _flash_signer().dumps(flash), max_age=FLASH_SECONDS,
                        path=auth.COOKIE_PATH, httponly=True, samesite="Strict", secure=request.is_secure)
    return response


@bp.route("/<path:rest>", methods=["GET", "POST"])
def unknown(rest: str):  # type: ignore[no-untyped-def]
    """Anything else under ``/ui/``: a 404 page, shown only after the login check."""
    return _message("Not found", "There is no such page.", 404)


def _flash_signer() -> URLSafeTimedSerializer:
    """Signs flash cookies, so another site cannot plant a message on our pages."""
    return URLSafeTimedSerializer(auth.flash_key(_token()), salt="cvat-hooks-ui-flash")


def _read_flash() -> dict[str, str] | None:
    """The message a POST left for this page, if it is ours (signed) and fresh."""
    raw = request.cookies.get(auth.FLASH_COOKIE)
    if not raw:
        return None
    try:
        data = _flash_signer().loads(raw, max_age=FLASH_SECONDS)
    except BadSignature:
        return None
    return data if isinstance(data, dict) else None


def link(value: Any) -> str | None:
    """``value`` if it is an http(s) URL a browser may follow (never ``javascript:`` and friends)."""
    if not isinstance(value, str):
        return None
    parts = urlsplit(value)
    return value if parts.scheme in ("http", "https") and parts.netloc else None


def _shown(value: Any) -> str:
    """A result value as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _actions(delivery: Delivery) -> list[dict[str, Any]]:
    """Each action run as the detail page shows it, in rule, position and run order."""
    rows = []
    for action in delivery.actions.values():
        result = action.get("result") or {}
        items = result.items() if isinstance(result, dict) else [("result", result)]
        rows.append({**action, "result_items": [
            {"key": key, "value": _shown(value), "href": link(value) if key == "uri" else None}
            for key, value in items]})
    return sorted(rows, key=lambda a: (str(a.get("rule_id")), int(a.get("index", 0)), int(a.get("run", 0))))
