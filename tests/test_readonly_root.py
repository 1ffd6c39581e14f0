"""The container's promise without a container: non-root, read-only root, one writable volume.

The image runs as uid 10001 with ``--read-only`` and a ``/data`` volume. Building the image needs
podman and a base-image stand-in (slow), so the suite checks the two halves apart:

- the Dockerfile says so (static checks below);
- the real service, started by the real entrypoint in the trial set-up (embedded Redis, gunicorn,
  a worker), runs in mount and PID namespaces where every mount is read-only except the data
  directory (``tests/readonly_sandbox.py``), as uid 10001 when the tests run as root (CI), with the
  Dockerfile's environment. It takes a signed delivery, its worker exports from the test CVAT server
  into the data directory, and no process logs a refused write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from receiver.secrets_store import read_secrets
from receiver.signature import sign
from tests.conftest import ROOT, capture, free_port
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer
from tests.procs import children, clean_env, descendants, http, wait_for

SANDBOX = Path(__file__).with_name("readonly_sandbox.py")
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
ADMIN_TOKEN = "readonly-root-admin-token-0123456789"
IMAGE_DATA = "/data"
"""The data volume's path in the image (the static tests check the Dockerfile agrees)."""

RULES = """
version: 1
rules:
  - id: export-finished-jobs
    on: update:job
    if:
      job.state: {became: completed}
      job.stage: acceptance
    do:
      - action: export
        resource: job
        format: CVAT for images 1.1
        to: exports/{project_id}/{task_id}/job-{job_id}.zip
    retry: {attempts: 1}
"""

# What a process prints when the filesystem refuses it a write (EROFS), or the uid lacks a right.
REFUSED_WRITE = re.compile(r"Read-only file system|Errno 30|EROFS|Permission denied|Errno 13")


# -- the Dockerfile ---------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    """The image's ``ENV`` settings (``KEY=value`` form)."""
    env: dict[str, str] = {}
    for word, rest in dockerfile():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def last(instruction: str) -> str:
    found = [rest for word, rest in dockerfile() if word == instruction]
    assert found, f"the Dockerfile has no {instruction}"
    return found[-1]


def in_data(path: str) -> bool:
    return path == IMAGE_DATA or path.startswith(IMAGE_DATA + "/")


def test_dockerfile_user_is_a_numeric_non_root_uid():
    """USER is a number other than 0 (Kubernetes' runAsNonRoot can only verify a numeric uid)."""
    user = last("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0, user


def test_dockerfile_declares_the_data_volume_and_keeps_state_and_temp_files_there():
    """VOLUME is the data directory, and CVAT_HOOKS_DATA_DIR and TMPDIR point into it."""
    volume = last("VOLUME")
    volumes = json.loads(volume) if volume.startswith("[") else volume.split()
    env = dockerfile_env()
    assert IMAGE_DATA in volumes
    assert env.get("CVAT_HOOKS_DATA_DIR") == IMAGE_DATA
    assert in_data(env.get("TMPDIR", "/tmp")), "temporary files must go to the volume: / is read-only"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", "no .pyc writes into the read-only image"


def test_dockerfile_gives_the_data_directory_to_the_user():
    """The data directory is created in the image and owned by the USER uid (a fresh volume copies that)."""
    uid = last("USER").split(":")[0]
    runs = " ".join(rest for word, rest in dockerfile() if word == "RUN")
    assert re.search(rf"mkdir -p {IMAGE_DATA}\b", runs)
    assert re.search(rf"chown {uid}(:\d+)? {IMAGE_DATA}\b", runs)


def test_dockerfile_has_the_role_aware_healthcheck():
    """HEALTHCHECK runs ``cvat-hooks healthcheck`` (the live test below runs it on a read-only root)."""
    health = last("HEALTHCHECK")
    assert re.search(r'CMD \[?"?cvat-hooks"?,? "?healthcheck', health), health


# -- the sandbox ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How this machine builds the sandbox."""

    unshare: list[str]
    uid: int | None
    """The uid the service runs as (None: stay the mapped root of a user namespace)."""
    host_uid: int
    """The uid the service's processes have as this host sees them."""


def sandbox_mode() -> Mode:
    """As root: plain namespaces and a real switch to the image's uid. Otherwise: a user namespace
    (the service is then the unprivileged caller, as the host sees it)."""
    if os.geteuid() == 0:
        uid = int(last("USER").split(":")[0])
        return Mode(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"], uid, uid)
    return Mode(["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--mount-proc",
                 "--kill-child"], None, os.geteuid())


def unavailable(reason: str) -> None:
    """Skip on a developer's machine that cannot build the sandbox; CI must run this test."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the read-only root test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def mode() -> Mode:
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        unavailable("needs Linux and `unshare` (util-linux)")
    chosen = sandbox_mode()
    probe = subprocess.run([*chosen.unshare, "true"], capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        unavailable(f"this kernel refuses the namespaces: {probe.stderr.strip()}")
    return chosen


class ReadOnlyService:
    """``docker-entrypoint.sh serve`` in the sandbox; stopped through its PID 1, by PID."""

    def __init__(self, mode: Mode, root: Path, cvat: CvatTestServer) -> None:
        self.mode = mode
        self.data = root / "data"
        self.app = root / "app"
        self.log_path = root / "service.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data.mkdir()
        self.data.chmod(0o770)
        if mode.uid is not None:
            os.chown(self.data, mode.uid, 0)  # as the image's `chown 10001:0 /data`
        self.app.mkdir()
        (self.app / "rules.yaml").write_text(RULES)
        self.env = self._env(cvat)
        self.popen: subprocess.Popen[bytes] | None = None

    def _env(self, cvat: CvatTestServer) -> dict[str, str]:
        """The Dockerfile's ENV, with its /data, /app and /opt/venv mapped to this test's paths."""
        env = clean_env({})
        for key, value in dockerfile_env().items():
            if key in ("PATH", "VIRTUAL_ENV"):
                continue
            if in_data(value):
                value = str(self.data) + value[len(IMAGE_DATA):]
            env[key] = value
        env.update(
            CVAT_HOOKS_RULES=str(self.app / "rules.yaml"), VIRTUAL_ENV=sys.prefix, HOME=str(self.data),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            CVAT_URL=cvat.url, CVAT_ACCESS_TOKEN=DEFAULT_TOKEN, CVAT_HOOKS_CVAT_POLL_SECONDS="0.1",
            CVAT_HOOKS_ADMIN_TOKEN=ADMIN_TOKEN, CVAT_HOOKS_PORT=str(self.port))
        return env

    def _sandbox(self, *where: str, command: list[str]) -> list[str]:
        ids = ["--uid", str(self.mode.uid), "--gid", str(self.mode.uid)] if self.mode.uid is not None else []
        return [sys.executable, str(SANDBOX), *where, *ids, "--cwd", str(self.app), "--", *command]

    def start(self) -> None:
        """Start it and wait until /readyz answers 200 (Redis up, rules loaded)."""
        # Everything the uid must read: the interpreter, the venv, the (editable) source, the rules.
        needed = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, ROOT, self.app)}
        needed.add(Path(sys.executable).resolve().parent)
        needed.update(Path(p).resolve() for p in sys.path if p and Path(p).is_dir())
        exposes = [a for p in sorted(needed) for a in ("--expose", str(p))]
        argv = [*self.mode.unshare, *self._sandbox("--data", str(self.data), *exposes, command=[
            str(ENTRYPOINT), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"])]
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)

        def ready() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(f"the sandboxed service exited:\n{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False

        assert wait_for(ready, timeout=30, interval=0.1), f"no /readyz:\n{self.log()[-3000:]}"

    @property
    def pid1(self) -> int:
        """The sandbox's PID 1 (the entrypoint, exec'd into ``cvat-hooks serve``) as this host sees it."""
        assert self.popen is not None
        [pid] = children(self.popen.pid)
        return pid

    def processes(self) -> list[int]:
        return [self.pid1, *descendants(self.pid1)]

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        """Run a command inside the running sandbox, as the service's uid (``docker exec``)."""
        return subprocess.run(self._sandbox("--join", str(self.pid1), command=list(command)), env=self.env,
                              capture_output=True, text=True, timeout=30)

    def stop(self) -> int | None:
        """SIGTERM PID 1 and wait; if it hangs, SIGKILL `unshare`: the kernel then kills the namespace."""
        if self.popen is None or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        for pid in children(self.popen.pid):
            os.kill(pid, signal.SIGTERM)
        try:
            return self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def service(mode: Mode, tmp_path: Path, cvat_server: CvatTestServer) -> Iterator[ReadOnlyService]:
    running = ReadOnlyService(mode, tmp_path, cvat_server)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def host_uids(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uid of a process, as this host sees them."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return {int(u) for u in line.split()[1:]}
    raise AssertionError(f"no Uid line for {pid}")


PROBE = """
import errno, os, sys
for path in sys.argv[1:]:
    try:
        with open(os.path.join(path, ".readonly-probe"), "x"):
            pass
        os.unlink(os.path.join(path, ".readonly-probe"))
        print(path, "written")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
"""


def test_the_service_runs_non_root_on_a_read_only_root_with_one_writable_volume(service, cvat_server):
    """Entrypoint + trial serve + worker in the sandbox: a signed delivery is exported into the data
    directory, the healthcheck passes, every other path refuses writes, and nothing logs a refused write."""
    processes = service.processes()
    # serve, gunicorn's master and worker, the RQ worker, the embedded redis-server at least.
    assert len(processes) >= 5, processes
    assert {uid for pid in processes for uid in host_uids(pid)} == {service.mode.host_uid}
    assert service.mode.host_uid != 0

    secret = read_secrets([service.data / "webhook-secrets"])[0]
    body, _ = capture("update_job_completed.json")
    status, receipt = http(service.url + "/webhooks/cvat", body,
                           {"X-Signature-256": sign(body, secret), "Content-Type": "application/json"})
    assert status == 202, receipt

    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    shown: dict = {}

    def finished() -> bool:
        nonlocal shown
        shown = http(f"{service.url}/api/deliveries/{receipt['delivery_id']}", headers=auth)[1]
        return shown.get("status") in ("succeeded", "failed")

    assert wait_for(finished, timeout=20, interval=0.2), shown
    assert shown["status"] == "succeeded", json.dumps(shown, indent=1)[:3000]
    export = service.data / "exports" / "1" / "2" / "job-1.zip"
    [rq_id] = list(cvat_server.state.requests)
    assert hashlib.sha256(export.read_bytes()).hexdigest() == cvat_server.export_digest(rq_id)
    assert export.stat().st_uid == service.mode.host_uid
    assert (service.data / "tmp").is_dir(), "the entrypoint creates TMPDIR on the volume"

    health = service.exec("cvat-hooks", "healthcheck")
    assert health.returncode == 0 and "receiver: /healthz 200" in health.stdout, health

    # Every place but the volume and /dev/shm refuses writes with EROFS, even world-writable /tmp.
    places = ["/", "/tmp", "/var/tmp", str(ROOT), sys.prefix, str(service.app)]
    probe = service.exec("python", "-c", PROBE, *places, str(service.data), "/dev/shm")
    assert probe.returncode == 0, probe
    verdicts = dict(line.rsplit(" ", 1) for line in probe.stdout.splitlines())
    assert verdicts == {**{p: "EROFS" for p in places}, str(service.data): "written", "/dev/shm": "written"}

    assert service.stop() == 0, service.log()[-3000:]
    refused = [line for line in service.log().splitlines() if REFUSED_WRITE.search(line)]
    assert not refused, "\n".join(refused)
