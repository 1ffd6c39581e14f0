"""Plugin actions: named as ``package.module:function`` or by an entry point, declared, checked at
load like built-ins, run by the workers; and the whole path, with a ``run`` script beside them,
through real ``cvat-hooks serve`` and ``cvat-hooks worker`` processes.

Nothing is installed: plugin modules are written to a temporary directory put on ``sys.path`` (and
on the processes' ``PYTHONPATH``), and an entry point is a ``.dist-info`` beside them, which is what
``pip install`` would write and what ``importlib.metadata`` reads.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from click.testing import CliRunner

from core.contract import EXPORT_QUEUE, LIGHT_QUEUE, ActionCall
from core.errors import PermanentError, UnknownAction
from core.settings import WorkerSettings
from operations.cli import main as cli_main
from receiver.rules import RulesError, parse_rules
from receiver.signature import sign
from tests.captures import capture
from tests.conftest import ROOT
from tests.cvat_server import DEFAULT_TOKEN, CvatTestServer
from tests.procs import Proc, ReceiverProc, RedisProc, WorkerProc, clean_env, cli_argv, http, wait_for
from workers import actions
from workers.actions import plugins
from workers.context import ActionContext

EXAMPLE = ROOT / "examples" / "cvat-hooks-plugin-example"
SCRIPTS = ROOT / "examples" / "scripts"

PLUGINS = '''
from workers.actions.plugins import Param, action
from core.errors import TransientError


@action(summary="echo its parameters", causes=("update:job",), queue="long",
        params={"count": Param(int, required=True, help="how many"),
                "mode": Param(str, default="fast", choices=("fast", "slow")),
                "token": Param(str, secret=True),
                "out": Param(str, path=True)})
def echo(ctx):
    return {"params": ctx.params, "delivery": ctx.call.delivery_id, "event": ctx.event["event"]}


@action(params={"n": Param(list, default="x")})
def bad_default(ctx):
    return {}


@action(params={"require_all_jobs": Param(dict)}, queue="huge")
def reserved(ctx):
    return {}


def undeclared(ctx):
    return {}


@action()
def not_a_dict(ctx):
    return ["no"]


@action(validate=lambda p: [] if p.get("a", 0) < p.get("b", 1) else ["a must be below b"],
        params={"a": Param(int), "b": Param(int)})
def ordered(ctx):
    return {}
'''


def dist_info(where: Path, name: str, entries: dict[str, str]) -> None:
    """What ``pip install`` writes for a distribution with ``cvat_hooks.actions`` entry points."""
    dist = where / f"{name.replace('-', '_')}-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[cvat_hooks.actions]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on ``sys.path`` holding the module ``hooks_under_test`` (plugins forgotten after)."""
    root = tmp_path / "site"
    (root / "hooks_under_test").mkdir(parents=True)
    (root / "hooks_under_test" / "__init__.py").write_text(PLUGINS)
    (root / "broken_on_import.py").write_text("raise RuntimeError('no model file')\n")
    monkeypatch.syspath_prepend(str(root))
    plugins.forget()
    yield root
    plugins.forget()
    for name in [m for m in sys.modules if m.startswith(("hooks_under_test", "broken_on_import"))]:
        del sys.modules[name]


@pytest.mark.parametrize("name, params, expected", [
    ("hooks_under_test:echo", {"count": 2}, []),
    ("hooks_under_test:echo", {"count": "{task_id}", "mode": "slow", "out": "x/{job_id}"}, []),
    ("hooks_under_test:echo", {}, ["count is required"]),
    ("hooks_under_test:echo", {"count": 1.5, "mode": "medium"},
     ["count must be an integer, not 1.5", "mode: 'medium' is not one of 'fast', 'slow'"]),
    ("hooks_under_test:echo", {"count": 1, "colour": "red"},
     ["unknown parameter 'colour' (known: count, mode, out, token)"]),
    ("hooks_under_test:echo", {"count": 1, "require_all_jobs": {"state": "done"}},
     ["require_all_jobs.state: 'done' is not one of new, in progress, rejected, completed"]),
    ("hooks_under_test:ordered", {"a": 2, "b": 1}, ["a must be below b"]),
    ("hooks_under_test:nothing", {}, ["module 'hooks_under_test' has no 'nothing'"]),
    ("hooks_under_test:undeclared", {}, ["hooks_under_test:undeclared is not a cvat-hooks action: declare it "
                                         "with @workers.actions.plugins.action(params={...})"]),
    ("os:system", {}, ["os:system is not a cvat-hooks action: declare it with "
                       "@workers.actions.plugins.action(params={...})"]),
    ("hooks_under_test:bad_default", {}, ["hooks_under_test:bad_default declares its action wrongly: "
                                          "parameter 'n': default 'x' is not a list"]),
    ("hooks_under_test:reserved", {}, ["hooks_under_test:reserved declares its action wrongly: parameter name "
                                       "'require_all_jobs' is reserved by cvat-hooks; queue must be one of light, "
                                       "long, not 'huge'"]),
    ("no_such_package.mod:f", {}, ["cannot import 'no_such_package.mod': No module named 'no_such_package'"]),
    ("broken_on_import:f", {}, ["importing 'broken_on_import' failed: RuntimeError: no model file"]),
    ("hooks under test:f", {}, ["'hooks under test:f' is not package.module:function"]),
], ids=["ok", "placeholders-stand-for-numbers", "missing-required", "wrong-type-and-choice", "unknown-param",
        "common-param-still-checked", "own-check", "no-attribute", "undeclared", "arbitrary-function",
        "bad-default", "reserved-name-and-queue", "no-module", "import-raises", "not-a-name"])
def test_validate_params(site, name, params, expected):
    """Plugin parameters and declarations are checked like built-ins', each problem in a sentence."""
    assert actions.validate_params(name, params) == expected


def test_an_unknown_name_says_how_plugins_are_named(site):
    """A name that is neither built-in, nor an entry point, nor module:function says what it could be."""
    [problem] = actions.validate_params("tag_task", {})
    assert "unknown action 'tag_task'" in problem and "package.module:function" in problem


def test_plugin_problems_are_load_errors_with_file_line_and_rule(site):
    """An unusable plugin fails rules.yaml at load, located like any other action problem."""
    text = ("version: 1\nrules:\n  - id: tagging\n    on: update:job\n    do:\n"
            "      - action: notify\n        url: https://example.com/x\n        text: hi\n"
            "      - action: hooks_under_test:undeclared\n")
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "rules.yaml")
    [problem] = caught.value.problems
    assert (problem.source, problem.line, problem.rule_id) == ("rules.yaml", 9, "tagging")
    assert "action #2 (hooks_under_test:undeclared): " in problem.message and "not a cvat-hooks action" in str(problem)


def test_the_registry_finds_plugins_but_lists_only_builtins(site):
    """``REGISTRY.get`` resolves a plugin (queue, path and secret parameters, causes from its
    declaration) while iterating it still gives the built-ins; the loop guard and the admin view
    use the declaration."""
    spec = actions.REGISTRY.get("hooks_under_test:echo")
    assert spec is not None and spec.queue == EXPORT_QUEUE and spec.path_params == frozenset({"out"})
    assert "hooks_under_test:echo" not in set(actions.REGISTRY) and "notify" in set(actions.REGISTRY)
    assert actions.REGISTRY.get("hooks_under_test:nothing") is None
    assert actions.events_caused("hooks_under_test:echo", {"count": 1}) == ("update:job",)
    assert actions.public_params("hooks_under_test:echo", {"count": 1, "token": "abc"}) == {"count": 1, "token": "***"}
    assert actions.REGISTRY.get("hooks_under_test:ordered").queue == LIGHT_QUEUE


def context(action: str, params: dict[str, Any]) -> ActionContext:
    call = ActionCall("b" * 64, "echo-rule", 0, action, params, {"event": "update:job", "job_id": 1})
    return ActionContext(call=call, settings=WorkerSettings(), redis=fakeredis.FakeRedis(),
                         gateway_factory=lambda: None)  # type: ignore[arg-type,return-value]


def test_the_runner_converts_rendered_params_and_adds_defaults(site):
    """The plugin gets rendered numbers as numbers and the declared defaults; the context is the
    built-ins' (delivery id, event)."""
    result = actions.runner("hooks_under_test:echo")(context("hooks_under_test:echo", {"count": "12"}))
    assert result == {"params": {"count": 12, "mode": "fast"}, "delivery": "b" * 64, "event": "update:job"}


def test_bad_rendered_values_and_results_are_permanent(site):
    """A rendered value of the wrong type, and a result that is not a JSON object, fail at once."""
    with pytest.raises(PermanentError, match="count must be an integer, not 'seven'"):
        actions.runner("hooks_under_test:echo")(context("hooks_under_test:echo", {"count": "seven"}))
    with pytest.raises(PermanentError, match="returned a list, not a dict"):
        actions.runner("hooks_under_test:not_a_dict")(context("hooks_under_test:not_a_dict", {}))


def test_a_worker_without_the_plugin_says_why(site):
    """The worker's lookup of a plugin it cannot import is a permanent UnknownAction naming the cause."""
    with pytest.raises(UnknownAction, match="cannot import 'gone_package'"):
        actions.runner("gone_package:f")
    with pytest.raises(KeyError):
        actions.runner("no_such_entry_point")


def test_entry_points_cannot_shadow_builtins_and_must_be_unique(site):
    """An entry point named like a built-in is ignored (and reported by ``actions list``); a name
    two distributions define is an error, not a guess."""
    dist_info(site, "shadowing", {"notify": "hooks_under_test:echo", "twice": "hooks_under_test:echo"})
    dist_info(site, "other", {"twice": "hooks_under_test:ordered"})
    assert actions.REGISTRY.get("notify").module == "workers.actions.notify"
    assert actions.validate_params("notify", {"count": 1})[0].startswith("unknown parameter 'count'")
    [problem] = actions.validate_params("twice", {})
    assert "defined more than once" in problem and "hooks_under_test:ordered" in problem
    listed = actions.list_actions()
    assert {p["name"] for p in listed["problems"]} == {"notify", "twice"}


def test_actions_list_shows_builtins_and_plugins_with_parameters(site):
    """``cvat-hooks actions list`` (and ``--json``) shows every built-in and each entry point with its
    declared parameters; a broken entry point makes it exit 1 saying why."""
    dist_info(site, "hooks-under-test", {"echo": "hooks_under_test:echo"})
    runner = CliRunner()
    shown = runner.invoke(cli_main, ["actions", "list", "--json"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    found = {a["name"]: a for a in json.loads(shown.output)["actions"]}
    assert set(actions.REGISTRY) < set(found) and found["run"]["kind"] == "built-in"
    assert found["echo"]["kind"] == "plugin" and found["echo"]["causes"] == ["update:job"]
    assert found["echo"]["params"][0] == {"name": "count", "type": "integer", "required": True, "help": "how many"}
    text = runner.invoke(cli_main, ["actions", "list"], catch_exceptions=False).output
    assert "echo (plugin, queue cvat-hooks-exports): echo its parameters" in text
    assert "    mode (string, default 'fast', one of fast, slow)" in text
    dist_info(site, "broken", {"broken": "broken_on_import:f"})
    plugins.forget()
    failed = runner.invoke(cli_main, ["actions", "list"], catch_exceptions=False)
    assert failed.exit_code == 1 and "error: broken: entry point 'broken'" in failed.output


def test_the_readme_plugin_rule_loads_with_the_example_installed(monkeypatch, tmp_path):
    """The README's plugin rules (marked with the example's install line) load once the example is
    importable and its entry point visible."""
    blocks = re.findall(r"```yaml\n(# pip install examples/cvat-hooks-plugin-example[^\n]*\n.*?)```",
                        (ROOT / "README.md").read_text(), re.S)
    assert blocks
    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    dist_info(tmp_path, "cvat-hooks-plugin-example", declared["cvat_hooks.actions"])
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.forget()
    try:
        for block in blocks:
            text = "version: 1\nrules:\n" + "\n".join("  " + line for line in block.splitlines())
            assert parse_rules(text, "README.md").rules
    finally:
        plugins.forget()


def test_the_example_plugin_package_passes_its_own_tests():
    """examples/cvat-hooks-plugin-example's own tests pass (they install nothing)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


# -- the whole path: signed delivery -> cvat-hooks serve -> Redis -> cvat-hooks worker --------------

SECRET = "plugin-stack-secret"
FLAKY = """#!/bin/sh
# Fails with EX_TEMPFAIL the first time it sees an idempotency key, succeeds the next.
mark="{state}/$CVAT_HOOKS_IDEMPOTENCY_KEY"
if [ ! -e "$mark" ]; then : > "$mark"; echo "not yet" >&2; exit 75; fi
echo "second time lucky"
"""


@pytest.fixture
def stack(tmp_path: Path, cvat_server: CvatTestServer) -> Iterator[dict[str, Any]]:
    """Real redis-server, ``cvat-hooks serve`` (gunicorn) and ``cvat-hooks worker``, with the example
    plugin importable and its entry point visible, and two run directories."""
    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    dist_info(tmp_path / "site", "cvat-hooks-plugin-example", declared["cvat_hooks.actions"])
    own_bin = tmp_path / "bin"
    state = tmp_path / "state"
    own_bin.mkdir()
    state.mkdir()
    (own_bin / "flaky").write_text(FLAKY.format(state=state))
    (own_bin / "flaky").chmod(0o755)
    events = tmp_path / "events"
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(f"""\
        version: 1
        rules:
          - id: custom
            on: update:job
            do:
              - action: jobs_overview
              - action: cvat_hooks_plugin_example:jobs_overview
                task: "{{task_id}}"
              - action: run
                command: [{SCRIPTS / 'save-event'}, {events}, "{{job.state}}", "x; touch {tmp_path}/pwned"]
              - action: run
                command: [{own_bin / 'flaky'}]
            retry: {{attempts: 2, backoff: [0]}}
        """))
    logs = tmp_path / "logs"
    redis = RedisProc(tmp_path / "redis", logs)
    redis.start()
    env = {"CVAT_HOOKS_REDIS_URL": redis.url, "CVAT_HOOKS_SECRET": SECRET, "CVAT_HOOKS_RULES": str(rules),
           "CVAT_HOOKS_DATA_DIR": str(tmp_path / "data"), "CVAT_URL": cvat_server.url,
           "CVAT_ACCESS_TOKEN": DEFAULT_TOKEN, "CVAT_HOOKS_RECONCILE_MINUTES": "0",
           "PYTHONPATH": f"{EXAMPLE}:{tmp_path / 'site'}",
           "CVAT_HOOKS_RUN_DIRS": f"{SCRIPTS.resolve()}:{own_bin.resolve()}"}
    procs: list[Proc] = [redis]
    try:
        receiver = ReceiverProc(env, logs, http_workers=1)
        procs.append(receiver.start())
        procs.append(WorkerProc(env, logs, kind="simple").start())
        yield {"env": env, "receiver": receiver, "worker": procs[2], "redis": redis, "events": events,
               "tmp": tmp_path}
    finally:
        for proc in reversed(procs):
            proc.stop()


def finished(stack: dict[str, Any], delivery_id: str, runs: int = 1) -> dict[str, Any]:
    """The delivery once every action of its latest ``runs`` is done."""
    from core.delivery_log import DeliveryLog

    log = DeliveryLog(stack["redis"].client(), retention_seconds=600)
    found: dict[str, Any] = {}

    def done() -> bool:
        delivery = log.get(delivery_id)
        if delivery is None:
            return False
        data = delivery.to_json(shown=actions.public_params)
        latest = delivery.latest_actions()
        if len(latest) == 4 and all(a["status"] in ("succeeded", "failed") for a in latest) and \
                all(a.get("run", 0) == runs - 1 for a in latest):
            found.update(data, latest=latest)
            return True
        return False

    assert wait_for(done, timeout=60, interval=0.2), stack["worker"].log_text()[-3000:]
    return found


def test_a_plugin_and_a_script_act_on_a_signed_delivery(stack, cvat_server):
    """update:job, signed, through serve and worker: both plugin spellings count task 2's jobs in the
    stand-in CVAT, save-event gets the event and its arguments one by one, the flaky script is
    retried after EX_TEMPFAIL, the timeline and metrics say so, and a replay runs them again under a
    new idempotency key."""
    body, _ = capture("update_job_completed.json")
    status, receipt = http(stack["receiver"].url + "/webhooks/cvat", body,
                           {"X-Signature-256": sign(body, SECRET), "Content-Type": "application/json"})
    assert status == 202, receipt
    delivery_id = receipt["delivery_id"]
    record = finished(stack, delivery_id)
    by_index = {a["index"]: a for a in record["latest"]}
    assert all(a["status"] == "succeeded" for a in by_index.values()), json.dumps(record["latest"], indent=1)
    jobs = cvat_server.state.task_jobs(2)
    for index in (0, 1):
        assert by_index[index]["result"]["jobs"] == len(jobs) and by_index[index]["result"]["task_id"] == 2
    saved = by_index[2]["result"]
    key = saved["stdout"].split(" as ")[1].strip().rsplit("/", 1)[1].removesuffix(".json")
    event = json.loads((stack["events"] / f"{key}.json").read_text())
    assert event["event"] == "update:job" and event["job_id"] == 1 and event["task_id"] == 2
    args = (stack["events"] / f"{key}.args").read_text().splitlines()
    assert args == ["completed", f"x; touch {stack['tmp']}/pwned"] and not (stack["tmp"] / "pwned").exists()
    flaky = by_index[3]
    assert flaky["attempts"] == 2 and flaky["result"]["stdout"] == "second time lucky\n"
    steps = [s.get("message", "") for s in record["timeline"]]
    assert any("exited 75 (EX_TEMPFAIL)" in s for s in steps) and any(s.startswith("exited 0") for s in steps)
    metrics = urlopen_text(stack["receiver"].url + "/metrics")
    assert re.search(r'cvat_hooks_action_runs_total\{action="run",outcome="retrying"\} 1', metrics), metrics
    assert re.search(r'cvat_hooks_action_runs_total\{action="jobs_overview",outcome="succeeded"\} 1', metrics)

    replayed = subprocess.run(cli_argv("deliveries", "replay", delivery_id, "--force"), env=clean_env(stack["env"]),
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert replayed.returncode == 0, replayed.stderr
    again = finished(stack, delivery_id, runs=2)
    assert all(a["status"] == "succeeded" for a in again["latest"]), json.dumps(again["latest"], indent=1)
    assert (stack["events"] / f"{key}-r1.json").exists()


def urlopen_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


def test_the_example_script_is_shipped_executable():
    """examples/scripts/save-event is executable and a POSIX sh script (nothing else to install)."""
    path = SCRIPTS / "save-event"
    assert path.stat().st_mode & 0o111 and path.read_text().startswith("#!/bin/sh\n")
