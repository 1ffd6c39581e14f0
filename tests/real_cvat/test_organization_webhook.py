"""An organization webhook on a real CVAT, with the workers acting in that organization (``CVAT_ORG``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.procs import wait_for
from tests.real_cvat.conftest import Deployment, Made, rules_of
from tests.real_cvat.test_project_webhook import complete


@pytest.fixture(scope="module")
def org(cvat: Any, run_id: str) -> Iterator[str]:
    slug = f"hooks-{run_id}"
    created = cvat.organizations.create({"slug": slug, "name": f"cvat-hooks test {run_id}"})
    yield slug
    try:
        created.remove()
    except Exception:  # noqa: BLE001 - already gone
        pass


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, org: str, s3_env: dict[str, str],
               access_token: str) -> Iterator[Deployment]:
    """This module's cvat-hooks acts in the organization (CVAT_ORG is its slug), with a personal
    access token (CVAT_ACCESS_TOKEN) rather than a login."""
    env = {**s3_env, "CVAT_ORG": org, "CVAT_ACCESS_TOKEN": access_token}
    deployment = Deployment(tmp_path_factory.mktemp("org-deployment"), extra_env=env)
    yield deployment
    deployment.stop()


def test_an_organization_webhook_feeds_actions_in_that_organization(org, made: Made, deployment: Deployment,
                                                                    cvat: Any):
    """register --org makes one organization webhook; a task made in the organization without a
    project gets its missing labels added on the task itself, and a completed job is exported."""
    deployment.add_rules("""
  - id: org-labels
    on: completed:request[create:task]
    if: {request.status: finished}
    do:
      - {action: check_labels, require: [car, person], on_mismatch: add_missing}
  - id: org-export
    on: update:job
    if: {job.state: {became: completed}}
    do:
      - {action: export, resource: job, format: YOLO 1.1, to: "exports/org/job-{job_id}.zip"}
""")
    deployment.register("--org", org)
    deployment.register("--org", org)
    listed = json.loads(deployment.cli("webhooks", "list", "--json").stdout)
    ours = [w for w in listed if w["type"] == "organization" and w["target_url"].startswith(deployment.url)]
    assert len(ours) == 1, listed
    task = made.task("org-1", labels=["car"], frames=1, org=org)
    summary = deployment.wait_delivery(lambda d: "org-labels" in rules_of(d), timeout=120)
    [action] = summary["actions"]
    assert action["status"] == "succeeded" and action["result"]["added"] == ["person"], action
    with made._org(org):
        assert {lb.name for lb in cvat.tasks.retrieve(task.id).get_labels()} == {"car", "person"}
        [job] = task.get_jobs()
        complete(cvat, job.id)
    target = deployment.data_dir / "exports" / "org" / f"job-{job.id}.zip"
    assert wait_for(target.exists, timeout=120, interval=0.5), deployment.worker.log_text()[-3000:]
    assert deployment.cli("ping", "--org", org).returncode == 0
    deployment.cli("unregister", "--org", org)
