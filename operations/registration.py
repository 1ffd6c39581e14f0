"""``cvat-hooks register`` / ``unregister`` / ``webhooks list``: the CVAT webhooks that feed this receiver.

Decisions, and why:

* **Idempotent by target URL.** Running ``register`` again finds the webhook of that project,
  organization or server with the same target URL and updates its events and ``is_active`` instead of
  adding a second one (two webhooks would deliver everything twice). Its secret is kept unless asked to
  rotate: CVAT never shows a secret back, so the one the receiver holds stays right.
* **Remembered by this deployment** (``operations.webhook_registry``): the webhook ``register`` creates or
  finds is remembered in this deployment's Redis and marked ``cvat-hooks <deployment id>`` in CVAT;
  ``reconcile``, ``ping`` and ``unregister`` act only on those, never on another deployment's. A
  webhook found by its target URL but made before (plain ``cvat-hooks``) or marked by another
  deployment is *adopted*. Redis is checked first: if it cannot be reached, nothing changes in CVAT
  (a webhook this deployment cannot remember would be one reconcile never covers).
* **Server webhooks** (``--server``, CVAT 2.76+) are refused with the CVAT version when CVAT has no
  such type (2.73 answers 400 to ``GET /api/webhooks/events?type=server``).
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
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from core import cvat_events
from core.errors import ActionError
from operations import webhook_registry as registry
from operations.cvat_webhooks import (
    ORGANIZATION,
    PROJECT,
    SERVER,
    SERVER_SINCE,
    Scope,
    Webhook,
    WebhookGateway,
    context_of,
    is_not_found,
    receiver_url,
    version_of,
    visible_webhooks,
    webhooks_in,
)
from operations.webhook_registry import Known, Ownership
from receiver.rules import RulesError, load_rules
from receiver.secrets_store import add_secret

if TYPE_CHECKING:
    from redis import Redis

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
    adopted: Ownership | None = None
    """Whose the webhook was before this ``register`` adopted it (``None``: already this deployment's)."""
    previous_description: str = ""


@dataclass(frozen=True)
class Unregistration:
    """What ``unregister`` did."""

    deleted: tuple[Webhook, ...]
    left_alone: tuple[tuple[Webhook, Ownership], ...] = ()
    """cvat-hooks webhooks of the scope that are not this deployment's."""


def needed_events(rules_path: Path) -> set[str]:
    """The CVAT events the rules file listens to."""
    try:
        return load_rules(rules_path).events_needed()
    except RulesError as exc:
        raise RegistrationError(f"{rules_path}: the rules do not load (`cvat-hooks rules check`):\n{exc}"
                                ) from exc
    except OSError as exc:
        raise RegistrationError(f"{rules_path}: {exc.strerror or exc} (set CVAT_HOOKS_RULES)") from exc


FALLBACK_EVENTS = {PROJECT: cvat_events.PROJECT_EVENTS, ORGANIZATION: cvat_events.ORGANIZATION_EVENTS,
                   SERVER: cvat_events.SERVER_EVENTS}
"""Our list of what each type can send, for a CVAT that cannot say (no ``/api/webhooks/events``)."""


def choose_events(gateway: WebhookGateway, kind: str, needed: set[str] | None) -> tuple[list[str], list[str]]:
    """The events to subscribe to (all of the type's when ``needed`` is ``None``), and the needed ones
    this type cannot send. CVAT's own list wins; our list of CVAT's events is the fallback."""
    try:
        offered = gateway.webhook_events(kind)
    except ActionError as exc:
        if kind == SERVER:  # CVAT before 2.76 answers 400: "Incorrect value of type parameter"
            raise RegistrationError(no_server_webhooks(gateway)) from exc
        raise
    if offered is None:
        if kind == SERVER:  # a CVAT without the events endpoint is far older than server webhooks
            raise RegistrationError(no_server_webhooks(gateway))
        offered = list(FALLBACK_EVENTS[kind])
    if needed is None:
        return sorted(set(offered)), []
    events, dropped = sorted(needed & set(offered)), sorted(needed - set(offered))
    if not events:
        what = ", ".join(dropped) or "no events at all"
        hint = "use --server for user events, or --all" if kind == SERVER else \
            "use --org for organization events, --server for user events, or --all"
        raise RegistrationError(f"the rules listen to {what}, which a {kind} webhook cannot send ({hint})")
    return events, dropped


def no_server_webhooks(gateway: WebhookGateway) -> str:
    """Why ``--server`` cannot work here, naming the CVAT version."""
    try:
        version = str(gateway.server_about().get("version") or "unknown")
    except ActionError:
        version = "unknown"
    needs = ".".join(map(str, SERVER_SINCE))
    return f"this CVAT (version {version}) has no server webhooks (needs {needs} or newer)"


def register(gateway: WebhookGateway, scope: Scope, public_url: str, *, needed: set[str] | None,
             secrets_file: Path, redis: Redis, rotate_secret: bool = False) -> Registration:
    """Create or update the webhook of ``scope`` that posts to ``public_url``'s receiver, and remember
    it as this deployment's (in ``redis``).

    ``needed`` is the events to subscribe to (``None``: every event of the webhook type). Raises
    ``RegistrationError`` before anything changes in CVAT if Redis cannot be reached.
    """
    try:
        target = receiver_url(public_url)
    except ValueError as exc:
        raise RegistrationError(str(exc)) from exc
    try:
        deployment = registry.ensure_deployment(redis)
        known = registry.load(redis)
    except RedisError as exc:
        raise RegistrationError(f"this deployment's Redis cannot be reached ({type(exc).__name__}: {exc}); "
                                "register remembers its webhooks there, so nothing was changed in CVAT "
                                "(check CVAT_HOOKS_REDIS_URL)") from exc
    description = registry.description(deployment)
    context = context_of(gateway, scope)
    events, dropped = choose_events(gateway, scope.kind, needed)
    in_scope = webhooks_in(gateway, scope, context)
    _forget_gone(redis, known, scope, in_scope)
    # This deployment's own first, then the oldest: the one to keep is the one already remembered.
    same = sorted((w for w in in_scope if w.target_url == target),
                  key=lambda w: (known.ownership(w) is not Ownership.THIS, w.id))
    if not same:
        secret = _new_secret(secrets_file, f"{scope} -> {target}")
        fields = {"target_url": target, "description": description, "type": scope.kind,
                  "content_type": "application/json", "secret": secret, "is_active": True,
                  "enable_ssl": target.startswith("https://"), "events": events}
        if scope.project_id is not None:
            fields["project_id"] = scope.project_id
        try:
            created = gateway.create_webhook(fields, org=context.org, org_id=context.org_id)
        except ActionError as exc:
            raise _refused(gateway, scope, exc) from exc
        webhook = Webhook.from_json(created, org_slug=scope.org)
        _remember(redis, webhook, scope)
        return Registration(webhook, True, secret, secrets_file, tuple(dropped))
    existing, *others = same
    owner = known.ownership(existing)
    changes: dict[str, object] = {"events": events, "is_active": True, "description": description}
    rotated: str | None = None
    if rotate_secret:
        # The receivers accept the new secret before CVAT signs with it (see the module docstring).
        rotated = _new_secret(secrets_file, f"webhook {existing.id} ({scope}) -> {target}")
        changes["secret"] = rotated
    updated = gateway.update_webhook(existing.id, changes)
    webhook = Webhook.from_json(updated, org_slug=scope.org)
    _remember(redis, webhook, scope)
    return Registration(webhook, False, rotated, secrets_file, tuple(dropped), tuple(w.id for w in others),
                        adopted=None if owner is Ownership.THIS else owner,
                        previous_description=existing.description)


def _remember(redis: Redis, webhook: Webhook, scope: Scope) -> None:
    try:
        registry.remember(redis, webhook, scope)
    except RedisError as exc:
        raise RegistrationError(f"webhook {webhook.id} ({scope}) is set in CVAT, but this deployment's Redis "
                                f"failed to remember it ({type(exc).__name__}: {exc}): run `cvat-hooks "
                                "register` again once Redis is back, or reconcile will not cover it") from exc


def _refused(gateway: WebhookGateway, scope: Scope, exc: ActionError) -> Exception:
    """CVAT's refusal to create a webhook, explained when it is about the server type."""
    if scope.kind != SERVER:
        return exc
    version = None
    try:
        version = version_of(gateway.server_about())
    except ActionError:
        pass
    message = str(exc)
    refused_type = ": 400 " in message and '"type"' in message and "not a valid choice" in message
    if (version is not None and version < SERVER_SINCE) or refused_type:
        return RegistrationError(no_server_webhooks(gateway))
    if ": 403 " in message:
        return RegistrationError(f"{exc} (server webhooks need a CVAT administrator's credentials)")
    return exc


def _forget_gone(redis: Redis, known: Known, scope: Scope, in_scope: list[Webhook]) -> list[int]:
    """Forget this deployment's webhooks of ``scope`` that CVAT no longer lists there (deleted)."""
    listed = {w.id for w in in_scope}
    gone = [r.id for r in known.webhooks.values() if r.scope == scope and r.id not in listed]
    return registry.forget(redis, gone)


def unregister(gateway: WebhookGateway, scope: Scope, redis: Redis, url: str | None = None) -> Unregistration:
    """Delete this deployment's webhooks of ``scope`` that target ``url`` (a public or full target URL),
    or, without one, all of this deployment's webhooks there; forget them. Another deployment's, and
    cvat-hooks webhooks this deployment never registered, are left alone (and reported)."""
    try:
        known = registry.load(redis)
    except RedisError as exc:
        raise RegistrationError(f"this deployment's Redis cannot be reached ({type(exc).__name__}: {exc}): "
                                "it knows which webhooks are this deployment's; nothing was deleted") from exc
    hooks = webhooks_in(gateway, scope)
    _forget_gone(redis, known, scope, hooks)
    others = tuple((w, known.ownership(w)) for w in hooks
                   if known.ownership(w) in (Ownership.OTHER, Ownership.UNADOPTED))
    mine = known.mine(hooks)
    if url is not None:
        try:
            wanted = {url.strip(), receiver_url(url)}
        except ValueError as exc:
            raise RegistrationError(str(exc)) from exc
        doomed = [w for w in mine if w.target_url in wanted]
        if not doomed:
            theirs = [(w, o) for w, o in others if w.target_url in wanted]
            if theirs:
                hook, owner = theirs[0]
                raise RegistrationError(f"webhook {hook.id} of {scope} targets {receiver_url(url)}, but it is "
                                        f"not this deployment's ({owner.label(hook)}); left alone")
            raise RegistrationError(f"no webhook of {scope} targets {receiver_url(url)}")
        others = tuple((w, o) for w, o in others if w.target_url in wanted)
    else:
        doomed = mine
        if not doomed:
            note = f" ({len(others)} other cvat-hooks webhook(s) there left alone)" if others else ""
            raise RegistrationError(f"no webhook of this deployment in {scope}{note}")
    for webhook in doomed:
        try:
            gateway.delete_webhook(webhook.id)
        except ActionError as exc:
            if not is_not_found(exc):
                raise
        registry.forget(redis, [webhook.id])
    return Unregistration(tuple(doomed), others)


def list_webhooks(gateway: WebhookGateway) -> list[Webhook]:
    """Every webhook visible to the credentials (``operations.webhook_registry.Known.ownership`` says whose)."""
    return visible_webhooks(gateway)


def unadopted_hint(hook: Webhook) -> str:
    """The ``register`` command that adopts a cvat-hooks webhook this deployment does not know."""
    scope = {PROJECT: f"--project {hook.project_id}", SERVER: "--server"}.get(
        hook.type, f"--org {hook.org_slug or '<slug>'}")
    return f"cvat-hooks register {scope} --url {hook.target_url}"


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
    verb = "created" if done.created else "adopted" if done.adopted is not None else "updated"
    lines = [f"{verb} webhook {hook.id} ({hook.where}) -> {hook.target_url}",
             f"events ({len(hook.events)}): {', '.join(hook.events)}",
             f"remembered as this deployment's (description in CVAT: {hook.description!r})"]
    if done.adopted is Ownership.OTHER:
        lines.append(f"warning: it was marked as another cvat-hooks deployment's ({done.previous_description!r}); "
                     "that deployment no longer treats it as its own")
    elif done.adopted is not None:
        lines.append("it was registered before cvat-hooks told deployments apart: reconcile, ping and "
                     "unregister now cover it")
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
