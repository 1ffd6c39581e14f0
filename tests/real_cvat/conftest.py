"""The real-CVAT suite: cvat-hooks against a real CVAT server, which sends the webhooks itself.

Skipped unless a CVAT is configured::

    export CVAT_HOOKS_TEST_CVAT_URL=http://127.0.0.1:8080
    export CVAT_HOOKS_TEST_CVAT_USERNAME=admin CVAT_HOOKS_TEST_CVAT_PASSWORD=...
    ./dev test tests/real_cvat

The account must be able to create organizations, projects, tasks and webhooks (an admin is
simplest). The workers act as ``CVAT_HOOKS_TEST_CVAT_SERVICE_USERNAME``/``..._PASSWORD`` when set (a
second account, as a real deployment should have: an admin too, so it sees what the suite makes);
the loop-guard tests need it. CVAT must be able to reach 127.0.0.1 (no egress proxy refusing
loopback: in the Docker deployment, allow it with ``SMOKESCREEN_OPTS``). Everything the suite creates (an
organization, projects, tasks, webhooks) is named ``cvat-hooks-test-<run>`` and deleted afterwards.

Each test module gets one cvat-hooks deployment of real processes: its own redis-server, ``cvat-hooks
serve`` (gunicorn) on a free loopback port and ``cvat-hooks worker``. Tests add rules scoped to the
project they created (``project_id: N``), so they share the deployment without seeing each other's
events.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ReceiverProc, RedisProc, WorkerProc, clean_env, cli_argv, wait_for
from workers.actions import public_params

URL_VAR = "CVAT_HOOKS_TEST_CVAT_URL"
USER_VAR = "CVAT_HOOKS_TEST_CVAT_USERNAME"
PASSWORD_VAR = "CVAT_HOOKS_TEST_CVAT_PASSWORD"
SERVICE_USER_VAR = "CVAT_HOOKS_TEST_CVAT_SERVICE_USERNAME"
SERVICE_PASSWORD_VAR = "CVAT_HOOKS_TEST_CVAT_SERVICE_PASSWORD"
"""Optional: the account the workers act as, as the README recommends (a dedicated service account,
e.g. ``cvat-hooks-bot``, able to see what the suite's account creates: an admin). Without it the
workers use the suite's own account, and the tests that need the two apart are skipped."""
SECRET = "real-cvat-suite-secret"
"""The receiver's configured secret (``register`` adds its own generated ones beside it)."""
DELIVERY_WAIT = 90.0
"""Seconds to wait for CVAT's webhook worker and ours (CVAT sends from a background queue)."""


def configured() -> tuple[str, str, str] | None:
    url, user, password = (os.environ.get(v) for v in (URL_VAR, USER_VAR, PASSWORD_VAR))
    return (url.rstrip("/"), user, password) if url and user and password else None


def service_account() -> tuple[str, str] | None:
    user, password = os.environ.get(SERVICE_USER_VAR), os.environ.get(SERVICE_PASSWORD_VAR)
    return (user, password) if user and password else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests ``real_cvat``, and skip them, with the reason, when no CVAT is set."""
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=f"no real CVAT: set {URL_VAR}, {USER_VAR} and {PASSWORD_VAR} (README: "
                                   "Development)")
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.real_cvat)
            if configured() is None:
                item.add_marker(skip)


# -- CVAT, through the SDK as its authors intend (the suite's own set-up, not the product) -------


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def cvat() -> Iterator[Any]:
    """An SDK client of the real CVAT, logged in as the suite's account."""
    from cvat_sdk import make_client

    found = configured()
    assert found is not None
    url, user, password = found
    with _quiet():
        client = make_client(url, credentials=(user, password))
    client.config.status_check_period = 0.5
    yield client
    client.close()


class _quiet:
    """cvat-sdk warns that it does not know the server's version: expected, not a test failure."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


def png(directory: Path, index: int) -> Path:
    """A small image that differs per frame."""
    from PIL import Image

    path = directory / f"frame-{index:03d}.png"
    Image.new("RGB", (64, 48), (40 * index % 256, 80, 160)).save(path, format="PNG")
    return path


@dataclass
class Made:
    """What a test module created in CVAT, deleted at its end (tasks before projects)."""

    cvat: Any
    run_id: str
    images: Path
    tasks: list[int] = field(default_factory=list)
    projects: list[int] = field(default_factory=list)

    def name(self, what: str) -> str:
        return f"cvat-hooks-test-{self.run_id}-{what}"

    def project(self, what: str, labels: list[str], *, org: str | None = None) -> Any:
        with self._org(org):
            project = self.cvat.projects.create({"name": self.name(what),
                                                 "labels": [{"name": n, "type": "any"} for n in labels]})
        self.projects.append(project.id)
        return project

    def task(self, what: str, *, project_id: int | None = None, labels: list[str] | None = None,
             frames: int = 3, segment_size: int = 2, org: str | None = None,
             images: list[Path] | None = None) -> Any:
        from cvat_sdk.core.proxies.tasks import ResourceType

        spec: dict[str, Any] = {"name": self.name(what), "segment_size": segment_size}
        if project_id is not None:
            spec["project_id"] = project_id
        else:
            spec["labels"] = [{"name": n, "type": "any"} for n in labels or ["car"]]
        with self._org(org):
            resources = images if images is not None else [png(self.images, i) for i in range(frames)]
            task = self.cvat.tasks.create_from_data(spec, resources=resources,
                                                    resource_type=ResourceType.LOCAL,
                                                    data_params={"image_quality": 70})
        self.tasks.append(task.id)
        return task

    def _org(self, org: str | None) -> Any:
        import contextlib

        @contextlib.contextmanager
        def context() -> Iterator[None]:
            previous = self.cvat.organization_slug
            self.cvat.organization_slug = org
            try:
                yield
            finally:
                self.cvat.organization_slug = previous

        return context()

    def cleanup(self) -> None:
        for task_id in self.tasks:
            _ignore(lambda t=task_id: self.cvat.tasks.remove_by_ids([t]))
        for project_id in self.projects:
            _ignore(lambda p=project_id: self.cvat.projects.remove_by_ids([p]))


def _ignore(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001 - cleanup of what may already be gone
        pass


@pytest.fixture(scope="module")
def made(cvat: Any, run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    made = Made(cvat, run_id, tmp_path_factory.mktemp("images"))
    yield made
    made.cleanup()


# -- one cvat-hooks deployment: real redis-server, gunicorn receiver, RQ worker --------------------


class Deployment:
    """``cvat-hooks serve`` + ``cvat-hooks worker`` on their own redis-server, acting on the real CVAT."""

    def __init__(self, directory: Path, *, extra_env: dict[str, str] | None = None) -> None:
        url, user, password = configured() or ("", "", "")
        user, password = service_account() or (user, password)
        self.dir = directory
        self.data_dir = directory / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.rules_path = directory / "rules.yaml"
        self.rules: list[str] = []
        self._write_rules()
        self.redis = RedisProc(directory / "redis", directory / "logs").start()
        self.env = {
            "CVAT_HOOKS_REDIS_URL": self.redis.url, "CVAT_HOOKS_SECRET": SECRET,
            "CVAT_HOOKS_RULES": str(self.rules_path), "CVAT_HOOKS_DATA_DIR": str(self.data_dir),
            "CVAT_URL": url, "CVAT_USERNAME": user, "CVAT_PASSWORD": password,
            "CVAT_HOOKS_CVAT_POLL_SECONDS": "0.2", "CVAT_HOOKS_RECONCILE_MINUTES": "0",
            # notify's listener in these tests is on loopback, which notify reaches only when listed.
            "CVAT_HOOKS_NOTIFY_ALLOWED_HOSTS": "127.0.0.1",
            **(extra_env or {}),
        }
        if "CVAT_ACCESS_TOKEN" in self.env:  # a personal access token instead of a login
            self.env.pop("CVAT_USERNAME"), self.env.pop("CVAT_PASSWORD")
        self.receiver = ReceiverProc(self.env, directory / "logs").start()
        self.worker = WorkerProc(self.env, directory / "logs", kind="split").start()

    @property
    def url(self) -> str:
        return self.receiver.url

    def add_rules(self, text: str) -> None:
        """Add rules (YAML list items, indented by 2) and wait until the receiver can have reloaded."""
        self.rules.append(text)
        self._write_rules()
        time.sleep(1.2)  # the receiver stats the file at most once a second, at a delivery

    def _write_rules(self) -> None:
        body = "".join(self.rules) or "  []\n"
        text = "version: 1\nrules:\n" + body if self.rules else "version: 1\nrules: []\n"
        tmp = self.rules_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.rules_path)

    def cli(self, *args: str, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``cvat-hooks ARGS`` in a subprocess with this deployment's settings."""
        done = subprocess.run(cli_argv(*args), env=clean_env({**self.env, **(env or {})}), capture_output=True,
                              text=True, timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"cvat-hooks {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def register(self, *scope: str, extra: tuple[str, ...] = ()) -> str:
        return self.cli("register", *scope, "--url", self.url, *extra).stdout

    def deliveries(self, **filters: str) -> list[dict[str, Any]]:
        args = [a for k, v in filters.items() for a in (f"--{k}", v)]
        return json.loads(self.cli("deliveries", "list", "--json", *args).stdout)

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        return json.loads(self.cli("deliveries", "show", delivery_id, "--json").stdout)

    def wait_delivery(self, predicate: Callable[[dict[str, Any]], bool], *, done: bool = True,
                      timeout: float = DELIVERY_WAIT) -> dict[str, Any]:
        """The first delivery (newest first) ``predicate`` accepts, once its actions finished."""
        found: dict[str, Any] = {}

        def check() -> bool:
            for item in self._log().list(limit=200):
                summary = item.to_json(shown=public_params)
                if predicate(summary) and (not done or item.status.value in ("succeeded", "failed", "no_match")):
                    found.update(summary)
                    return True
            return False

        if not wait_for(check, timeout=timeout, interval=0.5):
            raise AssertionError(f"no such delivery within {timeout:g} s; the receiver's log ends:\n"
                                 f"{self.receiver.log_text()[-2000:]}\nthe worker's:\n{self.worker.log_text()[-3000:]}")
        return found

    def explain(self, count: int = 8) -> str:
        """The latest deliveries (event, rules, each action's outcome) and the worker's log: what a
        failed wait shows."""
        lines = []
        for item in self._log().list(limit=count):
            d = item.to_json(shown=public_params)
            lines.append(f"{d.get('event')} {d.get('ids')} source={d.get('transitions')} rules={rules_of(d)} "
                         f"actions={[(a.get('action'), a.get('status'), a.get('error')) for a in d['actions']]}")
        return "\n".join(lines) + "\nworker log:\n" + self.worker.log_text()[-2500:]

    def _log(self) -> Any:
        from core.delivery_log import DeliveryLog

        return DeliveryLog(self.redis.client(), retention_seconds=86400)

    def stop(self) -> None:
        for proc in (self.worker, self.receiver, self.redis):
            proc.stop()


@pytest.fixture(scope="module")
def access_token(run_id: str) -> Iterator[str]:
    """A personal access token of the workers' account (made through CVAT's API, revoked after)."""
    import base64
    import urllib.request

    url, user, password = configured() or ("", "", "")
    user, password = service_account() or (user, password)
    basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                         headers={"Authorization": basic, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            data = answer.read()
        return json.loads(data) if data else None

    made = call("POST", "/api/auth/access_tokens", {"name": f"cvat-hooks-test-{run_id}", "read_only": False})
    yield made["value"]
    _ignore(lambda: call("DELETE", f"/api/auth/access_tokens/{made['id']}"))


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 on loopback, and the AWS environment a deployment uses to reach it."""
    from tests.moto_s3 import s3_endpoint

    home = tmp_path_factory.mktemp("aws")
    with s3_endpoint() as endpoint:
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(home / "none"),
               "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"), "AWS_EC2_METADATA_DISABLED": "true"}


def s3_client(env: dict[str, str]) -> Any:
    import boto3  # type: ignore[import-untyped]

    return boto3.session.Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                          aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, s3_env: dict[str, str]) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("deployment"), extra_env=s3_env)
    yield deployment
    deployment.stop()


def rules_of(summary: dict[str, Any]) -> list[str]:
    """The ids of the rules a delivery matched."""
    return [m["rule_id"] for m in summary.get("matched") or []]


def payload_of(summary: dict[str, Any]) -> dict[str, Any]:
    """The payload CVAT sent, as the delivery record keeps it."""
    return summary.get("payload") or {}
