"""``cvat-hooks register`` / ``unregister`` / ``webhooks list``: the CVAT webhooks that feed this receiver.

Decisions, and why:

* **Idempotent by target URL.** Running ``register`` again finds the webhook of that project or
  organization with the same target URL and updates its events and ``is_active`` instead of adding a
  second one (two webhooks would deliver everything twice). Its secret is kept unless asked to rotate:
  CVAT never shows a secret back, so the one the receiver holds stays right.
* **Exactly the events the rules need** (``RuleSet.events_needed``), checked against what CVAT offers
  for the webhook type (``GET /api/webhooks/events``): fewer deliveries to verify, store and ignore.
* **The secret goes where the receiver reads it**, before CVAT can sign anything with it: appended to
  the secrets file (atomically, mode 0600) that running receivers re-read (``receiver.secrets_store``).
  A rotation therefore never rejects a delivery: the old and the new secret are both accepted until
  someone deletes the old line. Nothing is rolled back when CVAT's answer is lost: the webhook may
  well have been created with (or switched to) the new secret, and removing it would break it.
"""

from __future__ import annotations

import secrets as _secrets
import time
from dataclasses import dataclass
from pathlib import Path

from receiver import cvat_events
from receiver.rules import RulesError, load_rules
from receiver.secrets_store import add_secret
from workers.cvat_webhooks import (
    DESCRIPTION,
    PROJECT,
    Scope,
    Webhook,
    WebhookGateway,
    context_of,
    receiver_url,
    visible_webhooks,
    webhooks_in,
)

SECRET_BYTES = 32
"""Random bytes in a generated secret (43 URL-safe characters; CVAT stores up to 64)."""


class RegistrationError(ValueError):
    """A request ``register``/``unregister`` cannot carry out; the message says what to change."""


@dataclass(frozen=True)
class Registration:
    """What ``register`` did."""

    webhook: Webhook
    created: bool
    secret: str | None
    """The new secret (a new webhook, or a rotation): shown once. ``None`` when the secret was kept."""
    secrets_file: Path
    dropped: tuple[str, ...] = ()
    """Events the rules need that this type of webhook cannot send (e.g. ``create:project`` for a project)."""
    duplicates: tuple[int, ...] = ()
    """Other webhooks of the same scope and target URL (left alone; each delivers everything again)."""


def needed_events(rules_path: Path) -> set[str]:
    """The CVAT events the rules file listens to."""
    try:
        return load_rules(rules_path).events_needed()
    except RulesError as exc:
        raise RegistrationError(f"{rules_path}: the rules do not load (`cvat-hooks rules check`):\n{exc}"
                                ) from exc
    except OSError as exc:
        raise RegistrationError(f"{rules_path}: {exc.strerror or exc} (set CVAT_HOOKS_RULES)") from exc


def choose_events(gateway: WebhookGateway, kind: str, needed: set[str] | None) -> tuple[list[str], list[str]]:
    """The events to subscribe to (all of the type's when ``needed`` is ``None``), and the needed ones
    this type cannot send. CVAT's own list wins; our list of CVAT's events is the fallback."""
    offered = gateway.webhook_events(kind)
    if offered is None:
        offered = list(cvat_events.PROJECT_EVENTS if kind == PROJECT else cvat_events.ORGANIZATION_EVENTS)
    if needed is None:
        return sorted(set(offered)), []
    events, dropped = sorted(needed & set(offered)), sorted(needed - set(offered))
    if not events:
        what = ", ".join(dropped) or "no events at all"
        raise RegistrationError(f"the rules listen to {what}, which a {kind} webhook cannot send "
                                "(use --org for organization events, or --all)")
    return events, dropped


def register(gateway: WebhookGateway, scope: Scope, public_url: str, *, needed: set[str] | None,
             secrets_file: Path, rotate_secret: bool = False) -> Registration:
    """Create or update the webhook of ``scope`` that posts to ``public_url``'s receiver.

    ``needed`` is the events to subscribe to (``None``: every event of the webhook type).
    """
    try:
        target = receiver_url(public_url)
    except ValueError as exc:
        raise RegistrationError(str(exc)) from exc
    context = context_of(gateway, scope)
    events, dropped = choose_events(gateway, scope.kind, needed)
    same = [w for w in webhooks_in(gateway, scope, context) if w.target_url == target]
    if not same:
        secret = _new_secret(secrets_file, f"{scope} -> {target}")
        fields = {"target_url": target, "description": DESCRIPTION, "type": scope.kind,
                  "content_type": "application/json", "secret": secret, "is_active": True,
                  "enable_ssl": target.startswith("https://"), "events": events}
        if scope.project_id is not None:
            fields["project_id"] = scope.project_id
        created = gateway.create_webhook(fields, org=context.org, org_id=context.org_id)
        webhook = Webhook.from_json(created, org_slug=scope.org)
        return Registration(webhook, True, secret, secrets_file, tuple(dropped))
    existing, *others = same
    changes: dict[str, object] = {"events": events, "is_active": True}
    rotated: str | None = None
    if rotate_secret:
        # The receivers accept the new secret before CVAT signs with it (see the module docstring).
        rotated = _new_secret(secrets_file, f"webhook {existing.id} ({scope}) -> {target}")
        changes["secret"] = rotated
    updated = gateway.update_webhook(existing.id, changes)
    webhook = Webhook.from_json(updated, org_slug=scope.org)
    return Registration(webhook, False, rotated, secrets_file, tuple(dropped), tuple(w.id for w in others))


def unregister(gateway: WebhookGateway, scope: Scope, url: str | None = None) -> list[Webhook]:
    """Delete the scope's webhooks that target ``url`` (a public or full target URL), or, without
    one, every cvat-hooks webhook of the scope. Returns what was deleted."""
    hooks = webhooks_in(gateway, scope)
    if url is not None:
        try:
            wanted = {url.strip(), receiver_url(url)}
        except ValueError as exc:
            raise RegistrationError(str(exc)) from exc
        doomed = [w for w in hooks if w.target_url in wanted]
        if not doomed:
            raise RegistrationError(f"no webhook of {scope} targets {receiver_url(url)}")
    else:
        doomed = [w for w in hooks if w.is_ours]
        if not doomed:
            raise RegistrationError(f"no cvat-hooks webhook in {scope}")
    for webhook in doomed:
        gateway.delete_webhook(webhook.id)
    return doomed


def list_webhooks(gateway: WebhookGateway) -> list[Webhook]:
    """Every webhook visible to the credentials (``Webhook.is_ours`` marks cvat-hooks' own)."""
    return visible_webhooks(gateway)


def _new_secret(secrets_file: Path, note: str) -> str:
    """A strong secret, already stored where the receivers read it."""
    secret = _secrets.token_urlsafe(SECRET_BYTES)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        add_secret(secrets_file, secret, f"{note}, added {stamp}")
    except OSError as exc:
        raise RegistrationError(f"cannot write the secrets file {secrets_file}: {exc.strerror or exc} (set "
                                "CVAT_HOOKS_SECRET_FILE or CVAT_HOOKS_DATA_DIR to a writable place)") from exc
    return secret


def describe(done: Registration) -> list[str]:
    """What ``register`` tells the user (the secret, shown this once, included)."""
    hook = done.webhook
    verb = "created" if done.created else "updated"
    lines = [f"{verb} webhook {hook.id} ({hook.where}) -> {hook.target_url}",
             f"events ({len(hook.events)}): {', '.join(hook.events)}"]
    if done.dropped:
        lines.append(f"warning: a {hook.type} webhook cannot send {', '.join(done.dropped)} "
                     "(register an organization webhook for those)")
    for other in done.duplicates:
        lines.append(f"warning: webhook {other} targets the same URL (each event arrives twice; the receiver "
                     f"dedupes): `cvat-hooks unregister` removes both, then register again")
    if done.secret is None:
        lines.append("secret: unchanged (CVAT does not show it; --rotate-secret sets a new one)")
    else:
        lines.append(f"secret, added to {done.secrets_file} (running receivers pick it up; shown only now):")
        lines.append(f"    {done.secret}")
        if not done.created:
            lines.append(f"the previous secret stays accepted: once `cvat-hooks ping --webhook {hook.id}` "
                         f"succeeds, delete its line from {done.secrets_file} (the newest line for this "
                         "webhook is the current one)")
    lines.append(f"check it: cvat-hooks ping --webhook {hook.id}")
    return lines
