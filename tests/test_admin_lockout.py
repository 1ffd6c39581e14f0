"""The admin token must be strong, and guessing it is limited per client address (security issue, item 10)."""

from __future__ import annotations

import logging

import pytest

from receiver.admin import auth
from receiver.app import create_app
from receiver.settings import Settings
from tests.conftest import with_settings

ADMIN = "lockout-admin-token-7f3e9a1c5b2d4e6f8a0b"
RIGHT = {"Authorization": f"Bearer {ADMIN}"}
WRONG = {"Authorization": "Bearer not-the-admin-token"}


@pytest.mark.parametrize("token", ["x", "a" * 31, "correct horse battery staple"],
                         ids=["one-char", "31-chars", "passphrase-28"])
def test_short_tokens_keep_admin_closed_and_say_why_at_start(settings: Settings, token: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A token under 32 characters opens neither the API nor the UI, and start-up logs why."""
    with caplog.at_level(logging.WARNING):
        client = create_app(with_settings(settings, admin_token=token)).test_client()
    assert "shorter than 32" in caplog.text and (len(token) == 1 or token not in caplog.text)
    answer = client.get("/api/deliveries", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 404 and "shorter than 32" in answer.json["error"]
    assert client.post("/ui/login", data={"token": token}).status_code == 404


def test_api_guesses_are_limited_per_address(settings: Settings) -> None:
    """After MAX_FAILURES wrong tokens an address gets 429 (even with the right token); others do not."""
    client = create_app(with_settings(settings, admin_token=ADMIN)).test_client()
    attacker = {"REMOTE_ADDR": "192.0.2.7"}
    for _ in range(auth.MAX_FAILURES):
        assert client.get("/api/deliveries", headers=WRONG, environ_base=attacker).status_code == 401
    locked = client.get("/api/deliveries", headers=RIGHT, environ_base=attacker)
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    assert client.get("/api/deliveries", headers=RIGHT, environ_base={"REMOTE_ADDR": "192.0.2.8"}).status_code == 200


def test_ui_login_guesses_share_the_limit_across_processes(settings: Settings) -> None:
    """The count is in Redis: failures on one app (one gunicorn worker) lock the address on another."""
    one = create_app(with_settings(settings, admin_token=ADMIN)).test_client()
    two = create_app(with_settings(settings, admin_token=ADMIN)).test_client()
    attacker = {"REMOTE_ADDR": "192.0.2.9"}
    for n in range(auth.MAX_FAILURES):
        client = one if n % 2 else two
        assert client.post("/ui/login", data={"token": f"guess-{n}"}, environ_base=attacker).status_code == 401
    assert one.post("/ui/login", data={"token": ADMIN}, environ_base=attacker).status_code == 429
    assert two.get("/api/deliveries", headers=RIGHT, environ_base=attacker).status_code == 429
