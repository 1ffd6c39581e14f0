"""The rule engine: load ``rules.yaml``, match events against it, render the actions it plans.

Everything here is pure except :class:`RuleStore`, which reads the file and reloads it.
"""

from __future__ import annotations

from receiver.rules.conditions import (
    lookup,
    previous_from_payload,
    previous_without_state,
)
from receiver.rules.loader import Validator, load_rules, parse_rules
from receiver.rules.match import ActionInfo, Explanation, Match, PlannedAction, explain, match
from receiver.rules.model import (
    OPERATORS,
    ActionDecl,
    All,
    AnyOf,
    Check,
    Condition,
    Not,
    Previous,
    Problem,
    Rule,
    RulesError,
    RuleSet,
)
from receiver.rules.store import RuleStore
from receiver.rules.templating import (
    RenderError,
    TemplateError,
    check_template,
    path_safe,
    render,
    render_params,
    template_variables,
)

__all__ = [
    "OPERATORS",
    "ActionDecl",
    "ActionInfo",
    "All",
    "AnyOf",
    "Condition",
    "Explanation",
    "Match",
    "Not",
    "PlannedAction",
    "Previous",
    "Problem",
    "RenderError",
    "Rule",
    "RuleSet",
    "RuleStore",
    "RulesError",
    "TemplateError",
    "Check",
    "Validator",
    "check_template",
    "explain",
    "load_rules",
    "lookup",
    "match",
    "parse_rules",
    "path_safe",
    "previous_from_payload",
    "previous_without_state",
    "render",
    "render_params",
    "template_variables",
]
