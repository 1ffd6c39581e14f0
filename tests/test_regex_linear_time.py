"""Rule ``regex`` operands run on RE2: no payload makes one evaluation slow, and patterns RE2 cannot
run are refused when the rules load, located like any other problem."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest

from receiver.rules import RulesError, parse_rules
from tests.judging import evaluate

RULE = """\
version: 1
rules:
  - id: {rule_id}
    on: update:job
    if:
      job.stage: {{regex: '{pattern}'}}
    do:
      - action: notify
        url: https://example.org/hook
"""


def _validate(name: str, params: Mapping[str, Any]) -> list[str]:
    """Accepts any action: only conditions are under test."""
    return []


def _condition(pattern: str) -> Any:
    """The condition of a one-rule file whose ``regex`` is ``pattern``."""
    text = RULE.format(rule_id="r", pattern=pattern)
    return parse_rules(text, "rules.yaml", validate_action=_validate).rules[0].condition


# Each row: a pattern Python's backtracking engine takes exponential or quadratic time on, and the
# hostile text (about 100 KB, as a signed payload field can be).
CATASTROPHIC = [
    ("nested-plus", "(a+)+$", "a" * 100_000 + "!"),
    ("alternation", "(a|aa)+$", "a" * 100_000 + "!"),
    ("nested-star", "(x*)*y", "x" * 100_000),
    ("dot-star-twice", ".*a.*a.*a.*b$", "a" * 100_000),
    ("word-groups", "^(\\w+\\s?)*$", "word " * 20_000 + "!"),
]


@pytest.mark.parametrize(("pattern", "text"), [c[1:] for c in CATASTROPHIC], ids=[c[0] for c in CATASTROPHIC])
def test_backtracking_patterns_evaluate_in_linear_time(pattern: str, text: str) -> None:
    """A pattern that backtracks catastrophically in ``re`` evaluates in well under a second."""
    condition = _condition(pattern)
    started = time.perf_counter()
    ok = evaluate(condition, {"job": {"stage": text}}).matched
    assert time.perf_counter() - started < 1.0
    assert ok is False


# Each row: pattern, text, whether it matches: ``regex`` is still a search (not a full match).
SEARCH = [
    ("prefix", "^acc", "acceptance", True),
    ("inside", "cept", "acceptance", True),
    ("anchored-miss", "^cept", "acceptance", False),
    ("case-flag", "(?i)^ACC", "acceptance", True),
    ("alternation", "annotation|validation", "validation", True),
    ("named-group", "(?P<s>anno)tation", "annotation", True),
    ("unicode", "ü+", "grün", True),
    ("dollar", "tion$", "validation", True),
]


@pytest.mark.parametrize(("pattern", "text", "expected"), [c[1:] for c in SEARCH], ids=[c[0] for c in SEARCH])
def test_regex_keeps_search_semantics(pattern: str, text: str, expected: bool) -> None:
    """Ordinary patterns match as ``re.search`` did."""
    ok = evaluate(_condition(pattern), {"job": {"stage": text}}).matched
    assert ok is expected


@pytest.mark.parametrize("pattern", ["(a)\\1", "foo(?=bar)", "(?<!x)y", "(?>a+)", "(unclosed"],
                         ids=["backreference", "lookahead", "lookbehind", "atomic-group", "syntax"])
def test_patterns_re2_cannot_run_are_load_errors(pattern: str) -> None:
    """A pattern RE2 refuses is a load error naming the file, the line, the rule and the reason."""
    text = RULE.format(rule_id="slow-rule", pattern=pattern)
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "rules.yaml", validate_action=_validate)
    message = str(caught.value)
    assert "rules.yaml:6" in message and "slow-rule" in message and "bad regex" in message
