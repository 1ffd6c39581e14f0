"""Only the settings modules read the process environment (CONVENTIONS: one place for configuration)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "receiver", "workers", "operations")
ALLOWED = {
    "core/settings.py": "reads the workers' settings",
    "receiver/settings.py": "reads the receiver's settings",
    "operations/serve.py": "passes its environment through, unread, to the children it starts",
}
"""Modules that may touch ``os.environ``, and why."""
ENVIRONMENT_NAMES = {"environ", "environb", "getenv", "getenvb"}


def environment_reads(source: str) -> list[int]:
    """Lines of ``source`` that reach the process environment: ``os.environ``/``os.getenv`` (under any
    name ``os`` was imported as) or a name imported from ``os``. A WSGI ``request.environ`` is not."""
    tree = ast.parse(source)
    os_names = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names if alias.name == "os"}
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT_NAMES
                and isinstance(node.value, ast.Name) and node.value.id in os_names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                alias.name in ENVIRONMENT_NAMES for alias in node.names):
            lines.append(node.lineno)
    return sorted(lines)


@pytest.mark.parametrize(("source", "expected"), [
    ("import os\nx = os.environ['A']\n", [2]),
    ("import os\nx = os.getenv('A')\n", [2]),
    ("import os as system\nx = system.environ.get('A')\n", [2]),
    ("from os import environ\n", [1]),
    ("from os import getenv as g\n", [1]),
    ("def f(request):\n    return request.environ.get('gunicorn.socket')\n", []),
    ("import os\nx = os.path.join('a', 'b')\n", []),
    ('"""Read os.environ? No: only the settings modules do."""\n', []),
], ids=["subscript", "getenv", "aliased-module", "from-import", "from-import-aliased", "wsgi-environ",
        "other-os-use", "docstring"])
def test_the_scan_finds_environment_reads(source: str, expected: list[int]) -> None:
    """The scan flags each way of reaching the environment, and nothing that merely resembles one."""
    assert environment_reads(source) == expected


def test_only_the_settings_modules_read_the_environment() -> None:
    """Every other module gets its configuration handed in, parsed once per process."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name not in ALLOWED and (lines := environment_reads(path.read_text())):
                found[name] = lines
    assert found == {}, f"read the environment outside the settings modules: {found}"


def test_each_allowed_module_still_needs_it() -> None:
    """An exception that is no longer used is dropped, so the list keeps saying only what is true."""
    assert [name for name in ALLOWED if not environment_reads((ROOT / name).read_text())] == []
