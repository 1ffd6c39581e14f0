"""CVAT 2.76 and newer send ``update:*`` without ``before_update`` and ``changes`` (PR #11104).

The real CVAT here (2.73) still sends them, so its deliveries pass through a small forwarder that
strips both and signs the body again with the webhook's own secret, exactly what a 2.76 server would
have sent. The job's old state must then come from what cvat-hooks learned from CVAT's API.
"""

from __future__ import annotations

import hmac
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from receiver.signature import sign
from tests.conftest import free_port
from tests.procs import wait_for
from tests.real_cvat.conftest import SECRET, Deployment, Made
from tests.real_cvat.test_project_webhook import complete


class Stripper:
    """Receives CVAT's deliveries, removes ``before_update``/``changes``, re-signs, forwards."""

    def __init__(self, target: str, secrets_file: Path) -> None:
        self.target = target
        self.secrets_file = secrets_file
        self.port = free_port()
        self.forwarded: list[dict[str, Any]] = []
        self._httpd = make_server("127.0.0.1", self.port, self._app, threaded=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _secrets(self) -> list[str]:
        lines = self.secrets_file.read_text().splitlines() if self.secrets_file.exists() else []
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")] + [SECRET]

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        given = environ.get("HTTP_X_SIGNATURE_256", "")
        secret = next((s for s in self._secrets() if hmac.compare_digest(given, sign(body, s))), None)
        if secret is None:
            start_response("401 Unauthorized", [("Content-Type", "text/plain")])
            return [b"bad signature"]
        payload = json.loads(body)
        payload.pop("before_update", None)
        payload.pop("changes", None)
        self.forwarded.append(payload)
        new_body = json.dumps(payload).encode()
        signature = sign(new_body, secret)
        request = urllib.request.Request(self.target + environ.get("PATH_INFO", ""), data=new_body, method="POST",
                                         headers={"Content-Type": "application/json", "X-Signature-256": signature})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                status, data = answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            status, data = exc.code, exc.read()
        start_response(f"{status} X", [("Content-Type", "application/json")])
        return [data]

    def start(self) -> Stripper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(scope="module")
def stripper(deployment: Deployment) -> Iterator[Stripper]:
    stripper = Stripper(deployment.url, deployment.data_dir / "webhook-secrets").start()
    yield stripper
    stripper.stop()


def test_a_job_completed_before_cvat_hooks_saw_it_fires_on_a_2_76_server(made: Made, deployment: Deployment,
                                                                        cvat: Any, stripper: Stripper):
    """A task made before the webhook existed, a job completed with no before_update sent: its
    first `became: completed` fires, from the state `register` learned from CVAT's API."""
    project = made.project("no-before-update", ["car"])
    task = made.task("no-before-update-1", project_id=project.id, frames=1)
    [job] = task.get_jobs()
    deployment.add_rules(f"""
  - id: first-sight-{project.id}
    on: update:job
    if: {{project_id: {project.id}, job.state: {{became: completed}}}}
    do:
      - {{action: export, resource: job, format: CVAT for images 1.1, to: "exports/first-sight/job-{{job_id}}.zip"}}
""")
    deployment.cli("register", "--project", str(project.id), "--url", stripper.url)
    complete(cvat, job.id)
    target = deployment.data_dir / "exports" / "first-sight" / f"job-{job.id}.zip"
    assert wait_for(target.exists, timeout=120, interval=0.5), (
        [p.get("event") for p in stripper.forwarded], deployment.receiver.log_text()[-2000:])
    assert any(p.get("event") == "update:job" and "before_update" not in p for p in stripper.forwarded)
