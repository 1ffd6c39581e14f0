"""Loops: rules do not fire on the echo of their own actions, and the service account is known."""

from __future__ import annotations

import json
import logging
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from redis import Redis

import workers.actions
from core import service_account
from core.events import Event, parse_event
from core.settings import WorkerSettings
from operations.cli import main
from receiver.rules import RulesError, RuleSet, explain, match, parse_rules
from receiver.rules.own_events import actor_of, caused_by
from receiver.try_rules import explain_payload
from tests.conftest import PAYLOADS

NOW = datetime(2026, 11, 22, 17, 40, tzinfo=UTC)
BOT = "cvat-hooks-bot"

LOOPING = """
version: 1
rules:
  - id: to-acceptance
    on: update:job
    do:
      - {action: update_job, stage: acceptance}
  - id: export-accepted
    on: update:job
    if: {job.stage: acceptance}
    do:
      - {action: export, format: CVAT for images 1.1, to: "exports/job-{job_id}.zip"}
  - id: relabel
    on: [update:task, update:project]
    do:
      - {action: check_labels, require: [car], on_mismatch: add_missing}
  - id: report-labels
    on: update:task
    do:
      - {action: check_labels, require: [car]}
  - id: re-export
    on: completed:request[export:*]
    do:
      - {action: export, resource: task, kind: dataset, format: COCO 1.0, to: "exports/t-{task_id}.zip"}
  - id: to-acceptance-anyway
    on: update:job
    allow_self_trigger: true
    do:
      - {action: update_job, stage: acceptance}
  - id: tell
    on: update:*
    do:
      - {action: notify, url: "https://hooks.example.com/x", text: "{event}"}
  - id: only-people
    on: update:job
    if: {caused_by_cvat_hooks: false}
    do:
      - {action: notify, url: "https://hooks.example.com/x", text: "{event}"}
  - id: only-own
    on: update:job
    if: {caused_by_cvat_hooks: true}
    do:
      - {action: notify, url: "https://hooks.example.com/x", text: "{event} {caused_by_cvat_hooks}"}
  - id: from-admin
    on: update:job
    if: {sender.username: admin}
    do:
      - {action: notify, url: "https://hooks.example.com/x", text: "{sender.username}"}
"""


def ruleset() -> RuleSet:
    """The looping rules above, validated and with their actions' causes from the real registry."""
    return parse_rules(LOOPING, "rules.yaml")


def capture(name: str, **changes: Any) -> Event:
    """A real CVAT 2.73 delivery (its payload's top-level keys changed as told, ``None`` removes)."""
    payload = json.loads(json.loads((PAYLOADS / "cvat-2.73" / f"{name}.json").read_text())["body_raw"])
    for key, value in changes.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    return parse_event(json.dumps(payload).encode())


def user(name: str) -> dict[str, Any]:
    """A ``sender`` object as CVAT sends it."""
    return {"url": "http://127.0.0.1:8080/api/users/9", "id": 9, "username": name, "first_name": "", "last_name": ""}


def as_task_event(owner: str) -> Event:
    """An ``update:task`` delivery by ``owner`` (the task shape of CVAT 2.73's d.08 delivery, trimmed)."""
    body = {"event": "update:task", "webhook_id": 1,
            "task": {"id": 2, "project_id": 1, "name": "t", "status": "annotation", "organization": None},
            "sender": user(owner)}
    return parse_event(json.dumps(body).encode())


def request_event(kind: str, owner: str) -> Event:
    """A ``completed:request[export:<kind>]`` delivery (no ``sender``: the actor is ``request.owner``)."""
    event = capture("completed_request_export_annotations")
    payload = json.loads(json.dumps(event.payload))
    payload["event"] = f"completed:request[export:{kind}]"
    payload["request"]["operation"]["type"] = f"export:{kind}"
    payload["request"]["owner"] = {"id": 9, "username": owner}
    return parse_event(json.dumps(payload).encode())


# -- who caused an event --------------------------------------------------------------------------

ACTOR_CASES = [
    # (id, payload, actor)
    ("sender", {"sender": user("alice")}, "alice"),
    ("request-owner", {"request": {"owner": {"id": 1, "username": "bob"}}}, "bob"),
    ("sender-wins", {"sender": user("alice"), "request": {"owner": {"username": "bob"}}}, "alice"),
    ("no-sender", {"job": {"id": 1}}, None),
    ("sender-not-object", {"sender": "alice"}, None),
    ("username-not-text", {"sender": {"username": 7}}, None),
    ("empty-username", {"sender": {"username": ""}}, None),
    ("owner-not-object", {"request": {"owner": 3}}, None),
]


@pytest.mark.parametrize(("payload", "expected"), [c[1:] for c in ACTOR_CASES], ids=[c[0] for c in ACTOR_CASES])
def test_actor_of_a_payload(payload: dict[str, Any], expected: str | None) -> None:
    """The actor is ``sender.username``, else ``request.owner.username``, else unknown."""
    assert actor_of(payload) == expected


CAUSED_CASES = [
    # (id, actor in the payload, service account, caused by cvat-hooks?)
    ("same", BOT, BOT, True),
    ("other-user", "alice", BOT, False),
    ("account-unknown", BOT, None, False),
    ("account-empty", BOT, "", False),
    ("case-differs", "Cvat-Hooks-Bot", BOT, True),
    ("no-actor", None, BOT, False),
]


@pytest.mark.parametrize(("actor", "account", "expected"), [c[1:] for c in CAUSED_CASES],
                         ids=[c[0] for c in CAUSED_CASES])
def test_caused_by(actor: str | None, account: str | None, expected: bool) -> None:
    """An event is cvat-hooks's own only when both names are known and equal (case aside)."""
    payload = {"sender": user(actor)} if actor else {}
    assert caused_by(payload, account) is expected


# -- the action -> events table -------------------------------------------------------------------

CAUSES_CASES = [
    # (id, action, params, events it can make CVAT send)
    ("update-job", "update_job", {"stage": "acceptance"}, ("update:job", "update:task")),
    ("labels-add", "check_labels", {"require": ["car"], "on_mismatch": "add_missing"},
     ("update:task", "update:project")),
    ("labels-report", "check_labels", {"require": ["car"]}, ()),
    ("labels-fail", "check_labels", {"require": ["car"], "on_mismatch": "fail"}, ()),
    ("export-default", "export", {"format": "x", "to": "a.zip"}, ("completed:request[export:annotations]",)),
    ("export-dataset", "export", {"kind": "dataset", "format": "x", "to": "a.zip"},
     ("completed:request[export:dataset]",)),
    ("export-images", "export", {"include_images": True, "format": "x", "to": "a.zip"},
     ("completed:request[export:dataset]",)),
    ("export-backup", "export", {"kind": "backup", "to": "a.zip"}, ("completed:request[export:backup]",)),
    ("notify", "notify", {"url": "https://x/y", "text": "t"}, ()),
    ("unknown", "no_such_action", {}, ()),
]


@pytest.mark.parametrize(("action", "params", "expected"), [c[1:] for c in CAUSES_CASES],
                         ids=[c[0] for c in CAUSES_CASES])
def test_events_an_action_causes(action: str, params: dict[str, Any], expected: tuple[str, ...]) -> None:
    """Each action's echo in CVAT, narrowed by its parameters, within the registry's one table."""
    assert workers.actions.events_caused(action, params) == expected
    spec = workers.actions.REGISTRY.get(action)
    assert set(expected) <= set(spec.causes if spec else ())


# -- the guard, in the pure matcher ---------------------------------------------------------------

GUARD_CASES = [
    # (id, event, service account, rules that fire)
    ("own-update-job", lambda: capture("update_job_completed", sender=user(BOT)), BOT,
     ["export-accepted", "to-acceptance-anyway", "tell", "only-own"]),
    ("person-update-job", lambda: capture("update_job_completed", sender=user("alice")), BOT,
     ["to-acceptance", "export-accepted", "to-acceptance-anyway", "tell", "only-people"]),
    ("account-unknown", lambda: capture("update_job_completed", sender=user(BOT)), None,
     ["to-acceptance", "export-accepted", "to-acceptance-anyway", "tell", "only-people"]),
    ("no-sender", lambda: capture("update_job_completed", sender=None), BOT,
     ["to-acceptance", "export-accepted", "to-acceptance-anyway", "tell", "only-people"]),
    ("admin-is-the-account", lambda: capture("update_job_completed"), "admin",
     ["export-accepted", "to-acceptance-anyway", "tell", "only-own", "from-admin"]),
    ("own-update-task", lambda: as_task_event(BOT), BOT, ["report-labels", "tell"]),
    ("person-update-task", lambda: as_task_event("alice"), BOT, ["relabel", "report-labels", "tell"]),
    ("own-export-annotations", lambda: request_event("annotations", BOT), BOT, ["re-export"]),
    ("own-export-dataset", lambda: request_event("dataset", BOT), BOT, []),
    ("person-export-dataset", lambda: request_event("dataset", "alice"), BOT, ["re-export"]),
]


@pytest.mark.parametrize(("make", "account", "expected"), [c[1:] for c in GUARD_CASES],
                         ids=[c[0] for c in GUARD_CASES])
def test_guard_stops_only_the_rule_whose_action_causes_the_event(make: Any, account: str | None,
                                                                 expected: list[str]) -> None:
    """A rule never fires on its own echo from cvat-hooks's account; other rules, and people, still fire it."""
    event = make()
    fired = [m.rule_id for m in match(ruleset(), event, None, NOW, service_account=account)]
    assert fired == expected
    verdicts = explain(ruleset(), event, None, NOW, service_account=account)
    assert [v.rule_id for v in verdicts if v.matched] == expected


REASON_CASES = [
    # (id, rule, service account, sender, a reason it gives)
    ("stopped", "to-acceptance", BOT, BOT,
     f"not matched: caused by cvat-hooks's own CVAT account ({BOT}) and this rule's action update_job "
     "causes update:job"),
    ("opted-out", "to-acceptance-anyway", BOT, BOT,
     f"caused by cvat-hooks's own CVAT account ({BOT}) and this rule's action update_job causes update:job, "
     "not skipped: allow_self_trigger is true"),
    ("unknown-account", "to-acceptance", None, BOT,
     "loop guard off: cvat-hooks's own CVAT account is unknown (this rule's action update_job causes update:job)"),
]


@pytest.mark.parametrize(("rule_id", "account", "sender", "reason"), [c[1:] for c in REASON_CASES],
                         ids=[c[0] for c in REASON_CASES])
def test_reasons_say_what_the_guard_did(rule_id: str, account: str | None, sender: str, reason: str) -> None:
    """`rules test` and the delivery record say why a rule was, or was not, stopped by the loop guard."""
    event = capture("update_job_completed", sender=user(sender))
    [verdict] = [v for v in explain(ruleset(), event, None, NOW, service_account=account) if v.rule_id == rule_id]
    assert reason in verdict.reasons


def test_match_reports_the_rules_it_stopped() -> None:
    """The receiver's matcher hands back the rules the guard stopped, with the reason, for its log."""
    stopped: list[Any] = []
    match(ruleset(), capture("update_job_completed", sender=user(BOT)), None, NOW, service_account=BOT,
          stopped=stopped)
    assert [s.rule_id for s in stopped] == ["to-acceptance"]
    assert stopped[0].reasons[-1].startswith("not matched: caused by cvat-hooks's own CVAT account")


def test_templates_see_caused_by_cvat_hooks() -> None:
    """``{caused_by_cvat_hooks}`` renders in templates too, like any top-level value."""
    [only_own] = [m for m in match(ruleset(), capture("update_job_completed", sender=user(BOT)), None, NOW,
                                   service_account=BOT) if m.rule_id == "only-own"]
    assert only_own.actions[0].params["text"] == "update:job true"


# -- rules check ----------------------------------------------------------------------------------

WARNING_CASES = [
    # (id, rule id, in the warning (None: no warning))
    ("update-job-on-update-job", "to-acceptance", "action #1 (update_job) causes update:job"),
    ("guarded-only-when-known", "to-acceptance", "skipped only when cvat-hooks knows its own CVAT account"),
    ("recommends-a-bot", "to-acceptance", "e.g. cvat-hooks-bot"),
    ("labels-add-missing", "relabel", "action #1 (check_labels) causes update:task, update:project"),
    ("export-on-its-request", "re-export", "causes completed:request[export:dataset]"),
    ("opted-out", "to-acceptance-anyway", "allow_self_trigger is true, so only its 'if' can stop a loop"),
    ("different-rules-chain", "export-accepted", None),
    ("labels-report-only", "report-labels", None),
    ("notify", "tell", None),
]


@pytest.mark.parametrize(("rule_id", "text"), [c[1:] for c in WARNING_CASES], ids=[c[0] for c in WARNING_CASES])
def test_load_warns_about_rules_that_trigger_themselves(rule_id: str, text: str | None) -> None:
    """A rule whose own action causes an event its ``on`` listens to is a warning, never an error."""
    warnings = [str(w) for w in ruleset().warnings if w.rule_id == rule_id]
    assert all(w.startswith("rules.yaml:") and ": warning: " in w for w in warnings)
    if text is None:
        assert warnings == []
    else:
        [warning] = warnings
        assert text in warning


BAD_OPT_OUT = [("text", '"yes please"'), ("number", "1"), ("list", "[true]")]


@pytest.mark.parametrize("value", [c[1] for c in BAD_OPT_OUT], ids=[c[0] for c in BAD_OPT_OUT])
def test_allow_self_trigger_must_be_a_boolean(value: str) -> None:
    """``allow_self_trigger`` takes true or false only, reported with its line like any other key."""
    text = f"version: 1\nrules:\n  - id: r\n    on: ping\n    allow_self_trigger: {value}\n" \
           "    do: [{action: notify, url: 'https://x/y', text: t}]\n"
    with pytest.raises(RulesError, match=r"rules.yaml:5: rule 'r': 'allow_self_trigger' must be true or false"):
        parse_rules(text, "rules.yaml")


def test_rules_check_warns_and_still_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rules check` prints the self-trigger warnings on stderr and exits 0 for an otherwise valid file."""
    path = tmp_path / "rules.yaml"
    path.write_text(LOOPING)
    monkeypatch.setenv("CVAT_HOOKS_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["rules", "check", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "rule 'to-acceptance': can trigger itself" in result.stderr
    assert "rule(s) OK" in result.stdout


def test_rules_test_takes_the_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rules test` decides with the configured account, or the one given, and says which."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(LOOPING)
    payload = PAYLOADS / "cvat-2.73" / "update_job_completed.json"  # sent by admin
    monkeypatch.setenv("CVAT_HOOKS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CVAT_USERNAME", "admin")
    out = CliRunner().invoke(main, ["rules", "test", str(payload), "--rules", str(rules)], catch_exceptions=False)
    assert "cvat-hooks's own CVAT account: admin (caused this event)" in out.output
    assert "not matched: caused by cvat-hooks's own CVAT account (admin)" in out.output
    other = CliRunner().invoke(main, ["rules", "test", str(payload), "--rules", str(rules), "--json",
                                      "--service-account", BOT], catch_exceptions=False)
    report = json.loads(other.output)
    assert report["service_account"] == BOT and report["caused_by_cvat_hooks"] is False
    assert {"to-acceptance", "only-people"} <= {r["rule_id"] for r in report["rules"] if r["matched"]}


def test_explain_payload_without_account_guards_nothing() -> None:
    """With no account, `rules test` fires the looping rule and says the guard is off."""
    body = json.loads((PAYLOADS / "cvat-2.73" / "update_job_completed.json").read_text())["body_raw"].encode()
    report = explain_payload(ruleset(), body, now=NOW)
    [rule] = [r for r in report["rules"] if r["rule_id"] == "to-acceptance"]
    assert rule["matched"] and any(r.startswith("loop guard off") for r in rule["reasons"])


# -- the setting ----------------------------------------------------------------------------------

SETTING_CASES = [
    # (id, environment, service account)
    ("explicit", {"CVAT_HOOKS_SERVICE_ACCOUNT": BOT}, BOT),
    ("explicit-wins", {"CVAT_HOOKS_SERVICE_ACCOUNT": BOT, "CVAT_USERNAME": "alice"}, BOT),
    ("from-username", {"CVAT_USERNAME": "alice"}, "alice"),
    ("spaces-trimmed", {"CVAT_HOOKS_SERVICE_ACCOUNT": f"  {BOT} "}, BOT),
    ("empty-is-unset", {"CVAT_HOOKS_SERVICE_ACCOUNT": "", "CVAT_USERNAME": "alice"}, "alice"),
    ("token-only", {"CVAT_ACCESS_TOKEN": "t"}, None),
]


@pytest.mark.parametrize(("env", "expected"), [c[1:] for c in SETTING_CASES], ids=[c[0] for c in SETTING_CASES])
def test_service_account_setting(env: dict[str, str], expected: str | None) -> None:
    """CVAT_HOOKS_SERVICE_ACCOUNT, else CVAT_USERNAME, else unknown (the workers will ask CVAT)."""
    assert WorkerSettings.from_env(env).cvat.service_account == expected


@pytest.mark.parametrize("value", ["two words", "a,b", "x" * 151], ids=["space", "comma", "too-long"])
def test_bad_service_account_names_the_variable(value: str) -> None:
    """A value that cannot be a CVAT username is refused with the variable's name."""
    with pytest.raises(ValueError, match="CVAT_HOOKS_SERVICE_ACCOUNT"):
        WorkerSettings.from_env({"CVAT_HOOKS_SERVICE_ACCOUNT": value})


# -- learned by the workers, read by the receivers ------------------------------------------------


class Gateway:
    """A fake at our own boundary: answers ``current_user`` or raises what it is given."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def current_user(self) -> dict[str, Any]:
        """``GET /api/users/self``."""
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_workers_learn_the_account_from_cvat(redis: Redis) -> None:
    """At start the workers store who CVAT says they are, under the project's key schema."""
    assert service_account.learn(Gateway({"id": 3, "username": BOT}), redis) == BOT
    assert service_account.KEY.startswith("cvat-hooks:")
    assert redis.get(service_account.KEY) == BOT.encode()


LEARN_FAILURES = [
    ("cvat-down", ConnectionError("refused")),
    ("no-username", {"id": 3}),
    ("not-an-object", ["x"]),
]


@pytest.mark.parametrize("answer", [c[1] for c in LEARN_FAILURES], ids=[c[0] for c in LEARN_FAILURES])
def test_learning_never_stops_a_worker(redis: Redis, answer: Any, caplog: pytest.LogCaptureFixture) -> None:
    """When CVAT cannot say, nothing is stored, a warning is logged, and nothing is raised."""
    with caplog.at_level(logging.WARNING, "core.service_account"):
        assert service_account.learn(Gateway(answer), redis) is None
    assert redis.get(service_account.KEY) is None
    assert "loop guard" in caplog.text


def test_learning_warns_when_the_setting_disagrees(redis: Redis, caplog: pytest.LogCaptureFixture) -> None:
    """A configured name other than CVAT's is logged: events of the real account would go unrecognised."""
    with caplog.at_level(logging.WARNING, "core.service_account"):
        service_account.learn(Gateway({"username": BOT}), redis, configured="alice@example.com")
    assert "CVAT_HOOKS_SERVICE_ACCOUNT=cvat-hooks-bot" in caplog.text


def test_receiver_prefers_the_setting(redis: Redis) -> None:
    """A configured account is used as is, without asking Redis."""
    redis.set(service_account.KEY, "someone-else")
    assert service_account.ServiceAccount(BOT, redis).name() == BOT


def test_receiver_caches_the_learned_account(redis: Redis) -> None:
    """The learned account is read once per minute, and "unknown" is asked again after a few seconds."""
    now = [0.0]
    account = service_account.ServiceAccount(None, redis, clock=lambda: now[0])
    assert account.name() is None
    redis.set(service_account.KEY, BOT)
    now[0] = service_account.MISS_SECONDS - 1
    assert account.name() is None  # "unknown" still cached
    now[0] = service_account.MISS_SECONDS + 1
    assert account.name() == BOT
    redis.set(service_account.KEY, "changed")
    now[0] += service_account.CACHE_SECONDS - 1
    assert account.name() == BOT  # no round trip within the minute
    now[0] += 2
    assert account.name() == "changed"


def test_redis_error_means_unknown_not_a_failure() -> None:
    """A Redis that does not answer makes the account unknown; ``name()`` does not raise."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once closed
    dead = Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    assert service_account.ServiceAccount(None, dead).name() is None
