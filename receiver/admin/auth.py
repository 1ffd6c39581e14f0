"""Who may use the admin API and UI: the holder of ``CVAT_HOOKS_ADMIN_TOKEN``, and nobody else.

- Never open by default: without an admin token both answer 404 saying what to set; an admin token
  equal to a webhook secret is refused too (issue 6: the webhook secret must not open them).
- The API takes ``Authorization: Bearer <token>`` only. It ignores cookies, so a page on another
  site cannot make a logged-in browser call it (no CSRF surface on the API).
- The UI logs in once with a form and keeps a cookie ``v1.<issued>.<nonce>.<mac>`` where ``mac`` is
  an HMAC keyed with the token: the token is never stored in the browser, changing the token ends
  every session, and sessions expire after :data:`SESSION_SECONDS`. The CSRF token of POST forms is
  another HMAC of the session's nonce, so it needs no server-side state and dies with the session.
- Every comparison is :func:`hmac.compare_digest` of SHA-256 digests (no timing, not even the length).
- Tokens are never logged or echoed; failures say only what kind of failure it was.
- A token shorter than :data:`MIN_TOKEN_CHARS` keeps both closed (security issue, item 10: ``x``
  was accepted), and :data:`MAX_FAILURES` wrong tokens from one client address within
  :data:`FAILURE_WINDOW` seconds make every further try from it a 429 until the window ends (the
  right token too: otherwise guesses would still be checked). The count lives in Redis, so all
  gunicorn workers and receivers share it (a per-process count would multiply the allowance by the
  number of processes); without Redis a failure is not counted, and nothing else works either.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from werkzeug.exceptions import TooManyRequests

from core.keys import ADMIN_FAILURES_KEY as FAILURE_KEY

if TYPE_CHECKING:
    from redis import Redis

    from receiver.settings import Settings

SESSION_COOKIE = "cvh_admin"
"""Name of the UI's session cookie."""
FLASH_COOKIE = "cvh_flash"
"""Name of the one-shot cookie carrying a message to the page a POST redirects to."""
COOKIE_PATH = "/ui/"
"""The cookies are only ever sent to the UI (never to the webhook endpoint or the API)."""
SESSION_SECONDS = 12 * 3600
"""Seconds a UI login lasts: a working day, after which the token is asked for again."""
CLOCK_SKEW = 60
"""Seconds a session may appear to be issued in the future (several receivers, slightly apart)."""
CSRF_FIELD = "csrf_token"
"""Name of the hidden field every UI POST form carries."""
MIN_TOKEN_CHARS = 32
"""Characters an admin token needs at least (``secrets.token_urlsafe(32)`` gives 43)."""
MAX_FAILURES = 10
"""Wrong tokens one client address may send within :data:`FAILURE_WINDOW` before it gets 429s."""
FAILURE_WINDOW = 300
"""Seconds over which failures are counted (and a locked-out address waits)."""

log = logging.getLogger(__name__)


def disabled_reason(settings: Settings) -> str | None:
    """Why the admin API and UI must stay closed with these settings, or ``None`` when they may open."""
    token = settings.admin_token
    if not token:
        return ("the admin API and UI are disabled: set CVAT_HOOKS_ADMIN_TOKEN to a long random value "
                "(for example the output of `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if len(token) < MIN_TOKEN_CHARS:
        return (f"the admin API and UI are disabled: CVAT_HOOKS_ADMIN_TOKEN is shorter than {MIN_TOKEN_CHARS} "
                "characters, too easy to guess; set a long random value (for example the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if any(_same(token, secret) for secret in settings.secrets):
        return ("the admin API and UI are disabled: CVAT_HOOKS_ADMIN_TOKEN must differ from the webhook "
                "secret (CVAT_HOOKS_SECRET), which CVAT and its administrators know")
    return None


def _digest(value: str) -> bytes:
    """SHA-256 of a token, so compared values always have the same length."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _same(given: str, expected: str) -> bool:
    """Constant-time equality that does not even leak the length (both sides hashed first)."""
    return hmac.compare_digest(_digest(given), _digest(expected))


def _mac(token: str, *parts: str) -> str:
    """HMAC-SHA256 under the admin token of ``parts`` joined by ``|`` (one purpose word first)."""
    key = token.encode("utf-8", "surrogatepass")
    return hmac.new(key, "|".join(parts).encode(), hashlib.sha256).hexdigest()


def _client() -> tuple[Redis | None, str]:
    """The Redis of the running app and the client address (outside a request: none, ``-``)."""
    from flask import current_app, has_request_context, request

    if not has_request_context():
        return None, "-"
    intake = current_app.extensions.get("cvat_hooks")
    return getattr(intake, "redis", None), request.remote_addr or "-"


def _throttled(check: bool) -> bool:
    """Run one token check under the per-address failure limit: 429 (``TooManyRequests``) while the
    address is locked out, else the check's verdict, a failure counted."""
    redis, client = _client()
    if redis is None:
        return check
    key = FAILURE_KEY + client
    try:
        failures = int(redis.get(key) or 0)
        if failures >= MAX_FAILURES:
            wait = max(int(redis.ttl(key)), 1)
            log.warning("admin: %s locked out after %d wrong tokens (%d s left)", client, failures, wait)
            raise TooManyRequests(f"too many wrong admin tokens from this address: try again in {wait} s",
                                  retry_after=wait)
        if not check:
            with redis.pipeline() as pipe:
                pipe.incr(key)
                pipe.expire(key, FAILURE_WINDOW, nx=True)
                pipe.execute()
    except RedisError:
        pass  # nothing to count with; the admin pages need Redis and say it is down
    return check


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries the admin token as a Bearer token (throttled)."""
    scheme, _, given = (header or "").strip().partition(" ")
    ok = scheme.lower() == "bearer" and bool(given.strip()) and _same(given.strip(), token)
    return _throttled(ok)


def token_ok(given: str | None, token: str) -> bool:
    """Whether the token typed into the login form is the admin token (throttled)."""
    return _throttled(bool(given) and _same(given.strip(), token))  # type: ignore[union-attr]


def new_session(token: str, *, now: float | None = None) -> str:
    """A fresh session cookie value: issue time, a random nonce, and their HMAC under the token."""
    issued = str(int(now if now is not None else time.time()))
    nonce = secrets.token_urlsafe(18)
    return f"v1.{issued}.{nonce}.{_mac(token, 'session', 'v1', issued, nonce)}"


def session_nonce(cookie: str | None, token: str, *, now: float | None = None) -> str | None:
    """The nonce of a valid, unexpired session cookie, else ``None`` (forged, expired, old token)."""
    parts = (cookie or "").split(".")
    if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
        return None
    _, issued, nonce, mac = parts
    if not _same(mac, _mac(token, "session", "v1", issued, nonce)):
        return None
    age = (now if now is not None else time.time()) - int(issued)
    if not -CLOCK_SKEW <= age <= SESSION_SECONDS:
        return None
    return nonce


def csrf_token(token: str, nonce: str) -> str:
    """The CSRF token of a session: only someone who can read our pages (same origin) knows it."""
    return _mac(token, "csrf", nonce)


def csrf_ok(given: str | None, token: str, nonce: str) -> bool:
    """Whether a POSTed form carries its session's CSRF token."""
    return bool(given) and _same(given, csrf_token(token, nonce))  # type: ignore[arg-type]


def flash_key(token: str) -> str:
    """The signing key of flash cookies, derived from the token so no other secret is needed."""
    return _mac(token, "flash-key")


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a UI path of ours, never another site (no open redirect)."""
    if (target and target.startswith(COOKIE_PATH) and target.isprintable() and "//" not in target
            and "\\" not in target):
        return target
    return COOKIE_PATH
