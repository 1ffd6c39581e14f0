"""Your own actions on a real CVAT: the example plugin and a ``run`` script act on a delivery CVAT sent.

The plugin is the example package (``examples/cvat-hooks-plugin-example``), importable by the
deployment's processes through ``PYTHONPATH`` and named by its entry point, whose ``.dist-info`` sits
in a temporary directory (what ``pip install`` would write); the script is the shipped
``examples/scripts/save-event`` with ``CVAT_HOOKS_RUN_DIRS`` listing its directory.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.real_cvat.conftest import Deployment, Made, rules_of

EXAMPLE = ROOT / "examples" / "cvat-hooks-plugin-example"
SCRIPTS = (ROOT / "examples" / "scripts").resolve()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, s3_env: dict[str, str]) -> Iterator[Deployment]:
    """A deployment whose receiver and workers see the example plugin and may run the example scripts."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "cvat_hooks_plugin_example-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cvat-hooks-plugin-example\nVersion: 0.1.0\n")
    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    (dist / "entry_points.txt").write_text("[cvat_hooks.actions]\n" + "".join(
        f"{name} = {target}\n" for name, target in declared["cvat_hooks.actions"].items()))
    env = {**s3_env, "PYTHONPATH": f"{EXAMPLE}:{site}", "CVAT_HOOKS_RUN_DIRS": str(SCRIPTS)}
    deployment = Deployment(tmp_path_factory.mktemp("custom-deployment"), extra_env=env)
    yield deployment
    deployment.stop()


def test_a_plugin_and_a_script_act_on_a_task_cvat_created(made: Made, deployment: Deployment, cvat: Any,
                                                          tmp_path: Path):
    """When CVAT finishes creating a task, the example plugin counts the jobs CVAT made for it (by
    its entry point and as module:function) and save-event keeps the delivery's event, with the
    task's id and name as separate arguments."""
    project = made.project("custom", ["car"])
    events = tmp_path / "events"
    rule = f"custom-{project.id}"
    deployment.add_rules(f"""
  - id: {rule}
    on: completed:request[create:task]
    if: {{project_id: {project.id}, request.status: finished}}
    do:
      - action: jobs_overview
      - action: cvat_hooks_plugin_example:jobs_overview
        task: "{{task_id}}"
        min_jobs: 2
      - action: run
        command: [{SCRIPTS / 'save-event'}, {events}, "{{task_id}}", "{{request.operation.type}}"]
    retry: {{attempts: 3, backoff: [2]}}
""")
    deployment.register("--project", str(project.id))
    task = made.task("custom-1", project_id=project.id, frames=3, segment_size=2)
    summary = deployment.wait_delivery(lambda d: rule in rules_of(d)
                                       and (d.get("ids") or {}).get("task_id") == task.id, timeout=180)
    by_index = {a["index"]: a for a in summary["actions"]}
    assert all(a["status"] == "succeeded" for a in by_index.values()), json.dumps(summary["actions"], indent=1)
    jobs = task.get_jobs()
    assert len(jobs) == 2
    for index in (0, 1):
        result = by_index[index]["result"]
        assert result["task_id"] == task.id and result["jobs"] == len(jobs), result
        assert sum(result["by_state"].values()) == len(jobs)
    saved = by_index[2]["result"]
    assert saved["exit_code"] == 0 and "saved completed:request[create:task]" in saved["stdout"], saved
    [stored] = list(events.glob("*.json"))
    event = json.loads(stored.read_text())
    assert event["event"] == "completed:request[create:task]" and event["task_id"] == task.id
    assert event["project_id"] == project.id
    assert stored.with_suffix(".args").read_text().splitlines() == [str(task.id), "create:task"]
