"""``./dev run`` in a fresh copy of the repository: it installs once, quietly, and again only when the
lock or pyproject.toml changed (issue 18, item 2).

The copy gets a pre-made venv whose dependencies come from this test run's venv (a ``.pth`` line), so
the test installs only cvat-hooks itself, as ``./dev run`` does, without downloading the world.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from tests.conftest import ROOT


def fresh_copy(tmp_path: Path) -> Path:
    """What a clone holds of what ``./dev run`` installs, with a venv that has the dependencies only."""
    repo = tmp_path / "clone"
    repo.mkdir()
    for name in ("dev", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, repo / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for name in ("requirements", *(pattern.rstrip("*") for pattern in packages)):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    venv = repo / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = venv.glob("lib/python3*/site-packages")
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return repo


def installed_metadata(repo: Path) -> Path:
    [found] = (repo / ".venv").glob("lib/python3*/site-packages/cvat_hooks-*.dist-info/METADATA")
    return found


def test_dev_run_installs_once_quietly_and_again_only_when_the_lock_changes(tmp_path: Path):
    """First start: installed, without setuptools' BuildBackendWarning; second start: no install at all;
    after a lock change: installed again; no temporary directory left behind."""
    repo = fresh_copy(tmp_path)
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVAT_HOOKS_", "CVAT_", "VIRTUAL_ENV"))}
    env.update(TMPDIR=str(tmp_path / "tmp"), PYTHON=sys.executable)

    def dev_run() -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["./dev", "run", "--help"], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Usage: cvat-hooks serve" in done.stdout
        return done

    first = dev_run()
    assert "BuildBackendWarning" not in first.stderr and "Editable installation" not in first.stderr, first.stderr
    assert (repo / ".venv" / "bin" / "cvat-hooks").exists()
    installed = installed_metadata(repo).stat().st_mtime_ns

    again = dev_run()
    assert again.stderr == ""
    assert installed_metadata(repo).stat().st_mtime_ns == installed

    with (repo / "requirements" / "run.lock").open("a") as lock:
        lock.write("# re-locked\n")
    dev_run()
    assert installed_metadata(repo).stat().st_mtime_ns != installed
    assert list((tmp_path / "tmp").iterdir()) == []
