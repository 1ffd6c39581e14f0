"""The values of the rule engine: a loaded rule set, its rules, their conditions, and load problems.

Everything here is a frozen dataclass built once by :mod:`receiver.rules.loader`; matching only
reads them, so one :class:`RuleSet` can be shared by every request thread and swapped atomically
on reload.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from core.cvat_events import EVENT_NAMES, PING, TRACKED_RESOURCES, expand, matches
from core.retry import RetryPolicy

if TYPE_CHECKING:
    from receiver.rules.conditions import Judge

SCALAR_OPERATORS = ("equals", "not_equals", "in", "not_in", "regex", "exists", "gt", "gte", "lt", "lte")
"""Operators that look at the field's current value only."""
TRANSITION_OPERATORS = ("changed", "became", "was")
"""Operators that compare the field's current value with its previous one (see :class:`Previous`)."""
OPERATORS = SCALAR_OPERATORS + TRANSITION_OPERATORS

_RULES_FOR_NAMES = 512
"""Event names whose rules :meth:`RuleSet.rules_for` remembers: CVAT has about 50."""

@dataclass(frozen=True)
class Previous:
    """What the resource of an event looked like before it, as far as the receiver knows.

    Transitions (``changed``, ``became``, ``was``) need it: older CVAT sends ``before_update``/
    ``changes``, newer CVAT does not, so the receiver falls back on what it last saw itself.
    """

    resource: str | None
    """The payload key of the resource, e.g. ``job``: only paths starting with ``job.`` are about it."""
    snapshot: dict[str, Any] | None
    """The resource object as it was before this event; ``None`` when unknown (nothing then matches)."""
    source: str
    """Who decided: ``payload``, ``last-seen``, ``created`` (empty before a create), ``stale``
    (the event is older than what was already seen) or ``unknown``. Informational only (recorded
    in the delivery log and in reasons), so it is not checked: the receiver may add its own."""


@dataclass(frozen=True)
class Check:
    """One operator applied to one dotted path, e.g. ``job.state`` ``became`` ``'completed'``."""

    path: str
    op: str
    value: Any
    pattern: re.Pattern[str] | None = None
    """The compiled ``regex`` operand (compiled once, at load)."""


@dataclass(frozen=True)
class All:
    """Every condition holds (a rule's ``if`` mapping, an ``all:`` list, several operators on a path)."""

    items: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    """At least one condition holds (``any:``)."""

    items: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    """The condition does not hold (``not:``)."""

    item: Condition


Condition = Check | All | AnyOf | Not

_KNOWN_EVENTS = frozenset(EVENT_NAMES)


def _transition_resources(condition: Condition | None) -> set[str]:
    """The tracked resources whose fields a condition compares with their previous state."""
    if condition is None:
        return set()
    if isinstance(condition, Check):
        head = condition.path.split(".", 1)[0]
        return {head} if condition.op in TRANSITION_OPERATORS and head in TRACKED_RESOURCES else set()
    if isinstance(condition, Not):
        return _transition_resources(condition.item)
    return set().union(*(_transition_resources(item) for item in condition.items))


@dataclass(frozen=True)
class ActionDecl:
    """One entry of a rule's ``do`` list, parameters still unrendered."""

    index: int
    """Position in ``do`` (0-based): part of the deterministic job id."""
    action: str
    params: Mapping[str, Any]
    line: int | None = None
    causes: tuple[str, ...] = ()
    """CVAT events this action's own changes make CVAT send (``workers.actions.events_caused``, filled
    in at load): the rule does not fire on one of them caused by cvat-hooks's own account."""


@dataclass(frozen=True)
class Rule:
    """One rule of ``rules.yaml``."""

    id: str
    on: tuple[str, ...]
    """Event names or ``*`` patterns (see :mod:`core.cvat_events`)."""
    condition: Condition | None
    actions: tuple[ActionDecl, ...]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    description: str = ""
    line: int | None = None
    allow_self_trigger: bool = False
    """``allow_self_trigger: true``: fire even on an event cvat-hooks's own account caused with one of
    this rule's actions (see :mod:`receiver.rules.own_events`)."""

    def matching_pattern(self, event_name: str) -> str | None:
        """The first ``on`` pattern that covers an event name, or ``None``."""
        return next((p for p in self.on if matches(p, event_name)), None)

    @cached_property
    def judge(self) -> Judge:
        """The rule's condition compiled once, on first use, then kept with the (immutable) rule.

        Imported here rather than at the top: :mod:`~receiver.rules.conditions` imports this module.
        """
        from receiver.rules.conditions import compile_condition

        return compile_condition(self.condition)


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or suspicious, for a warning) with a rules file, located for a human."""

    source: str
    line: int | None
    message: str
    rule_id: str | None = None
    """The rule's id, or ``#N`` (1-based position) when the rule has no usable id."""
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        rule = ""
        if self.rule_id is not None:
            rule = f"rule {self.rule_id}: " if self.rule_id.startswith("#") else f"rule {self.rule_id!r}: "
        tag = "warning: " if self.severity == "warning" else ""
        return f"{where}: {tag}{rule}{self.message}"


class RulesError(Exception):
    """A rules file that cannot be used; ``str()`` lists every problem, one per line."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def errors(self) -> tuple[Problem, ...]:
        """The problems that made the file unusable (warnings left out)."""
        return tuple(p for p in self.problems if p.severity == "error")


@dataclass(frozen=True)
class RuleSet:
    """A validated rules file."""

    version: int
    rules: tuple[Rule, ...]
    source: str
    """Where the rules came from (a path), used in messages and logs."""
    warnings: tuple[Problem, ...] = ()
    digest: str = ""
    """Hex SHA-256 of the file's bytes: tells which rules decided a delivery."""

    def events_needed(self) -> set[str]:
        """Every known CVAT event some rule listens to, ``ping`` excluded (it cannot be subscribed).

        A rule that watches a transition (``job.state: {became: ...}``) also needs the resource's
        ``create:*`` event: CVAT 2.76+ sends no ``before_update``, so the state a job was created in is
        what its first update is compared with (README: Transitions).
        """
        names: set[str] = set()
        for rule in self.rules:
            for pattern in rule.on:
                names.update(expand(pattern))
            names.update(f"create:{resource}" for resource in _transition_resources(rule.condition))
        names.discard(PING)
        return {name for name in names if name in _KNOWN_EVENTS}

    def rules_for(self, event_name: str) -> tuple[tuple[Rule, str], ...]:
        """The rules whose ``on`` covers an event name, in file order, each with its first such pattern.

        Remembered per name (the rule set never changes), so an event is not matched against every
        pattern of every rule each time. Only the first :data:`_RULES_FOR_NAMES` names are kept, in
        case a sender makes up endless event names.
        """
        found = self._rules_for.get(event_name)
        if found is None:
            found = tuple((rule, pattern) for rule in self.rules
                          if (pattern := rule.matching_pattern(event_name)) is not None)
            if len(self._rules_for) < _RULES_FOR_NAMES:
                self._rules_for[event_name] = found
        return found

    @cached_property
    def _rules_for(self) -> dict[str, tuple[tuple[Rule, str], ...]]:
        """The memo of :meth:`rules_for`; not a field, so equality, ``repr`` and the constructor ignore it."""
        return {}

    def get(self, rule_id: str) -> Rule | None:
        """The rule with this id, if any."""
        return next((r for r in self.rules if r.id == rule_id), None)
