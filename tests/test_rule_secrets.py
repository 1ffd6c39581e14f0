"""``${NAME}`` references in credential parameters: sealed by the receiver, resolved only by the worker."""

from __future__ import annotations

import pytest

from core.errors import PermanentError
from core.rule_secrets import unseal
from receiver.rules.templating import render, render_params
from workers.actions import notify

ENV = {"HOOK_URL": "https://hooks.example.com/services/T0/B0/s3cr3t", "TOKEN": "tok$en"}


@pytest.mark.parametrize(("template", "variables", "sealed"), [
    ("${HOOK_URL}", {}, "${HOOK_URL}"),
    ("Bearer ${TOKEN}", {}, "Bearer ${TOKEN}"),
    ("https://x.example/{task.name}?k=${TOKEN}", {"task": {"name": "a${TOKEN}b"}},
     "https://x.example/a$${TOKEN}b?k=${TOKEN}"),
    ("cost $5 for {v}", {"v": "$$"}, "cost $$5 for $$$$"),
    ("${job_id}", {"job_id": 7}, "$$7"),
], ids=["whole-url", "header", "payload-value-cannot-reference", "dollars-escaped", "lower-case-is-a-payload-path"])
def test_sealed_rendering_keeps_references_and_escapes_everything_else(
        template: str, variables: dict[str, object], sealed: str) -> None:
    """A sealed parameter keeps ``${NAME}`` as a name; every other ``$``, a payload value's above all, is escaped."""
    assert render(template, variables, sealed=True) == sealed


def test_unseal_resolves_references_and_unescapes() -> None:
    """The worker turns a sealed value back into text, reading only the names referenced."""
    rendered = render_params({"url": "https://x.example/{n}?k=${TOKEN}", "text": "$ {n}"}, {"n": "p$${TOKEN}"},
                             secret_params={"url"})
    assert rendered["text"] == "$ p$${TOKEN}"  # not sealed: rendered as before
    assert unseal(rendered["url"], ENV.get) == "https://x.example/p$${TOKEN}?k=tok$en"


@pytest.mark.parametrize(("sealed", "message"), [
    ("${MISSING}", "${MISSING} is not set in the worker's environment"),
    ("${CVAT_PASSWORD}", "${CVAT_PASSWORD}: variables named CVAT_* or AWS_* hold the service's own credentials"),
    ("${AWS_SECRET_ACCESS_KEY}", "${AWS_SECRET_ACCESS_KEY}: variables named CVAT_* or AWS_*"),
], ids=["unset", "cvat-credentials", "aws-credentials"])
def test_unseal_refuses_unset_and_service_names(sealed: str, message: str) -> None:
    """An unset name, or one of the service's own credentials, is a permanent error naming only the variable."""
    lookup = {"CVAT_PASSWORD": "pw-value-1234", "AWS_SECRET_ACCESS_KEY": "aws-value-1234"}.get
    with pytest.raises(PermanentError) as raised:
        unseal(sealed, lookup)
    assert str(raised.value).startswith(message)
    assert "value-1234" not in str(raised.value)


def test_notify_validation_refuses_service_credentials_at_load() -> None:
    """``rules.yaml`` cannot reference the CVAT password or the S3 keys in a notification."""
    problems = notify.validate({"url": "https://x.example/h?p=${CVAT_PASSWORD}", "text": "t",
                                "headers": {"X-Key": "${AWS_SECRET_ACCESS_KEY}"}})
    assert [p.split(":")[0] for p in problems] == ["${CVAT_PASSWORD}", "${AWS_SECRET_ACCESS_KEY}"]
    assert notify.validate({"url": "${HOOK_URL}", "text": "t", "headers": {"Authorization": "Bearer ${TOKEN}"}}) == []


def test_shown_parameters_keep_a_reference_and_hide_literal_credentials() -> None:
    """What people see names the variable, or shows ``scheme://host/first-segment/…`` of a literal URL."""
    assert notify.public_params({"url": "${HOOK_URL}", "text": "t"})["url"] == "${HOOK_URL}"
    assert notify.public_params({"url": ENV["HOOK_URL"], "text": "t"})["url"] == "https://hooks.example.com/services/…"
