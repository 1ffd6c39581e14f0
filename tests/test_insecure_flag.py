"""``CVAT_HOOKS_INSECURE_NO_SIGNATURE`` never weakens a configured secret (security issue, item 9)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from receiver.app import create_app
from receiver.secrets_store import SecretStore, add_secret
from receiver.settings import Settings
from receiver.signature import Verdict, sign
from tests.conftest import SECRET, capture, post, signed, with_settings

WRONG = [
    # (id, headers) -- each must be refused whenever a secret exists, flag or not
    ("wrong-secret", lambda body: signed(body, "not-the-secret")),
    ("unsigned", lambda body: {"Content-Type": "application/json"}),
    ("malformed", lambda body: {"X-Signature-256": "sha256=zz", "Content-Type": "application/json"}),
]


@pytest.mark.parametrize("headers", [h for _, h in WRONG], ids=[i for i, _ in WRONG])
def test_flag_with_a_secret_still_checks_signatures(settings: Settings, redis, headers) -> None:
    """With a secret configured, the insecure flag does not let a bad or missing signature in."""
    client = create_app(with_settings(settings, insecure_no_signature=True)).test_client()
    body, _ = capture("create_task.json")
    assert post(client, body, headers(body)).status_code == 401
    assert post(client, body).status_code == 202


def test_flag_from_env_with_a_secret_is_void_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    """Settings read with both a secret and the flag keep checking, and say so at start."""
    settings = Settings.from_env({"CVAT_HOOKS_SECRET": SECRET, "CVAT_HOOKS_INSECURE_NO_SIGNATURE": "1",
                                  "CVAT_HOOKS_DATA_DIR": "/nonexistent-cvat-hooks"})
    assert settings.insecure_no_signature is False
    with caplog.at_level(logging.WARNING):
        settings.require_secret()
    assert "CVAT_HOOKS_INSECURE_NO_SIGNATURE" in caplog.text and "valid signature" in caplog.text


def test_flag_without_a_secret_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    """The insecure flag alone starts, with a warning that unsigned deliveries are accepted."""
    settings = Settings.from_env({"CVAT_HOOKS_INSECURE_NO_SIGNATURE": "1",
                                  "CVAT_HOOKS_DATA_DIR": "/nonexistent-cvat-hooks"})
    with caplog.at_level(logging.WARNING):
        settings.require_secret()
    assert "unsigned deliveries are accepted" in caplog.text


def test_store_admits_unsigned_only_while_no_secret_exists(tmp_path: Path) -> None:
    """The store lets unsigned bodies in with the flag and no secret, and checks again once a
    secret is written to the secrets file (``register``) while running."""
    path = tmp_path / "webhook-secrets"
    store = SecretStore((), (path,), allow_unsigned=True, check_every=3600)
    assert store.verify(b"{}", None) is Verdict.VALID
    add_secret(path, "s3cret-value", "test")
    assert store.verify(b"{}", None) is Verdict.MISSING
    assert store.verify(b"{}", sign(b"{}", "wrong")) is Verdict.MISMATCH
    assert store.verify(b"{}", sign(b"{}", "s3cret-value")) is Verdict.VALID
