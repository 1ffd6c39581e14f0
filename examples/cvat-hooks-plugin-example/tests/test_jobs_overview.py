"""The example plugin, as cvat-hooks sees it: declared, found by its entry point, run on an event.

Nothing is installed: the package directory and a throw-away ``.dist-info`` (what ``pip install``
would write) go on ``sys.path`` for the test only.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.contract import ActionCall
from core.errors import PermanentError, TransientError
from core.settings import WorkerSettings
from workers import actions
from workers.actions import plugins
from workers.context import ActionContext

HERE = Path(__file__).resolve().parents[1]


class Jobs:
    """A CVAT gateway that knows one task's jobs (the only call the plugin makes)."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = jobs
        self.asked: list[int] = []

    def list_jobs(self, task_id: int) -> list[dict[str, Any]]:
        self.asked.append(task_id)
        return self.jobs


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The package importable and its entry point visible, as after ``pip install``."""
    dist = tmp_path / "cvat_hooks_plugin_example-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cvat-hooks-plugin-example\nVersion: 0.1.0\n")
    declared = tomllib.loads((HERE / "pyproject.toml").read_text())["project"]["entry-points"]
    (dist / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in eps.items())
        for group, eps in declared.items()))
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.forget()
    yield tmp_path
    plugins.forget()


def context(params: dict[str, Any], gateway: Jobs, event: dict[str, Any] | None = None) -> ActionContext:
    call = ActionCall("d" * 64, "count-jobs", 0, "jobs_overview", params,
                      event if event is not None else {"event": "update:task", "task_id": 7})
    return ActionContext(call=call, settings=WorkerSettings(), redis=None,  # type: ignore[arg-type]
                         gateway_factory=lambda: gateway)  # type: ignore[arg-type,return-value]


def test_the_entry_point_name_validates_like_a_builtin(on_path):
    """``action: jobs_overview`` is found through the entry point; its parameters are checked."""
    assert actions.validate_params("jobs_overview", {"min_jobs": "{task.size}"}) == []
    assert actions.validate_params("jobs_overview", {"min_jobs": "two", "colour": 1}) == [
        "unknown parameter 'colour' (known: min_jobs, task)", "min_jobs must be an integer, not 'two'"]


def test_the_action_counts_the_task_jobs(on_path):
    """Run through the registry's runner: jobs counted, the rendered text id converted to an int."""
    gateway = Jobs([{"stage": "annotation", "state": "new"}, {"stage": "annotation", "state": "completed"}])
    result = actions.runner("jobs_overview")(context({"task": "12"}, gateway))
    assert gateway.asked == [12]
    assert result["jobs"] == 2 and result["by_state"] == {"new": 1, "completed": 1}


def test_too_few_jobs_is_transient_and_no_task_is_permanent(on_path):
    """Fewer jobs than min_jobs is retried; an event without a task fails at once."""
    run = actions.runner("cvat_hooks_plugin_example:jobs_overview")
    with pytest.raises(TransientError, match="fewer than 2"):
        run(context({"min_jobs": 2}, Jobs([{"stage": "annotation", "state": "new"}])))
    with pytest.raises(PermanentError, match="names no task"):
        run(context({}, Jobs([]), event={"event": "update:project", "project_id": 3}))
