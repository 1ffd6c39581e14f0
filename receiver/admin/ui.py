"""The admin web page under ``/ui/``: deliveries (paged, searchable, charted), one delivery (why it
matched or not, replay, re-match), bulk replays with a progress bar, the rules, and the queues with
their workers, scheduled retries and dead letters (requeue). Server-rendered; every POST is CSRF-checked.

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

from core.delivery_log import Delivery
from core.replay import NothingToReplay, Refusal, Remedy, replay, why_not
from receiver.admin import auth
from receiver.admin.charts import charts
from receiver.admin.queries import (
    STATUSES,
    BadFilter,
    Filters,
    NotRequeued,
    operations,
    requeue,
    rules_json,
    stats,
    valid_delivery_id,
)
from receiver.current import intake
from receiver.rematch import rematch

log = logging.getLogger(__name__)

bp = Blueprint("cvat_hooks_ui", __name__, url_prefix="/ui", template_folder="templates")

WINDOWS = (("", "any time"), ("15m", "last 15 minutes"), ("1h", "last hour"), ("6h", "last 6 hours"),
           ("24h", "last 24 hours"), ("7d", "last 7 days"))
"""The time windows offered by the list's filter form (the API takes any ``since``)."""
FLASH_SECONDS = 60
"""Seconds a flash message survives between a POST and the page it redirects to."""
REFRESH_CHOICES = (0, 10, 30)
"""Seconds between automatic reloads a page offers (0: off); any other value is taken as off."""
CSP = ("default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")



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
    """What every template may use: the CSP nonce, once logged in the CSRF token and the rules'
    status (a refused edit is shown on every page), and the auto-refresh period asked for."""
    logged_in = g.get("csrf_token") is not None
    return {"csp_nonce": g.get("csp_nonce", ""), "csrf_token": g.get("csrf_token"),
            "csrf_field": auth.CSRF_FIELD, "refresh": _refresh(), "refresh_choices": REFRESH_CHOICES,
            "rules_status": intake().redactor.data(intake().rules.status()) if logged_in else None}


def _refresh() -> int:
    """The auto-refresh period the page was asked for (``?refresh=10``), or 0."""
    raw = request.args.get("refresh", "")
    return int(raw) if raw.isdigit() and int(raw) in REFRESH_CHOICES else 0


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
    """Recent deliveries with their status, filtered by event, rule, status, time window and CVAT
    job/task/project id, a page at a time, with the charts of the last hour and day."""
    error = None
    try:
        filters = Filters.from_args(request.args)
    except BadFilter as exc:
        error, filters = str(exc), Filters()
    found, more = filters.page_of(intake().deliveries) if error is None else ([], False)
    rows = [d.summary() for d in found]
    windows = list(WINDOWS)
    if filters.since and filters.since not in dict(WINDOWS):
        windows.append((filters.since, f"since {filters.since}"))
    flash = _read_flash()
    return _with_flash(_page("admin_list.html", 400 if error else 200, rows=rows, filters=filters, error=error,
                             header=stats(intake().redis), statuses=STATUSES, windows=windows, more=more,
                             rule_ids=[r.id for r in intake().rules.current.rules],
                             charts=charts(intake().redis), flash=flash), flash)


def _find(delivery_id: str) -> Delivery | None:
    """The delivery with this id or unique prefix; malformed ids are not even looked up."""
    return intake().deliveries.find(delivery_id) if valid_delivery_id(delivery_id) else None


@bp.get("/deliveries/<delivery_id>")
def delivery(delivery_id: str):  # type: ignore[no-untyped-def]
    """One delivery: payload, matched rules and why, why the others did not match (with the rules in
    force now, as ``rules test`` tells it), each action's attempts, errors and results; the replays
    that can do something."""
    found = _find(delivery_id)
    if found is None:
        return _message("No such delivery", "Unknown, expired, or an ambiguous id prefix.", 404)
    flash = _read_flash()
    ping = found.record.get("outcome") == "ping"
    offers = {"replay": _say(why_not(found)), "force": _say(why_not(found, force=True)),
              "rematch": "it is a ping: no rule judges a ping" if ping else None}
    page = _page("admin_detail.html", d=found, summary=found.summary(), header=stats(intake().redis),
                 payload=json.dumps(found.record.get("payload"), indent=2, ensure_ascii=False),
                 actions=_actions(found), flash=flash, offers=offers, verdicts=None if ping else _verdicts(found))
    return _with_flash(page, flash)


_REMEDIES: dict[Remedy | None, str] = {Remedy.FORCE: " (tick 'force' to run succeeded actions again)",
                                       Remedy.REMATCH: " ('Re-match' judges it with the current rules)"}
"""A refused replay's remedy, in this page's terms."""


def _say(refusal: Refusal | None) -> str | None:
    """A refusal as the detail page shows it (``None``: the button is offered)."""
    return None if refusal is None else refusal.reason + _REMEDIES.get(refusal.remedy, "")


def _verdicts(found: Delivery) -> dict[str, Any] | None:
    """Every rule's verdict on the kept payload with the rules in force now (``rules test``'s
    explanation), or ``None`` when the payload cannot be judged again."""
    from core.events import canonical
    from receiver.try_rules import explain_payload

    payload = found.record.get("payload")
    if not isinstance(payload, dict):
        return None
    try:
        return explain_payload(intake().rules.current, canonical(payload),
                               service_account=intake().service_account.name())
    except ValueError:
        return None


@bp.post("/deliveries/<delivery_id>/replay")
def replay_delivery(delivery_id: str):  # type: ignore[no-untyped-def]
    """Queue new runs of the failed actions (finished ones too with *force*), or, with *rematch*,
    of what the rules in force now match; back to the detail page."""
    found = _find(delivery_id)
    if found is None:
        return _message("No such delivery", "Unknown, expired, or an ambiguous id prefix.", 404)
    force, again = request.form.get("force") == "1", request.form.get("rematch") == "1"
    try:
        if again:
            job_ids = rematch(intake().deliveries, found, intake().rules.current, force=force,
                              service_account=intake().service_account.name()).job_ids
        else:
            job_ids = replay(intake().deliveries, found, force=force)
        what = "Re-match" if again else "Replay"
        flash = {"kind": "ok", "message": f"{what} queued {len(job_ids)} job(s): {', '.join(job_ids)}"}
        log.info("delivery %s: %s from the admin ui queued %d job(s)", found.id, what.lower(), len(job_ids))
    except NothingToReplay as exc:
        flash = {"kind": "warn", "message": f"Nothing replayed: {exc}{_REMEDIES.get(exc.refusal.remedy, '')}"}
    return _redirect_with_flash(url_for(".delivery", delivery_id=found.id), flash)


@bp.get("/bulk")
def bulk_confirm():  # type: ignore[no-untyped-def]
    """How many deliveries the list's filters select for a bulk replay, and a button to confirm."""
    filters = _bulk_filters(request.args)
    if not isinstance(filters, Filters):
        return filters
    found = _bulk_selection(filters)
    return _page("admin_bulk.html", filters=filters, count=len(found), progress=None,
                 rematch=request.args.get("rematch") == "1")


def _bulk_filters(args: Any) -> Filters | tuple[str, int]:
    """The filters a bulk replay would replay (``args``: the list's query or the confirming form),
    or the page saying why they cannot start one."""
    try:
        filters = Filters.from_args(args)
    except BadFilter as exc:
        return _message("Filter not understood", str(exc), 400)
    if not filters.narrowed:
        return _message("Choose deliveries first", "Filter the list (status, time, rule...) before a bulk "
                        "replay: it replays exactly the deliveries the filters select.", 400)
    return filters


def _bulk_selection(filters: Filters) -> list[Delivery]:
    """Every delivery (up to the bulk limit) the filters select, not only one page of them."""
    from dataclasses import replace

    from receiver.bulk_replay import MAX_BULK

    wide = replace(filters, limit=MAX_BULK, page=1)
    return wide.page_of(intake().deliveries)[0]


@bp.post("/bulk")
def bulk_start():  # type: ignore[no-untyped-def]
    """Start the confirmed bulk replay in the background; on to its progress page."""
    from receiver.bulk_replay import start

    filters = _bulk_filters(request.form)
    if not isinstance(filters, Filters):
        return filters
    found = _bulk_selection(filters)
    again, force = request.form.get("rematch") == "1", request.form.get("force") == "1"
    options: dict[str, Any] = {"force": force}
    if again:
        options.update(rules=intake().rules.current, service_account=intake().service_account.name())
    what = ", ".join(f"{k}={v}" for k, v in filters.to_json().items() if k not in ("limit", "page"))
    progress = start(intake().deliveries, found, what + (" (re-matched)" if again else ""), **options)
    log.info("admin ui: bulk replay %s of %d deliveries (%s) started from %s", progress.id, len(found), what,
             request.remote_addr or "-")
    return redirect(url_for(".bulk_progress", bulk_id=progress.id), 303)


@bp.get("/bulk/<bulk_id>")
def bulk_progress(bulk_id: str):  # type: ignore[no-untyped-def]
    """A bulk replay's progress bar; the page reloads itself every second until it is finished."""
    from receiver.bulk_replay import Progress

    if not bulk_id.isalnum() or len(bulk_id) > 32:
        return _message("No such bulk replay", "Unknown or expired.", 404)
    progress = Progress(intake().redis, bulk_id).read()
    if progress is None:
        return _message("No such bulk replay", "Unknown or expired.", 404)
    return _page("admin_bulk.html", progress=progress, bulk_id=bulk_id, filters=None, count=progress["total"])


@bp.get("/rules")
def rules_page():  # type: ignore[no-untyped-def]
    """The rules in force, their version, and the last refused edit of the file."""
    store = intake().rules
    return _page("admin_rules.html", rules=rules_json(store.current, intake().redactor),
                 state=intake().redactor.data(store.status()), header=stats(intake().redis))


@bp.get("/queues")
def queues_page():  # type: ignore[no-untyped-def]
    """Queues, workers, scheduled retries and dead letters (RQ's failed registry), with requeue."""
    flash = _read_flash()
    return _with_flash(_page("admin_queues.html", ops=operations(intake().redis), header=stats(intake().redis),
                             flash=flash), flash)


@bp.post("/queues/requeue")
def requeue_job():  # type: ignore[no-untyped-def]
    """Put one dead letter back on its queue (RQ's requeue); the delivery's timeline notes it."""
    job_id = (request.form.get("job_id") or "").strip()
    if not job_id or len(job_id) > 200 or not job_id.isprintable():
        return _message("No such job", "That is not a job id.", 400)
    try:
        name = requeue(intake().redis, job_id)
    except NotRequeued as exc:
        flash = {"kind": "warn", "message": str(exc)}
    else:
        flash = {"kind": "ok", "message": f"Requeued {job_id} on {name}"}
        log.info("admin ui: requeued dead letter %s on %s", job_id, name)
        delivery_id = request.form.get("delivery_id") or ""
        if valid_delivery_id(delivery_id):
            intake().deliveries.action_note(delivery_id, job_id, "requeued from the admin UI's dead letters")
    return _redirect_with_flash(url_for(".queues_page"), flash)


@bp.route("/<path:rest>", methods=["GET", "POST"])
def unknown(rest: str):  # type: ignore[no-untyped-def]
    """Anything else under ``/ui/``: a 404 page, shown only after the login check."""
    return _message("Not found", "There is no such page.", 404)


def _redirect_with_flash(target: str, flash: dict[str, str]) -> Any:
    """A 303 to ``target`` carrying a signed one-shot message for it."""
    response = redirect(target, 303)
    response.set_cookie(auth.FLASH_COOKIE, _flash_signer().dumps(flash), max_age=FLASH_SECONDS,
                        path=auth.COOKIE_PATH, httponly=True, samesite="Strict", secure=request.is_secure)
    return response


def _with_flash(page: tuple[str, int], flash: dict[str, str] | None) -> Response:
    """The page as a response that forgets the flash message it shows."""
    response = current_app.make_response(page)
    if flash is not None:
        response.delete_cookie(auth.FLASH_COOKIE, path=auth.COOKIE_PATH, httponly=True, samesite="Strict")
    return response


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
