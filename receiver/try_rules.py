"""``cvat-hooks rules test``: what the receiver would decide for a payload, without Redis or queues."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from core.events import BadEvent, parse_event
from receiver.rules import RuleSet, explain, previous_without_state
from receiver.rules.own_events import caused_by


def explain_payload(ruleset: RuleSet, body: bytes, *, now: datetime | None = None,
                    service_account: str | None = None) -> dict[str, Any]:
    """Every rule's verdict for one body, with reasons and rendered actions (ValueError if unreadable).

    Transitions come from the payload alone (CVAT's ``before_update``/``changes``), as there is no
    last-seen state here; a ``create:*`` event counts as a change from nothing. ``service_account``
    is cvat-hooks's own CVAT username, as the receiver would know it (``None``: unknown).
    """
    try:
        event = parse_event(body)
    except BadEvent as exc:
        raise ValueError(f"not a CVAT event: {exc}") from exc
    previous = previous_without_state(event)
    rules = []
    verdicts = explain(ruleset, event, previous, now or datetime.now(UTC), service_account=service_account)
    for verdict in verdicts:
        entry: dict[str, Any] = {"rule_id": verdict.rule_id, "matched": verdict.matched,
                                 "reasons": list(verdict.reasons)}
        if verdict.match is not None:
            entry["actions"] = [{"index": a.index, "action": a.action, "params": a.params, "queue": a.queue}
                                for a in verdict.match.actions]
            entry["errors"] = list(verdict.match.errors)
        rules.append(entry)
    return {"event": event.name, "delivery_id": event.delivery_id, "transitions": previous.source,
            "service_account": service_account, "caused_by_cvat_hooks": caused_by(event.payload, service_account),
            "rules": rules}
