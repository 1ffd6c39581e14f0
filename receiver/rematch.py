"""Re-judge a recorded delivery with the rules in force now, and queue what matches now.

After a rule is fixed, the deliveries it missed (or whose action it got wrong) can be run again:
``cvat-hooks deliveries replay ID --rematch``, the UI's "Re-match" button, and the bulk replays.

The event is rebuilt from the payload the delivery log kept (the delivery id stays the same: it is
the hash of that payload). Transitions (``became``/``changed``/``was``) are judged from the payload
alone, as ``rules test`` does: what the receiver had last seen of the resource then is gone. New runs
get run numbers past every recorded run of the same action (new job ids, same delivery); an action
of a matching rule that is still queued or running is never doubled, and one whose latest run
succeeded is only run again with ``force``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from core.contract import ActionCall
from core.delivery_log import ActionStatus, Delivery, DeliveryLog, Outcome
from core.events import BadEvent, canonical, parse_event
from core.replay import IN_FLIGHT, NothingToReplay, Refusal, Remedy, next_run, queue_runs
from receiver.dispatch import calls_for
from receiver.rules import Explanation, RuleSet, explain, previous_without_state


@dataclass(frozen=True)
class Rematch:
    """What re-judging a delivery with the current rules found, and what it queued."""

    delivery_id: str
    version: str
    """The rules' version (first 12 hex digits of their digest) that judged it."""
    verdicts: list[Explanation]
    job_ids: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """Why matching actions were not queued (still running, already succeeded)."""

    def to_json(self) -> dict[str, Any]:
        """As the admin API answers it."""
        return {"delivery_id": self.delivery_id, "rules_version": self.version, "jobs": self.job_ids,
                "not_queued": self.kept,
                "rules": [{"rule_id": v.rule_id, "matched": v.matched, "reasons": list(v.reasons)}
                          for v in self.verdicts]}


def judge(delivery: Delivery, rules: RuleSet, *, service_account: str | None = None,
          now: datetime | None = None) -> tuple[Any, list[Explanation]]:
    """The event rebuilt from the kept payload, and every rule's verdict on it now (with reasons)."""
    if delivery.record.get("outcome") == Outcome.PING:
        raise NothingToReplay(delivery.id, Refusal("it is a ping: no rule judges a ping"))
    payload = delivery.record.get("payload")
    if not isinstance(payload, dict):
        raise NothingToReplay(delivery.id, Refusal("its payload was not kept, it cannot be judged again"))
    try:
        event = dataclasses.replace(parse_event(canonical(payload)), delivery_id=delivery.id)
    except BadEvent as exc:
        raise NothingToReplay(delivery.id, Refusal(f"its payload cannot be read again: {exc}")) from exc
    verdicts = explain(rules, event, previous_without_state(event), now or datetime.now(UTC),
                       service_account=service_account)
    return event, verdicts


def rematch(log: DeliveryLog, delivery: Delivery, rules: RuleSet, *, force: bool = False,
            service_account: str | None = None, dry_run: bool = False) -> Rematch:
    """Judge ``delivery`` with ``rules`` and queue a new run of every action that matches now.

    Raises :class:`NothingToReplay` (saying why, with each rule's reasons) when nothing would run.
    """
    event, verdicts = judge(delivery, rules, service_account=service_account)
    matches = [v.match for v in verdicts if v.matched and v.match is not None]
    latest = {(a["rule_id"], int(a["index"])): a for a in delivery.latest_actions()}
    calls: list[ActionCall] = []
    kept: list[str] = []
    succeeded = False
    for call in calls_for(event, matches):
        before = latest.get((call.rule_id, call.index))
        if before is not None:
            status = ActionStatus(before["status"])
            if status in IN_FLIGHT:
                kept.append(f"rule {call.rule_id} action {call.index}: still {status.value}")
                continue
            if status in (ActionStatus.SUCCEEDED, ActionStatus.SKIPPED) and not force:
                kept.append(f"rule {call.rule_id} action {call.index}: already {status.value}")
                succeeded = True
                continue
        calls.append(dataclasses.replace(call, run=next_run(delivery, call.rule_id, call.index)))
    version = rules.digest[:12]
    if not calls:
        errors = [f"{v.rule_id}: {e}" for v in verdicts if v.match is not None for e in v.match.errors]
        why = "; ".join(kept + errors) or "no rule matches it now: " + "; ".join(
            f"{v.rule_id}: {v.reasons[-1] if v.reasons else 'no match'}" for v in verdicts)
        raise NothingToReplay(delivery.id, Refusal(f"nothing to run with rules version {version}: {why}",
                                                   Remedy.FORCE if succeeded else None))
    if dry_run:
        return Rematch(delivery.id, version, verdicts, [c.job_id for c in calls], kept)
    job_ids = queue_runs(log, calls, lambda c: f"re-matched with rules version {version}: run {c.run} of "
                                               f"{c.action} (rule {c.rule_id})")
    return Rematch(delivery.id, version, verdicts, job_ids, kept)
