"""``run``: start an executable of your own on an event, as adnanh/webhook does, without a shell.

Parameters::

    command: [/opt/hooks/on-task, --task, "{task_id}", "{task.name}"]   # argv: a literal path, then arguments
    env: {TASK_NAME: "{task.name}", API_TOKEN: "${MY_API_TOKEN}"}       # extra environment (placeholders rendered)
    timeout: 60          # seconds (default 60, at most 240); then the process group is killed
    cwd: /srv/hooks      # default: a new empty directory, removed afterwards
    causes: [update:job] # CVAT events the script makes as cvat-hooks's own CVAT account (loop guard)

What may run: only an executable whose real path (symlinks resolved) lies inside a directory of
``CVAT_HOOKS_RUN_DIRS``. The path is ``command[0]`` written literally in the rule (absolute, no
placeholder), so no event can choose what runs; the receiver checks it when the rules load if it
sees ``CVAT_HOOKS_RUN_DIRS`` (a warning otherwise) and the worker checks it before every start.
Placeholders render into the other arguments, each its own argv item: nothing passes through a
shell, so a task named ``; rm -rf /`` is one harmless argument (a value starting with ``-`` can
still look like an option to the script: put ``--`` before such arguments, or write
``--name={task.name}``).

What it gets: the event essentials as JSON on stdin (``event``, ``resource``, ``resource_id``,
``project_id``, ``task_id``, ``job_id``, ``org_id``, ``updated_date``, ``webhook_id``, ``object``);
an environment of ``PATH`` (``/usr/local/bin:/usr/bin:/bin``), ``LANG``, the rule's ``env`` and
``CVAT_HOOKS_DELIVERY_ID``, ``CVAT_HOOKS_RULE_ID``, ``CVAT_HOOKS_EVENT`` and
``CVAT_HOOKS_IDEMPOTENCY_KEY`` (the same for every retry of one action of one delivery, new for a
replay: a script that changes something keyed by it acts once). None of the worker's own
environment reaches it: not the CVAT token, webhook secrets or AWS keys. A value the script needs
that is a secret is written ``${NAME}`` in ``env`` and read from the worker's environment when the
script starts (``core.rule_secrets``), so it is never stored in Redis; output is masked with it.
Loader variables (``LD_*``, ``BASH_ENV``, ``PYTHONPATH``...) cannot be set: they would run code
from elsewhere than the allowed directories.

Outcome: exit 0 succeeds; 75 (``EX_TEMPFAIL``) is retried by the rule's retry policy; a timeout is
retried too (the whole process group is killed first); any other exit, or death by a signal, fails
at once. The first 64 KiB of stdout and of stderr, redacted, go to the delivery log's result, with
how many bytes were cut. After a success a Redis marker per (delivery, rule, action, run) stops a
retry of the same job from running the script again.

Result: ``{"command", "exit_code", "seconds", "stdout", "stderr"}``, plus ``stdout_cut_bytes`` /
``stderr_cut_bytes`` when cut.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import PermanentError, TransientError
from core.redaction import Redactor
from workers.actions._params import call_key, text, unknown_params
from workers.context import ActionContext

PARAMS = ("command", "env", "timeout", "cwd", "causes")
EX_TEMPFAIL = 75
"""sysexits.h: "temporary failure; the user is invited to retry"."""
DEFAULT_TIMEOUT = 60
MAX_TIMEOUT = 240
"""Seconds: below the light queue's 300-second job limit, so our kill, not RQ's, ends a script."""
OUTPUT_LIMIT = 64 * 1024
"""Bytes of stdout and of stderr kept in the delivery log."""
GRACE = 1.0
"""Seconds the pipes may stay open after the script exits (a child it left behind) before the
process group is killed."""
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
MARKER_TTL = 30 * 86400
"""Seconds a ran-marker is kept (as long as delivery records)."""
OWN_ENV = ("CVAT_HOOKS_DELIVERY_ID", "CVAT_HOOKS_RULE_ID", "CVAT_HOOKS_EVENT", "CVAT_HOOKS_IDEMPOTENCY_KEY",
           "CVAT_HOOKS_ATTEMPT")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOADER_VARS = re.compile(
    r"(LD_|DYLD_|BASH_FUNC_|PERL5|RUBY|GCONV_|GIT_)\w*|PYTHON(?!UNBUFFERED$|IOENCODING$|UTF8$|DONTWRITEBYTECODE$)\w*"
    r"|BASH_ENV|ENV|IFS|SHELLOPTS|BASHOPTS|PS4|NODE_OPTIONS|NODE_PATH|LOCPATH|NLSPATH|HOSTALIASES|JAVA_TOOL_OPTIONS")
"""Variables that make the dynamic loader, a shell or an interpreter run code from elsewhere than
the script (``PYTHONSTARTUP``, ``BASH_ENV``, ``LD_PRELOAD``...)."""
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|AUTH|CREDENTIAL", re.I)


def _literal(value: Any) -> bool:
    return isinstance(value, str) and "{" not in value and "}" not in value


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def executable_problem(path: str, dirs: tuple[Path, ...]) -> str | None:
    """Why ``path`` may not run (outside every run directory once symlinks are resolved, missing,
    not an executable file), or ``None``."""
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(d) for d in dirs):
        where = f" (really {real})" if str(real) != path else ""
        return (f"{path}{where} is not inside a directory of CVAT_HOOKS_RUN_DIRS "
                f"({os.pathsep.join(map(str, dirs))})")
    if not real.is_file():
        return f"{path} is not a file"
    if not os.access(real, os.X_OK):
        return f"{path} is not executable (chmod +x)"
    return None


def validate(params: Mapping[str, Any], *, dirs: tuple[Path, ...] | None = None,
             at_load: bool = True) -> list[str]:
    """Command, env, timeout, cwd and causes; at load, also whether ``CVAT_HOOKS_RUN_DIRS`` (as
    this process sees it, or ``dirs``) allows the command."""
    from workers.actions import LoadWarning

    problems: list[str] = unknown_params(params, PARAMS)
    command = params.get("command")
    if not isinstance(command, list) or not command:
        problems.append("command is required: a list, [/absolute/path/to/executable, argument, ...]")
    else:
        exe = command[0]
        if not _literal(exe) or not exe.startswith("/"):
            problems.append(f"command[0] must be an absolute path written out, without placeholders, not {exe!r}")
        elif at_load:
            if dirs is None:
                from core.settings import run_dirs

                dirs = run_dirs()
            if dirs is None:
                problems.append(LoadWarning(f"CVAT_HOOKS_RUN_DIRS is not set here: the worker checks that {exe} "
                                            "lies inside one of its directories when the action runs"))
            elif (why := executable_problem(exe, dirs)) is not None:
                problems.append(why)
        if not all(_scalar(arg) for arg in command[1:]):
            problems.append("command arguments must be text or numbers (each is one argument; no lists)")
    env = params.get("env")
    if env is not None:
        if not isinstance(env, Mapping):
            problems.append("env must be a mapping of variable names to values")
        else:
            for name, value in env.items():
                if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                    problems.append(f"env: {name!r} is not a variable name")
                elif name in OWN_ENV:
                    problems.append(f"env: {name} is set by cvat-hooks")
                elif _LOADER_VARS.fullmatch(name.upper()):
                    problems.append(f"env: {name} cannot be set (it would make the script run code from "
                                    "outside CVAT_HOOKS_RUN_DIRS)")
                elif name == "PATH" and not _literal(value):
                    problems.append("env: PATH must be written out, without placeholders")
                elif not _scalar(value):
                    problems.append(f"env: {name} must be text or a number")
    timeout = params.get("timeout")
    if timeout is not None and (not _scalar(timeout) or isinstance(timeout, str) or not 0 < timeout <= MAX_TIMEOUT):
        problems.append(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT}], not {timeout!r}")
    cwd = params.get("cwd")
    if cwd is not None and (not _literal(cwd) or not cwd.startswith("/")):
        problems.append(f"cwd must be an absolute path written out, without placeholders, not {cwd!r}")
    causes = params.get("causes")
    if causes is not None and (not isinstance(causes, list) or not all(isinstance(c, str) for c in causes)):
        problems.append("causes must be a list of CVAT event names, e.g. [update:job]")
    return problems


def public_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters as shown: values of ``env`` variables whose name says secret are masked."""
    shown = dict(params)
    if isinstance(shown.get("env"), Mapping):
        shown["env"] = {k: ("***" if _SECRET_NAME.search(str(k)) else v) for k, v in shown["env"].items()}
    return shown


@dataclass
class Captured:
    """The first :data:`OUTPUT_LIMIT` bytes of one stream, and how many bytes after them were dropped."""

    data: bytearray = field(default_factory=bytearray)
    cut: int = 0

    def add(self, chunk: bytes) -> None:
        room = OUTPUT_LIMIT - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.cut += max(len(chunk) - max(room, 0), 0)

    def shown(self, redactor: Redactor) -> str:
        return redactor.text(self.data.decode("utf-8", errors="replace"))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def communicate(proc: subprocess.Popen[bytes], stdin: bytes, timeout: float) -> tuple[Captured, Captured, bool]:
    """Feed ``stdin``, keep the head of stdout and stderr (reading on, so the script never blocks
    on a full pipe), and kill the process group at ``timeout``. ``(stdout, stderr, timed_out)``."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = Captured(), Captured()
    deadline = time.monotonic() + timeout
    exited_at: float | None = None
    timed_out = False
    pending = memoryview(stdin)
    with selectors.DefaultSelector() as sel:
        if pending:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if now >= deadline or (exited_at is not None and now - exited_at > GRACE):
                timed_out = now >= deadline
                _kill_group(proc)
                break
            for key, _ in sel.select(timeout=min(0.2, deadline - now)):
                if key.fileobj is proc.stdin:
                    try:
                        written = os.write(proc.stdin.fileno(), pending[:65536])
                        pending = pending[written:]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the script does not read its input: its choice
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data.add(chunk)
                else:
                    sel.unregister(key.fileobj)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        proc.wait()
    return out, err, timed_out


def child_env(ctx: ActionContext, env: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The script's whole environment, and the secret values in it (to mask in its output)."""
    from core.rule_secrets import unseal

    out = {"PATH": CHILD_PATH, "LANG": "C.UTF-8"}
    secrets = []
    for name, value in env.items():
        raw = str(value)
        out[name] = unseal(raw, ctx.settings.rule_secret)
        if out[name] != raw.replace("$$", "$") or _SECRET_NAME.search(name):
            secrets.append(out[name])
    call = ctx.call
    out.update(CVAT_HOOKS_DELIVERY_ID=call.delivery_id, CVAT_HOOKS_RULE_ID=call.rule_id,
               CVAT_HOOKS_EVENT=str(ctx.event.get("event") or ""), CVAT_HOOKS_IDEMPOTENCY_KEY=call.job_id)
    attempt = getattr(ctx, "attempt", None)  # set by workers.jobs when the context carries it
    if isinstance(attempt, int):
        out["CVAT_HOOKS_ATTEMPT"] = str(attempt)
    return out, secrets


def start(argv: list[str], executable: str, env: dict[str, str], cwd: str) -> subprocess.Popen[bytes]:
    """Start the script in a session (so a process group) of its own; a start that cannot work
    again (missing, not executable, arguments too long) is permanent, the rest (no memory, no
    processes left) transient."""
    import errno

    try:
        return subprocess.Popen(argv, executable=executable, env=env, cwd=cwd, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                close_fds=True)
    except ValueError as exc:  # a NUL byte in an argument or the environment
        raise PermanentError(f"run {argv[0]}: {exc}") from None
    except OSError as exc:
        error = TransientError if exc.errno in (errno.EAGAIN, errno.ENOMEM) else PermanentError
        raise error(f"run {argv[0]}: cannot start: {exc.strerror or exc}") from None


def run(ctx: ActionContext) -> dict[str, Any]:
    """Run the command once for this call; see the module docstring."""
    params = ctx.params
    problems = validate(params, at_load=False)
    if problems:
        raise PermanentError("; ".join(problems))
    dirs = ctx.settings.run_dirs
    argv = [str(a) for a in params["command"]]
    if not dirs:
        raise PermanentError("CVAT_HOOKS_RUN_DIRS is not set for the worker: run starts nothing")
    if (why := executable_problem(argv[0], dirs)) is not None:
        raise PermanentError(f"run: {why}")
    marker = call_key("ran", ctx.call)
    previous = text(ctx.redis.get(marker))
    if previous is not None:
        ctx.note("already ran", command=argv[0])
        return {"skipped": "already ran", **json.loads(previous)}

    env, secrets = child_env(ctx, params.get("env") or {})
    redactor = Redactor([*ctx.settings.secrets(), *secrets])
    timeout = float(params.get("timeout") or DEFAULT_TIMEOUT)
    stdin = json.dumps(ctx.event).encode()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cvat-hooks-run-") as scratch:
        cwd = params.get("cwd") or scratch
        if not Path(cwd).is_dir():
            raise PermanentError(f"run {argv[0]}: cwd {cwd} is not a directory")
        proc = start(argv, os.path.realpath(argv[0]), env, cwd)
        ctx.note(f"started {argv[0]} (pid {proc.pid})")
        try:
            out, err, timed_out = communicate(proc, stdin, timeout)
        finally:
            if proc.poll() is None:  # an exception (RQ's own job timeout) must not leave it running
                _kill_group(proc)
                proc.wait()
    result: dict[str, Any] = {"command": [redactor.text(a) for a in argv], "exit_code": proc.returncode,
                              "seconds": round(time.monotonic() - began, 3),
                              "stdout": out.shown(redactor), "stderr": err.shown(redactor)}
    for name, captured in (("stdout", out), ("stderr", err)):
        if captured.cut:
            result[f"{name}_cut_bytes"] = captured.cut
    code = proc.returncode
    if timed_out:
        ctx.note(f"timed out after {timeout:g} s; process group killed")
        raise TransientError(f"run {argv[0]}: timed out after {timeout:g} s (process group killed)", result=result)
    last = next((line for line in reversed(result["stderr"].splitlines()) if line.strip()), "")[:200]
    detail = f": {last}" if last else ""
    if code == EX_TEMPFAIL:
        ctx.note(f"exited {code} (EX_TEMPFAIL): to retry")
        raise TransientError(f"run {argv[0]}: exit {code} (EX_TEMPFAIL){detail}", result=result)
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        ctx.note(f"{how}: failed")
        raise PermanentError(f"run {argv[0]}: {how}{detail}", result=result)
    ctx.redis.set(marker, json.dumps(result), ex=MARKER_TTL)
    ctx.note(f"exited 0 after {result['seconds']:g} s")
    return result
