"""The README's example rules are real: each one loads with the real action validators."""

from __future__ import annotations

import re

import pytest

from receiver.rules import parse_rules
from tests.conftest import ROOT

BLOCKS = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
RULE_LISTS = [b for b in BLOCKS if b.lstrip().startswith("- id:")]


def test_the_readme_has_an_example_for_every_action():
    """Each registered action has at least one example rule in the README."""
    from workers.actions import REGISTRY

    used = {m for block in RULE_LISTS for m in re.findall(r"action: (\w+)", block)}
    assert set(REGISTRY) <= used


@pytest.mark.parametrize("block", RULE_LISTS, ids=[re.search(r"id: ([\w-]+)", b)[1] for b in RULE_LISTS])
def test_readme_example_rule_loads(block):
    """An example rule from the README passes the same validation as rules.yaml."""
    text = "version: 1\nrules:\n" + "\n".join("  " + line for line in block.splitlines())
    ruleset = parse_rules(text, "README.md")
    assert len(ruleset.rules) == 1
