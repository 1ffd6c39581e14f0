"""``run``: what may start, what it gets, and how its end is judged, with real child processes.

Unit tests: the action's ``run`` with a real ``ActionContext`` around fakeredis; the scripts are
real executables in a temporary run directory. The whole path through ``cvat-hooks serve`` and
``cvat-hooks worker`` is in ``tests/test_plugins.py`` (one stack for plugins and scripts).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from core.contract import ActionCall
from core.errors import PermanentError, TransientError
from core.settings import CvatSettings, WorkerSettings
from receiver.rules import RulesError, parse_rules
from workers.actions import LoadWarning, events_caused, public_params, validate_params
from workers.actions import run as run_action
from workers.context import ActionContext

EVENT = {"event": "update:task", "task_id": 7, "project_id": 3, "object": {"id": 7, "name": "t; rm -rf /"}}


def script(directory: Path, name: str, body: str) -> Path:
    """An executable ``sh`` script in ``directory``."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    return path.resolve()


def context(params: dict[str, Any], bin_dir: Path, *, redis: Any = None, environment: dict[str, str] | None = None,
            run: int = 0) -> tuple[ActionContext, list[str]]:
    """A context for one ``run`` call, and the notes it adds to the timeline."""
    notes: list[str] = []
    settings = WorkerSettings(run_dirs=(bin_dir,), environment=environment or {},
                              cvat=CvatSettings(url="http://cvat", access_token="cvat-token-do-not-leak"))
    call = ActionCall("a" * 64, "on-task", 1, "run", params, EVENT, run=run)
    ctx = ActionContext(call=call, settings=settings, redis=redis or fakeredis.FakeRedis(),
                        gateway_factory=lambda: None,  # type: ignore[arg-type,return-value]
                        note=lambda message, **data: notes.append(message))
    return ctx, notes


# -- validation (unrendered parameters, at load) -------------------------------------------------

OK = ["/opt/hooks/x", "--task", "{task_id}"]


@pytest.mark.parametrize("params, expected", [
    ({"command": OK}, None),
    ({"command": OK, "env": {"MODE": "fast", "N": 3, "NAME": "{task.name}", "TOKEN": "${MY_TOKEN}"},
      "timeout": 5, "cwd": "/srv", "causes": ["update:job"]}, None),
    ({}, "command is required"),
    ({"command": []}, "command is required"),
    ({"command": "/opt/hooks/x"}, "command is required"),
    # What runs is written in the rule: a placeholder can never choose it.
    ({"command": ["/opt/hooks/{task.name}"]}, "command[0] must be an absolute path"),
    ({"command": ["{task.name}"]}, "command[0] must be an absolute path"),
    ({"command": ["hooks/x"]}, "command[0] must be an absolute path"),
    ({"command": ["/opt/hooks/x", ["a", "b"]]}, "command arguments must be text or numbers"),
    ({"command": OK, "env": {"LD_PRELOAD": "/tmp/x.so"}}, "LD_PRELOAD cannot be set"),
    ({"command": OK, "env": {"BASH_ENV": "{task.name}"}}, "BASH_ENV cannot be set"),
    ({"command": OK, "env": {"PYTHONSTARTUP": "/x"}}, "PYTHONSTARTUP cannot be set"),
    ({"command": OK, "env": {"CVAT_HOOKS_IDEMPOTENCY_KEY": "x"}}, "is set by cvat-hooks"),
    ({"command": OK, "env": {"PATH": "/opt/{task.name}"}}, "PATH must be written out"),
    ({"command": OK, "env": {"1X": "a"}}, "is not a variable name"),
    ({"command": OK, "env": {"A": ["x"]}}, "A must be text or a number"),
    ({"command": OK, "timeout": 0}, "timeout must be a number of seconds"),
    ({"command": OK, "timeout": 241}, "timeout must be a number of seconds"),
    ({"command": OK, "timeout": "5"}, "timeout must be a number of seconds"),
    ({"command": OK, "cwd": "/srv/{task_id}"}, "cwd must be an absolute path"),
    ({"command": OK, "causes": "update:job"}, "causes must be a list"),
    ({"command": OK, "shell": True}, "unknown parameter 'shell'"),
], ids=["minimal", "everything", "no-command", "empty-command", "command-not-a-list", "placeholder-in-path",
        "placeholder-is-path", "relative-path", "nested-argument", "ld-preload", "bash-env", "python-startup",
        "own-variable", "path-placeholder", "bad-name", "list-value", "zero-timeout", "long-timeout",
        "text-timeout", "placeholder-cwd", "causes-not-list", "unknown-param"])
def test_validate(params, expected):
    """Each parameter problem is reported in a sentence naming it; good parameters pass."""
    problems = [p for p in run_action.validate(params, dirs=(Path("/opt/hooks"),))
                if not p.startswith("/opt/hooks/x is not")]
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_the_command_must_lie_in_a_run_dir_after_symlinks(bin_dir, tmp_path):
    """A symlink inside the run directory to a program outside it is refused, as is a missing file."""
    outside = script(tmp_path, "outside", "exit 0\n")
    (bin_dir / "link").symlink_to(outside)
    inside = script(bin_dir, "inside", "exit 0\n")
    assert run_action.executable_problem(str(inside), (bin_dir,)) is None
    assert "is not inside a directory of CVAT_HOOKS_RUN_DIRS" in str(
        run_action.executable_problem(str(bin_dir / "link"), (bin_dir,)))
    assert "is not a file" in str(run_action.executable_problem(str(bin_dir / "gone"), (bin_dir,)))
    (bin_dir / "plain").write_text("data")
    assert "is not executable" in str(run_action.executable_problem(str(bin_dir / "plain"), (bin_dir,)))


RULE = """version: 1
rules:
  - id: on-task
    on: update:task
    do:
      - action: run
        command: [%s, "{task_id}"]
"""


def test_rules_load_checks_run_dirs_with_file_line_and_rule(bin_dir, tmp_path, monkeypatch):
    """With CVAT_HOOKS_RUN_DIRS visible, a command outside it is a load error naming file, line and
    rule; without it, a warning saying the worker will check."""
    outside = script(tmp_path, "outside", "exit 0\n")
    monkeypatch.setenv("CVAT_HOOKS_RUN_DIRS", str(bin_dir))
    with pytest.raises(RulesError) as caught:
        parse_rules(RULE % outside, "rules.yaml")
    [problem] = caught.value.problems
    assert (problem.source, problem.line, problem.rule_id) == ("rules.yaml", 6, "on-task")
    assert "is not inside a directory of CVAT_HOOKS_RUN_DIRS" in problem.message
    assert parse_rules(RULE % script(bin_dir, "ok", "exit 0\n")).rules[0].actions[0].action == "run"
    monkeypatch.delenv("CVAT_HOOKS_RUN_DIRS")
    ruleset = parse_rules(RULE % outside, "rules.yaml")
    [warning] = ruleset.warnings
    assert warning.severity == "warning" and warning.line == 6 and "the worker checks" in warning.message


def test_causes_come_from_the_rule_and_env_secrets_are_masked_when_shown(monkeypatch):
    """The loop guard takes run's causes from the rule (none by default); shown env values whose
    names say secret are masked; without CVAT_HOOKS_RUN_DIRS the only problem is a warning."""
    assert events_caused("run", {"command": OK}) == ()
    assert events_caused("run", {"command": OK, "causes": ["update:job"]}) == ("update:job",)
    shown = public_params("run", {"command": OK, "env": {"API_TOKEN": "abc", "MODE": "fast"}})
    assert shown["env"] == {"API_TOKEN": "***", "MODE": "fast"}
    monkeypatch.delenv("CVAT_HOOKS_RUN_DIRS", raising=False)
    [warning] = validate_params("run", {"command": OK, "require_all_jobs": {"state": "completed"}})
    assert isinstance(warning, LoadWarning) and "CVAT_HOOKS_RUN_DIRS is not set here" in warning


# -- running ---------------------------------------------------------------------------------------

def test_success_gets_stdin_argv_and_a_minimal_environment(bin_dir, monkeypatch):
    """Exit 0: the event on stdin, each rendered value one argument, no worker secrets in the
    environment (only PATH, LANG, the rule's env and cvat-hooks's own variables)."""
    monkeypatch.setenv("CVAT_ACCESS_TOKEN", "worker-secret-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-key")
    exe = script(bin_dir, "show", 'cat > "$PWD/stdin.json"; printf "%s|" "$@"; echo; env | sort >&2\n'
                                   'cat "$PWD/stdin.json" >&2\n')
    ctx, notes = context({"command": [str(exe), "t; rm -rf /", "$(id)", "7"], "env": {"MODE": "fast"}}, bin_dir)
    result = run_action.run(ctx)
    assert result["exit_code"] == 0
    assert result["stdout"] == "t; rm -rf /|$(id)|7|\n"
    env_lines = [line for line in result["stderr"].splitlines() if "=" in line and not line.startswith("{")]
    names = {line.split("=", 1)[0] for line in env_lines}
    shell_own = {"PWD", "OLDPWD", "SHLVL", "_"}
    assert names - shell_own <= {"PATH", "LANG", "MODE", "CVAT_HOOKS_DELIVERY_ID", "CVAT_HOOKS_RULE_ID",
                                 "CVAT_HOOKS_EVENT", "CVAT_HOOKS_IDEMPOTENCY_KEY", "CVAT_HOOKS_ATTEMPT"}, names
    assert f"CVAT_HOOKS_IDEMPOTENCY_KEY={ctx.call.job_id}" in env_lines
    assert "worker-secret-token" not in result["stderr"] and "aws-secret-key" not in result["stderr"]
    assert json.loads(result["stderr"].splitlines()[-1]) == EVENT
    assert notes[0].startswith(f"started {exe}") and notes[-1].startswith("exited 0")


def test_a_retry_of_a_succeeded_call_does_not_run_again_but_a_replay_does(bin_dir):
    """The ran-marker keeps one run per call; a replay (run 1) is a new call with a new key."""
    exe = script(bin_dir, "count", 'echo x >> "$0.count"; echo "$CVAT_HOOKS_IDEMPOTENCY_KEY"\n')
    redis = fakeredis.FakeRedis()
    first = run_action.run(context({"command": [str(exe)]}, bin_dir, redis=redis)[0])
    again = run_action.run(context({"command": [str(exe)]}, bin_dir, redis=redis)[0])
    replay = run_action.run(context({"command": [str(exe)]}, bin_dir, redis=redis, run=1)[0])
    assert again["skipped"] == "already ran" and again["stdout"] == first["stdout"]
    assert replay["stdout"] != first["stdout"] and replay["stdout"].strip().endswith("-r1")
    assert Path(f"{exe}.count").read_text().count("x") == 2


@pytest.mark.parametrize("body, error, fragment", [
    ('echo "disk busy" >&2; exit 75\n', TransientError, "exit 75 (EX_TEMPFAIL): disk busy"),
    ('echo "no such label" >&2; exit 3\n', PermanentError, "exit 3: no such label"),
    ("kill -TERM $$\n", PermanentError, "killed by signal 15"),
], ids=["tempfail-retries", "other-exit-is-final", "signal-is-final"])
def test_exit_codes(bin_dir, body, error, fragment):
    """75 is retried, any other failure is not; the output is kept on the error for the record."""
    exe = script(bin_dir, "fail", body)
    with pytest.raises(error, match=r".*") as caught:
        run_action.run(context({"command": [str(exe)]}, bin_dir)[0])
    assert fragment in str(caught.value)
    assert caught.value.result is not None and "exit_code" in caught.value.result


def test_timeout_kills_the_whole_process_group(bin_dir, tmp_path):
    """A script past its timeout is killed with the children it started, and the run is retried."""
    pid_file = tmp_path / "child.pid"
    exe = script(bin_dir, "hang", f'sleep 60 & echo $! > {pid_file}; wait\n')
    began = time.monotonic()
    with pytest.raises(TransientError, match="timed out after 1 s"):
        run_action.run(context({"command": [str(exe)], "timeout": 1}, bin_dir)[0])
    assert time.monotonic() - began < 10
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and \
            Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"


def test_output_is_bounded_and_says_how_much_was_cut(bin_dir):
    """200 KiB on stdout: 64 KiB kept, the rest counted; the script is never blocked by a full pipe."""
    exe = script(bin_dir, "loud", "head -c 204800 /dev/zero | tr '\\0' x\n")
    result = run_action.run(context({"command": [str(exe)]}, bin_dir)[0])
    assert len(result["stdout"]) == run_action.OUTPUT_LIMIT
    assert result["stdout_cut_bytes"] == 204800 - run_action.OUTPUT_LIMIT
    assert "stderr_cut_bytes" not in result


def test_secrets_are_passed_by_reference_and_masked_in_output(bin_dir):
    """``${NAME}`` in env is read from the worker's environment at start; the script's output and
    arguments never show it, nor the worker's CVAT token."""
    exe = script(bin_dir, "leak", 'echo "token=$API_TOKEN"; echo "$1" >&2\n')
    ctx, _ = context({"command": [str(exe), "cvat-token-do-not-leak"], "env": {"API_TOKEN": "${SCRIPT_TOKEN}"}},
                     bin_dir, environment={"SCRIPT_TOKEN": "s3cr3t-value"})
    result = run_action.run(ctx)
    assert result["stdout"] == "token=***\n" and result["stderr"] == "***\n"
    assert "cvat-token-do-not-leak" not in json.dumps(result)


def test_the_worker_checks_run_dirs_itself(bin_dir, tmp_path):
    """Whatever the receiver saw, the worker refuses a program outside its own run directories, and
    runs nothing at all without them."""
    outside = script(tmp_path, "outside", "touch ran\n")
    with pytest.raises(PermanentError, match="not inside a directory of CVAT_HOOKS_RUN_DIRS"):
        run_action.run(context({"command": [str(outside)]}, bin_dir)[0])
    ctx, _ = context({"command": [str(outside)]}, bin_dir)
    ctx.settings = WorkerSettings()
    with pytest.raises(PermanentError, match="CVAT_HOOKS_RUN_DIRS is not set for the worker"):
        run_action.run(ctx)
    assert not (tmp_path / "ran").exists()


def test_a_nul_byte_in_a_rendered_argument_is_a_permanent_error(bin_dir):
    """A payload value with a NUL byte cannot become an argument: the run fails, clearly, at once."""
    exe = script(bin_dir, "ok", "exit 0\n")
    with pytest.raises(PermanentError, match="null byte"):
        run_action.run(context({"command": [str(exe), "a\x00b"]}, bin_dir)[0])


def test_cwd_defaults_to_a_fresh_directory_removed_afterwards(bin_dir, tmp_path):
    """Without cwd the script starts in an empty scratch directory that is gone after; with cwd, there."""
    exe = script(bin_dir, "where", "pwd; ls -A\n")
    result = run_action.run(context({"command": [str(exe)]}, bin_dir)[0])
    scratch = result["stdout"].splitlines()[0]
    assert "cvat-hooks-run-" in scratch and result["stdout"].splitlines()[1:] == [] and not os.path.exists(scratch)
    (tmp_path / "work").mkdir()
    result = run_action.run(context({"command": [str(exe)], "cwd": str(tmp_path / "work")}, bin_dir, run=2)[0])
    assert result["stdout"].splitlines()[0] == str(tmp_path / "work")
