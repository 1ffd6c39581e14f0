"""Health of this container's process, whichever role it plays (for Docker's HEALTHCHECK)."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from core.settings import WorkerSettings


def role(cmdline_path: Path = Path("/proc/1/cmdline")) -> str:
    """``worker`` if the container's main process is a worker, else ``receiver``."""
    try:
        argv = cmdline_path.read_bytes().split(b"\0")
    except OSError:
        return "receiver"
    return "worker" if b"worker" in argv else "receiver"


def check(*, port: int, settings: WorkerSettings) -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    if role() == "worker":
        from rq import Worker

        from core.redis_conn import connect

        try:
            redis = connect(settings.redis_url)
            mine = [w for w in Worker.all(connection=redis) if w.hostname == socket.gethostname()]
        except Exception as exc:  # any failure is "unhealthy", said in one line
            return False, f"worker: Redis unreachable ({type(exc).__name__})"
        return (bool(mine), f"worker: {len(mine)} registered RQ worker(s) on this host")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as answer:
            return answer.status == 200, f"receiver: /healthz {answer.status}"
    except OSError as exc:
        return False, f"receiver: /healthz unreachable ({exc})"
