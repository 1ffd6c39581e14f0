"""Events cvat-hooks caused itself, and the guard that keeps a rule from firing on its own echo.

Actions change CVAT, and CVAT reports every change to the webhooks: ``update_job`` on ``update:job``
would move the job, hear that it moved, and move it again. A webhook payload names the CVAT user
behind the change: ``sender`` for resource events, ``request.owner`` for ``completed:request[...]``
(which has no ``sender``; see ``shared/cvat-payloads/README.md``). When that user is cvat-hooks's
own account, a rule does not fire on an event one of its own actions can cause
(``workers.actions.ActionSpec.causes``), unless it says ``allow_self_trigger: true``. Other rules
still fire: rule A's ``update_job`` moving a job to acceptance still starts rule B's export.

All pure: the account is an input (``None`` when unknown: the guard is then off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.cvat_events import matches
from receiver.rules.model import ActionDecl, Rule

CONTEXT_KEY = "caused_by_cvat_hooks"
"""The top-level value conditions can test, like ``project_id``: ``true`` when the event was caused
by cvat-hooks's own CVAT account, ``false`` otherwise (and whenever that account is unknown)."""
OPT_OUT_KEY = "allow_self_trigger"
"""The rule key that turns the guard off for one rule."""
RECOMMENDATION = ("give the workers a CVAT user of their own (e.g. cvat-hooks-bot) and set "
                  "CVAT_HOOKS_SERVICE_ACCOUNT, so their changes are recognisable")


def actor_of(payload: Mapping[str, Any]) -> str | None:
    """The username of the CVAT user whose action the event reports, if the payload says."""
    for holder, key in (("sender", None), ("request", "owner")):
        value = payload.get(holder)
        if key is not None and isinstance(value, Mapping):
            value = value.get(key)
        if isinstance(value, Mapping):
            name = value.get("username")
            if isinstance(name, str) and name:
                return name
    return None


def caused_by(payload: Mapping[str, Any], account: str | None) -> bool:
    """Whether the event was caused by ``account``; ``False`` when either is unknown.

    Compared without case: CVAT logs users in without case, and a configured ``CVAT_USERNAME`` may
    be spelled otherwise than CVAT stores it.
    """
    if not account:
        return False
    actor = actor_of(payload)
    return actor is not None and actor.casefold() == account.casefold()


def looping_action(rule: Rule, event_name: str) -> ActionDecl | None:
    """The first action of the rule that can cause this very event, if any."""
    return next((decl for decl in rule.actions if event_name in decl.causes), None)


def guard(rule: Rule, event_name: str, own: bool, account: str | None) -> tuple[bool, str | None]:
    """Whether the guard stops the rule for this event, and the reason to record (``None``: nothing to say).

    Only a rule that could trigger itself with this event is concerned; for it, the reason says why
    it was stopped, why it was not (the opt-out), or that it could not be told (account unknown).
    """
    decl = looping_action(rule, event_name)
    if decl is None or (account and not own):
        return False, None
    cause = f"this rule's action {decl.action} causes {event_name}"
    if not account:
        return False, f"loop guard off: cvat-hooks's own CVAT account is unknown ({cause})"
    if rule.allow_self_trigger:
        return False, (f"caused by cvat-hooks's own CVAT account ({account}) and {cause}, "
                       f"not skipped: {OPT_OUT_KEY} is true")
    return True, f"not matched: caused by cvat-hooks's own CVAT account ({account}) and {cause}"


def self_trigger_warning(rule: Rule) -> str | None:
    """For ``rules check``: how the rule's actions can trigger the rule itself, and what guards it."""
    loops = []
    for decl in rule.actions:
        heard = [event for event in decl.causes if any(matches(pattern, event) for pattern in rule.on)]
        if heard:
            loops.append(f"action #{decl.index + 1} ({decl.action}) causes {', '.join(heard)}")
    if not loops:
        return None
    what = f"can trigger itself: {'; '.join(loops)}, which its 'on' listens to"
    if rule.allow_self_trigger:
        return (f"{what}; {OPT_OUT_KEY} is true, so only its 'if' can stop a loop "
                f"(e.g. '{CONTEXT_KEY}: false', or a transition such as 'became')")
    return (f"{what}; such events are skipped only when cvat-hooks knows its own CVAT account "
            f"(CVAT_HOOKS_SERVICE_ACCOUNT, CVAT_USERNAME, or learned by the workers from CVAT): "
            f"{RECOMMENDATION}")
