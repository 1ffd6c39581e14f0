"""The benchmarks start without pytest: they import the stand-in servers, never the test fixtures."""

from __future__ import annotations

import subprocess
import sys

from tests.procs import ROOT


def test_benchmarks_import_without_pytest() -> None:
    """Every bench module imports in a fresh interpreter and leaves pytest unloaded."""
    code = ("import importlib, pkgutil, sys, bench\n"
            "for m in pkgutil.iter_modules(bench.__path__):\n"
            "    importlib.import_module('bench.' + m.name)\n"
            "print(sorted(n for n in sys.modules if n == 'pytest' or n.startswith(('_pytest', 'tests.conftest'))))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
