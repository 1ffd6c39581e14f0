"""A condition judged with all its reasons at once: what the tests hold conditions to.

The receiver never needs this form: it compiles each rule's condition once
(``receiver.rules.conditions.compile_condition``) and asks for reasons only when a rule fires.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from receiver.rules import Condition, Previous
from receiver.rules.conditions import compile_condition


@dataclass(frozen=True)
class Verdict:
    """Whether a condition held, and its reasons."""

    matched: bool
    reasons: tuple[str, ...] = ()


def evaluate(cond: Condition | None, ctx: Mapping[str, Any], previous: Previous | None = None) -> Verdict:
    """Judge ``cond`` against an event context (``Event.context()``) and take every reason."""
    ok, why = compile_condition(cond)(ctx, previous)
    return Verdict(ok, why())
