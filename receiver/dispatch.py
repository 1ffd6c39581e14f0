"""One delivery, from raw bytes to durably queued jobs: the story the receiver tells for each POST.

verify -> parse -> duplicate? / what we last saw (one script) -> match -> record + enqueue (one
atomic script, see ``core.receipts``) -> answer.

Answers are chosen for CVAT's sender, which retries 5xx/408/429 (recent versions) and shows our
reply body in its delivery log: 401 bad signature, 400 unreadable, 200 ping / no match / duplicate,
202 queued, 503 only when the event could not be stored (so CVAT retries it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from redis import Redis
from redis.exceptions import RedisError

from core import metrics
from core.contract import ActionCall
from core.delivery_log import DeliveryLog, Outcome
from core.events import BadEvent, Event, parse_event
from core.queueing import enqueue
from core.receipts import Batch, Claim, Receipts
from core.redaction import Redactor
from core.service_account import ServiceAccount
from core.state import Seen
from receiver.journal import Journal, JournalFull
from receiver.rules import Explanation, Match, Previous, RuleStore, match, previous_without_state
from receiver.secrets_store import SecretStore
from receiver.settings import Settings
from receiver.signature import HEADER, Verdict

if TYPE_CHECKING:
    from redis.client import Pipeline

log = logging.getLogger(__name__)

NO_MATCH_RETENTION = 86400
"""Seconds a delivery that matched no rule stays listed: enough to debug a rule, cheap at volume."""


@dataclass(frozen=True)
class Answer:
    """What the receiver says back to CVAT."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Intake:
    """Everything one delivery needs; built once per app by ``receiver.app``."""

    settings: Settings
    redis: Redis
    rules: RuleStore
    deliveries: DeliveryLog
    receipts: Receipts
    redactor: Redactor
    journal: Journal

    @cached_property
    def secrets(self) -> SecretStore:
        """The accepted webhook secrets, re-read when the secrets file changes (``cvat-hooks register``)."""
        return SecretStore.for_settings(self.settings)

    @cached_property
    def service_account(self) -> ServiceAccount:
        """cvat-hooks's own CVAT username (setting, else what the workers learned), for the loop guard."""
        return ServiceAccount(self.settings.workers.cvat.service_account, self.redis)

    def receive(self, body: bytes, signature: str | None, *, peer: str = "-") -> Answer:
        """Handle one POSTed delivery (body size already checked by the view)."""
        verdict = self.secrets.verify(body, signature)
        if verdict is not Verdict.VALID:
            # Never log the header or the secrets: only what kind of failure it was.
            log.warning("delivery rejected: %s %s (%d bytes from %s)", HEADER, verdict.value, len(body), peer)
            metrics.safe_inc(self.redis, "cvat_hooks_rejected_total", reason=f"signature_{verdict.value}")
            return Answer(401, {"error": f"{HEADER} {verdict.value}"})
        try:
            event = parse_event(body)
        except BadEvent as exc:
            log.warning("delivery rejected: %s (%d bytes from %s)", exc, len(body), peer)
            metrics.safe_inc(self.redis, "cvat_hooks_rejected_total", reason="bad_json")
            return Answer(400, {"error": str(exc)})
        self.rules.maybe_reload()
        if not self.rules.usable:
            # Started on a refused rules file with no good rules kept anywhere: judging the event by no
            # rules would lose it, so CVAT is asked to send it again once the file is fixed.
            log.error("delivery %s: no usable rules (see /readyz); asking CVAT to retry", event.delivery_id)
            return Answer(503, {"error": "no usable rules; retry later", "delivery_id": event.delivery_id})
        try:
            answer = self._accept(event)
        except RedisError as exc:
            return self._journal(event, body, exc)
        if self.journal.pending():
            self.start_journal_drain()
        return answer

    def _journal(self, event: Event, body: bytes, exc: RedisError) -> Answer:
        """Redis is unreachable: keep the verified delivery on local disk, or ask CVAT to retry."""
        reason = self.redactor.text(str(exc))
        try:
            self.journal.append(body, time.time())
        except (JournalFull, OSError) as full:
            log.error("delivery %s: could not be stored (Redis: %s; journal: %s), asking CVAT to retry",
                      event.delivery_id, reason, full)
            return Answer(503, {"error": "event could not be stored; retry later",
                                "delivery_id": event.delivery_id})
        log.warning("delivery %s: Redis unavailable (%s); kept in the local journal", event.delivery_id, reason)
        self.start_journal_drain()
        return Answer(202, {"status": "journaled", "delivery_id": event.delivery_id, "jobs": []})

    def start_journal_drain(self) -> None:
        """Move journaled deliveries into Redis in the background once it answers again."""
        self.journal.drain_in_background(self.replay_journaled, self.redis_ready)

    def replay_journaled(self, body: bytes, received_at: float) -> Answer:
        """Process one journaled delivery as if it arrived now (it was verified when it arrived)."""
        event = parse_event(body)
        answer = self._accept(event)
        log.info("delivery %s: moved from the journal (%s)", event.delivery_id, answer.body.get("status"))
        return answer

    def redis_ready(self) -> bool:
        try:
            return bool(self.redis.ping())
        except RedisError:
            return False

    def _accept(self, event: Event) -> Answer:
        now = time.time()
        if_duplicate = self._duplicate_writes(event, now)
        with self.receipts.claim(event) as claim:
            if event.is_ping:
                if claim.stored_before():
                    self.receipts.note_duplicate(event, if_duplicate)
                    return self._duplicate(event)
                return self._store(claim, event, [], Previous(None, None, "untracked"), now, Outcome.PING,
                                   if_duplicate)
            begun = self.receipts.begin(event, if_duplicate, claim)
            if begun.duplicate:
                return self._duplicate(event)
            self.rules.maybe_reload()
            previous = transitions_for(event, begun.seen)
            stopped: list[Explanation] = []
            matches = match(self.rules.current, event, previous, datetime.fromtimestamp(now, UTC),
                            service_account=self.service_account.name(), stopped=stopped)
            for rule in stopped:
                log.info("delivery %s: rule %s %s", event.delivery_id, rule.rule_id, rule.reasons[-1])
            return self._store(claim, event, matches, previous, now,
                               Outcome.QUEUED if matches else Outcome.NO_MATCH, if_duplicate)

    def _store(self, claim: Claim, event: Event, matches: list[Match], previous: Previous, now: float,
               outcome: Outcome, if_duplicate: Batch) -> Answer:
        """Record the delivery and enqueue its jobs in one transaction, unless it was stored meanwhile."""
        calls = calls_for(event, matches)
        record = delivery_record(event, matches, calls, previous, outcome)

        ours = Batch()
        self.deliveries.add_received(ours, record, record_actions(calls), now)
        if outcome is Outcome.NO_MATCH:
            self.deliveries.expire(ours, event.delivery_id, NO_MATCH_RETENTION)
        metrics.inc(ours, "cvat_hooks_deliveries_total", event=event.name, outcome=outcome.value)

        def jobs(pipe: Pipeline) -> None:
            enqueue(calls, self.redis, pipe, failure_ttl=self.settings.workers.retention_seconds)

        if not claim.commit(int(now), self.settings.dedupe_seconds, jobs, if_duplicate, ours):
            # Another receiver stored this very event since our first look.
            return self._duplicate(event)
        job_ids = [call.job_id for call in calls]
        if outcome is Outcome.PING:
            log.info("delivery %s: ping from webhook %s", event.delivery_id, event.webhook_id)
            return Answer(200, {"status": "ping", "delivery_id": event.delivery_id})
        if not job_ids:
            log.info("delivery %s: %s matched no rule", event.delivery_id, event.name)
            return Answer(200, {"status": "no_match", "delivery_id": event.delivery_id})
        log.info("delivery %s: %s matched %d rule(s), queued %d job(s)",
                 event.delivery_id, event.name, len(matches), len(job_ids))
        return Answer(202, {"status": "queued", "delivery_id": event.delivery_id, "jobs": job_ids})

    def _duplicate_writes(self, event: Event, now: float) -> Batch:
        """What a duplicate leaves behind: a step in the delivery's log and a count."""
        writes = Batch()
        self.deliveries.add_duplicate(writes, event.delivery_id, now)
        metrics.inc(writes, "cvat_hooks_deliveries_total", event=event.name, outcome="duplicate")
        return writes

    @staticmethod
    def _duplicate(event: Event) -> Answer:
        log.info("delivery %s: duplicate of an event already received; nothing queued", event.delivery_id)
        return Answer(200, {"status": "duplicate", "delivery_id": event.delivery_id})


def transitions_for(event: Event, seen: Seen) -> Previous:
    """Decide where ``changed``/``became``/``was`` take the old values from, and say which source.

    CVAT's own ``before_update``/``changes`` prove what this event changed, whenever it arrives:
    they win even over a newer state already seen (CVAT's retries reorder deliveries, the journal
    drains late), so a completion reported late still fires, once (its delivery id is deduplicated).
    Without them, an event older than what we already saw never fires a transition (our memory is
    newer than its old state), and otherwise our last-seen snapshot decides.
    """
    from_event = previous_without_state(event)
    if from_event.source != "unknown":  # CVAT's own fields, or a creation (nothing before it)
        return from_event
    if seen.source == "stale":
        return Previous(event.resource, None, "stale")
    if seen.source == "last-seen":
        return Previous(event.resource, seen.snapshot, "last-seen")
    return Previous(event.resource, None, seen.source)


def calls_for(event: Event, matches: list[Match]) -> list[ActionCall]:
    """One job per planned action of every matched rule."""
    essentials = event.essentials()
    return [
        ActionCall(
            delivery_id=event.delivery_id,
            rule_id=m.rule_id,
            index=planned.index,
            action=planned.action,
            params=planned.params,
            event=essentials,
            retry=planned.retry,
            queue=planned.queue,
        )
        for m in matches
        for planned in m.actions
    ]


def record_actions(calls: list[ActionCall]) -> list[dict[str, Any]]:
    """The per-action part of a delivery record."""
    return [call.summary() for call in calls]


def delivery_record(event: Event, matches: list[Match], calls: list[ActionCall], previous: Previous,
                    outcome: Outcome) -> dict[str, Any]:
    """What the delivery log keeps about a delivery's receipt (the payload too, for replays)."""
    by_rule: dict[str, list[str]] = {}
    for call in calls:
        by_rule.setdefault(call.rule_id, []).append(call.job_id)
    return {
        "delivery_id": event.delivery_id,
        "event": event.name,
        "outcome": outcome.value,
        "webhook_id": event.webhook_id,
        "resource": event.resource,
        "resource_id": event.resource_id,
        "updated_date": event.updated_date,
        "ids": event.ids,
        "transitions": {"source": previous.source},
        # Without the resource object, which the payload holds: a record is kept for the retention.
        "essentials": {k: v for k, v in event.essentials().items() if k != "object"},
        "matched": [
            {"rule_id": m.rule_id, "reasons": list(m.reasons), "jobs": by_rule.get(m.rule_id, []),
             "errors": list(m.errors)}
            for m in matches
        ],
        "payload": event.payload,
    }
