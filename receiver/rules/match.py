"""Decide which rules an event fires and plan their actions: pure, so it is easy to test and explain.

:func:`match` is what the receiver enqueues from; :func:`explain` is the same decision for every
rule, matched or not, for ``cvat-hooks rules test``. A placeholder that cannot be rendered fails
only its own action (recorded in :attr:`Match.errors`), never the whole delivery.

Both take cvat-hooks's own CVAT account (``service_account``, ``None`` when unknown): a rule does
not fire on an event that account caused and one of the rule's own actions can cause
(:mod:`receiver.rules.own_events`), and conditions see ``caused_by_cvat_hooks``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import workers.actions
from core.events import Event
from core.retry import RetryPolicy
from receiver.rules.conditions import Reasons
from receiver.rules.model import Previous, Rule, RuleSet
from receiver.rules.own_events import CONTEXT_KEY, caused_by, guard
from receiver.rules.templating import RenderError, render_params, template_variables


class ActionInfo(Protocol):
    """What matching needs to know of an action (``workers.actions.ActionSpec`` has it)."""

    @property
    def queue(self) -> str: ...

    @property
    def path_params(self) -> Collection[str]: ...

    @property
    def secret_params(self) -> Collection[str]: ...


@dataclass(frozen=True)
class PlannedAction:
    """One action of a matched rule, rendered and ready to become one RQ job."""

    index: int
    """Position in the rule's ``do`` list (part of the deterministic job id)."""
    action: str
    params: dict[str, Any]
    """The parameters with every placeholder rendered."""
    queue: str
    retry: RetryPolicy


@dataclass(frozen=True)
class Match:
    """A rule that fired for an event: why, what to run, and which actions could not be rendered."""

    rule_id: str
    reasons: tuple[str, ...]
    actions: tuple[PlannedAction, ...]
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Explanation:
    """The decision for one rule, matched or not (``match`` is set when it matched)."""

    rule_id: str
    matched: bool
    reasons: tuple[str, ...]
    match: Match | None = None


def _plan(rule: Rule, variables: Mapping[str, Any], registry: Mapping[str, ActionInfo],
          reasons: tuple[str, ...]) -> Match:
    """Render a matched rule's actions; a failure is recorded against its action only."""
    planned, errors = [], []
    for decl in rule.actions:
        where = f"action #{decl.index + 1} ({decl.action})"
        spec = registry.get(decl.action)
        if spec is None:
            errors.append(f"{where}: no such action is registered")
            continue
        try:
            params = render_params(decl.params, variables, path_params=spec.path_params,
                                   secret_params=spec.secret_params)
        except RenderError as exc:
            errors.append(f"{where}: {exc}")
            continue
        planned.append(PlannedAction(decl.index, decl.action, params, spec.queue, rule.retry))
    return Match(rule.id, reasons, tuple(planned), tuple(errors))


def _reasons(event_name: str, pattern: str, why: Reasons, guarded: str | None = None) -> tuple[str, ...]:
    """A rule's reasons: the ``on`` pattern that selected the event, the loop guard's say, then its condition's."""
    head = f"event {event_name} matches on {pattern!r}"
    return (head, guarded, *why()) if guarded else (head, *why())


def match_context(event: Event, service_account: str | None) -> tuple[dict[str, Any], bool]:
    """What conditions see (:meth:`Event.context` plus ``caused_by_cvat_hooks``), and that flag."""
    ctx = event.context()
    own = caused_by(event.payload, service_account)
    ctx[CONTEXT_KEY] = own
    return ctx, own


def _variables(event: Event, now: datetime, own: bool) -> dict[str, Any]:
    """What templates see: the same as conditions, plus ``delivery_id`` and ``date``."""
    variables = template_variables(event, now=now)
    variables[CONTEXT_KEY] = own
    return variables


def explain(ruleset: RuleSet, event: Event, previous: Previous | None, now: datetime, *,
            actions: Mapping[str, ActionInfo] | None = None,
            service_account: str | None = None) -> list[Explanation]:
    """For every rule in order: did it match this event, and why (or why not).

    ``previous`` is the state before the event (``None`` or an unknown snapshot: no transition
    matches); ``now`` gives ``{date}``; ``actions`` defaults to :data:`workers.actions.REGISTRY`;
    ``service_account`` is cvat-hooks's own CVAT username (``None``: unknown, no loop guard).
    """
    registry: Mapping[str, ActionInfo] = workers.actions.REGISTRY if actions is None else actions
    ctx, own = match_context(event, service_account)
    variables: dict[str, Any] | None = None
    out = []
    for rule in ruleset.rules:
        pattern = rule.matching_pattern(event.name)
        if pattern is None:
            out.append(Explanation(rule.id, False, (f"event {event.name} not in on ({', '.join(rule.on)})",)))
            continue
        guarded, said = guard(rule, event.name, own, service_account)
        if guarded:
            out.append(Explanation(rule.id, False, (f"event {event.name} matches on {pattern!r}", str(said))))
            continue
        ok, why = rule.judge(ctx, previous)
        reasons = _reasons(event.name, pattern, why, said)
        if not ok:
            out.append(Explanation(rule.id, False, reasons))
            continue
        if variables is None:
            variables = _variables(event, now, own)
        out.append(Explanation(rule.id, True, reasons, _plan(rule, variables, registry, reasons)))
    return out


def match(ruleset: RuleSet, event: Event, previous: Previous | None, now: datetime, *,
          actions: Mapping[str, ActionInfo] | None = None,
          service_account: str | None = None, stopped: list[Explanation] | None = None) -> list[Match]:
    """The rules an event fires, in file order, with their actions rendered: the matches of :func:`explain`.

    The receiver's hot path, so it does only the work whose result it returns: rules whose ``on``
    cannot cover the event are skipped, and reasons are formatted only for the rules that fire.
    Rules the loop guard stopped are appended to ``stopped``, when given, with their reasons (the
    receiver logs them: a rule that "did not fire" should say why).
    """
    registry: Mapping[str, ActionInfo] = workers.actions.REGISTRY if actions is None else actions
    ctx, own = match_context(event, service_account)
    variables: dict[str, Any] | None = None
    out = []
    for rule, pattern in ruleset.rules_for(event.name):
        guarded, said = guard(rule, event.name, own, service_account)
        if guarded:
            if stopped is not None:
                stopped.append(Explanation(rule.id, False, (f"event {event.name} matches on {pattern!r}", str(said))))
            continue
        ok, why = rule.judge(ctx, previous)
        if not ok:
            continue
        if variables is None:
            variables = _variables(event, now, own)
        out.append(_plan(rule, variables, registry, _reasons(event.name, pattern, why, said)))
    return out
