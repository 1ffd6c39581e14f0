"""Hold a loaded rule set's format names to a CVAT server's own list (``rules check --online``).

The receiver loads rules without CVAT, against the shipped list of CVAT's names
(``core.cvat_formats``); a server may have switched a format off, or a newer one may offer
more. This is the same check with the server's list, kept pure: the caller asks the server.
"""

from __future__ import annotations

from collections.abc import Collection

from core.cvat_formats import FormatKind, format_problem
from receiver.rules.model import Problem, RuleSet

FORMAT_KINDS: dict[str, FormatKind] = {"export": "export", "import_annotations": "import"}
"""The actions whose ``format`` parameter names a CVAT format, and of which kind."""


def format_problems(ruleset: RuleSet, kind: FormatKind, offered: Collection[str]) -> list[Problem]:
    """One problem (file, line, rule) per action whose ``format`` of this kind ``offered`` lacks."""
    problems = []
    for rule in ruleset.rules:
        for decl in rule.actions:
            fmt = decl.params.get("format")
            if FORMAT_KINDS.get(decl.action) != kind or not isinstance(fmt, str) or "{" in fmt:
                continue
            problem = format_problem(kind, fmt, offered)
            if problem is not None:
                problems.append(Problem(ruleset.source, decl.line,
                                        f"action #{decl.index + 1} ({decl.action}): {problem}", rule.id))
    return problems
