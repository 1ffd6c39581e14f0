"""Processes the benchmark starts, stops (by PID, never by name) and measures.

Memory is read from ``/proc/<pid>/smaps_rollup`` for every process of a tree: ``Rss`` (what the
issue's targets and ``ps`` speak of) and ``Pss`` (shared pages divided among the processes sharing
them). Summed over a tree, RSS counts pages shared after a ``fork()`` once per process, so a forking
RQ worker looks as if it doubled its memory for every job; PSS sums to what the tree really holds.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
from redis import Redis

from tests.procs import free_port, redis_binary

ROOT = Path(__file__).resolve().parents[1]
"""The repository: every Python child runs from here so ``bench`` and ``tests`` import."""

SERVER_CPU = 1
"""The core the servers under test get during intake."""
LOAD_CPU = 0
"""The core ``wrk`` (and this process) get during intake."""

MB = 1024 * 1024


@contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run this process on one core for a while (then on the cores it had before)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# -- memory -----------------------------------------------------------------------------------


def proc_memory(pid: int) -> tuple[int, int]:
    """``(rss, pss)`` of one process in bytes; ``(0, 0)`` if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, pss


def tree_pids(pid: int) -> list[int]:
    """A process and its descendants (empty if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


@dataclass
class MemorySample:
    t: float
    rss: int
    pss: int
    procs: int


def tree_memory(pid: int) -> MemorySample:
    """RSS and PSS summed over a process tree, now."""
    rss = pss = 0
    pids = tree_pids(pid)
    for p in pids:
        r, s = proc_memory(p)
        rss, pss = rss + r, pss + s
    return MemorySample(time.monotonic(), rss, pss, len(pids))


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process tree, reaped children included.

    Unlike req/s, CPU per request hardly moves when other work shares the machine, so it is the
    steadier figure on a busy host. A child that exited without being reaped is not counted.
    """
    total = 0.0
    for p in tree_pids(pid):
        try:
            t = psutil.Process(p).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class TreeSampler:
    """Samples a process tree's memory in a thread until stopped; keeps the peak and named marks."""

    def __init__(self, pid: int, *, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[MemorySample] = []
        self.marks: dict[str, MemorySample] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sampler:{pid}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = tree_memory(self.pid)
            if sample.procs:
                self.samples.append(sample)
            self._stop.wait(self.interval)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def mark(self, name: str) -> MemorySample:
        """Record the tree's memory now under ``name`` (e.g. ``start``, ``end``)."""
        sample = tree_memory(self.pid)
        self.samples.append(sample)
        self.marks[name] = sample
        return sample

    def peak(self, since: float | None = None) -> MemorySample:
        """The sample with the largest RSS (after ``since``, a ``time.monotonic()`` value)."""
        chosen = [s for s in self.samples if since is None or s.t >= since] or [MemorySample(0, 0, 0, 0)]
        return max(chosen, key=lambda s: s.rss)

    def peak_pss(self, since: float | None = None) -> MemorySample:
        chosen = [s for s in self.samples if since is None or s.t >= since] or [MemorySample(0, 0, 0, 0)]
        return max(chosen, key=lambda s: s.pss)


# -- processes --------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process we started; stopped by its PID (and its leftover descendants by theirs)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal the process, wait, then SIGKILL it and whatever it left behind."""
        descendants: list[psutil.Process] = []
        try:
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            pass
        if self.alive():
            try:
                self.popen.send_signal(sig)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        # Children it should have stopped itself; psutil checks the PID still names the same process.
        for child in descendants:
            try:
                if child.is_running():
                    child.kill()
            except psutil.Error:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode

    def tail(self, lines: int = 20) -> str:
        """The end of the process's log (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start(name: str, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cpu: int | None = None,
          log_dir: Path | None = None, cwd: Path = ROOT) -> Proc:
    """Start ``cmd`` (pinned to ``cpu`` with taskset), its output to ``log_dir/name.log``."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    argv = list(cmd)
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu), *argv]  # taskset execs the command: same PID
    log: IO[bytes] | None = None
    log_path = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed by Proc.stop
    popen = subprocess.Popen(argv, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                             stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return Proc(name, popen, log_path, log)


def wait_http(url: str, proc: Proc, *, timeout: float = 30.0, ok: Sequence[int] = (200,)) -> None:
    """Wait until ``url`` answers with one of ``ok`` (raises with the process's log if it died)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status in ok:
                    return
                last = resp.status
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
            last = exc.code
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: {url} not ready after {timeout:g}s (last: {last})\n{proc.tail()}")


def wait_port(port: int, proc: Proc, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on ``127.0.0.1:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: port {port} not open after {timeout:g}s\n{proc.tail()}")


class RedisProc:
    """A real redis-server configured like production (``--save '' --appendonly yes``)."""

    def __init__(self, directory: Path, *, cpu: int | None = None, appendonly: bool = True) -> None:
        self.directory = directory
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = start("redis", [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                                    "--dir", str(directory), "--save", "",
                                    "--appendonly", "yes" if appendonly else "no",
                                    "--protected-mode", "yes"], cpu=cpu, log_dir=directory)
        self.client = Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                break
            except Exception:
                if time.monotonic() > deadline or not self.proc.alive():
                    raise RuntimeError(f"redis-server did not start:\n{self.proc.tail()}") from None
                time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        self.client.flushall()

    def rss(self) -> int:
        return proc_memory(self.proc.pid)[0]

    def stop(self) -> None:
        self.client.close()
        self.proc.stop()

    def __enter__(self) -> RedisProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the machine ------------------------------------------------------------------------------


def tool_version(cmd: Sequence[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (saved with every result)."""
    from importlib.metadata import PackageNotFoundError, version

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages = {}
    for name in ("flask", "gunicorn", "rq", "redis", "cvat-sdk", "boto3", "moto", "werkzeug"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "memory_mb": psutil.virtual_memory().total // MB,
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "packages": packages,
        "wrk": tool_version(["wrk", "-v"]),
        "webhook": tool_version(["webhook", "-version"]),
        "redis_server": tool_version([redis_binary(), "--version"]),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
