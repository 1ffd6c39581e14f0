"""The packages follow where code runs, and the imports say so.

- ``core``: what both sides of the queue share; imports no other package of ours.
- ``workers``: RQ and the actions; imports ``core`` only.
- ``receiver``: HTTP intake; imports ``core``, and of the workers only the action registry
  ``workers.actions``, which holds every rule's parameters to the action's own ``validate()`` when
  the rules load.
- ``operations``: the CLI and what operators run; may import anything, and nothing imports it.

Every import counts: at the top, inside a function, or for type checking only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "workers", "receiver", "operations")
ALLOWED = {
    "core": {"core"},
    "workers": {"core", "workers"},
    "receiver": {"core", "receiver"},
    "operations": set(PACKAGES),
}
RECEIVER_MAY_IMPORT = {"workers.actions"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of one of our packages in a file; relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base in PACKAGES:  # ``from core import metrics`` imports core.metrics
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def _violations(package: str) -> list[str]:
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in ALLOWED[package]:
                continue
            if package == "receiver" and name in RECEIVER_MAY_IMPORT:
                continue
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return problems


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_its_line_allows(package):
    assert _violations(package) == []


def test_the_check_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The check itself: a core module that imports the receiver, lazily, is found."""
    core = tmp_path / "core"
    core.mkdir()
    (core / "leaky.py").write_text("def f():\n    from receiver.dispatch import Dispatcher\n    return Dispatcher\n")
    (core / "fine.py").write_text("from .contract import ActionCall\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert _violations("core") == ["core/leaky.py:2 imports receiver.dispatch"]
