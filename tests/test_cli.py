"""The cvat-hooks command line, run through click with the real rules, payloads and Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from operations.cli import main
from tests.conftest import PAYLOADS, ROOT, SECRET, capture, post

CAPTURED = PAYLOADS / "cvat-2.73"


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, settings):
    """Run the CLI with the test's Redis and rules in the environment."""
    monkeypatch.setenv("CVAT_HOOKS_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("CVAT_HOOKS_RULES", str(settings.rules_path))
    monkeypatch.setenv("CVAT_HOOKS_DATA_DIR", str(settings.data_dir))

    def invoke(*args: str):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_rules_test_matches_completed_job(run):
    """`rules test` of update_job_completed.json matches export-finished-jobs and renders the path."""
    result = run("rules", "test", str(CAPTURED / "update_job_completed.json"), "--json")
    report = json.loads(result.output)
    matched = {r["rule_id"]: r for r in report["rules"] if r["matched"]}
    assert list(matched) == ["export-finished-jobs"]
    assert matched["export-finished-jobs"]["actions"][0]["params"]["to"] == "exports/1/2/job-1.zip"


def test_rules_test_does_not_match_updated_date_only(run):
    """`rules test` of update_job_only_updated_date.json matches nothing, and says why."""
    result = run("rules", "test", str(CAPTURED / "update_job_only_updated_date.json"))
    assert "MATCH" not in result.output
    assert "did not become 'completed'" in result.output


def test_rules_check_ok_lists_events(run):
    """`rules check` on the shipped file succeeds and lists the events to subscribe."""
    result = run("rules", "check", str(ROOT / "rules.yaml"))
    assert result.exit_code == 0
    assert "create:task, update:job" in result.output


def test_rules_check_reports_every_problem_and_exits_1(run, tmp_path: Path):
    """`rules check` on a broken file exits 1 naming file, line and rule for each problem."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - id: a\n    on: update:job\n    if: {job.state: {eq: 1}}\n"
                   "    do: [{action: nope}]\n  - id: a\n    on: create:task\n    do: [{action: notify}]\n")
    result = CliRunner().invoke(main, ["rules", "check", str(bad)])
    assert result.exit_code == 1
    out = result.output
    assert "bad.yaml:5: rule 'a': unknown operator 'eq'" in out
    assert "unknown action 'nope'" in out
    assert "duplicate" in out and "bad.yaml:7" in out


def test_sign_prints_the_header_cvat_sent(run):
    """`sign` reproduces the X-Signature-256 CVAT 2.73 sent for a captured delivery."""
    _, headers = capture("ping.json")
    result = run("sign", str(CAPTURED / "ping.json"), "--secret", SECRET)
    assert result.output.strip() == f"X-Signature-256: {headers['X-Signature-256']}"


def test_deliveries_list_and_show(run, client):
    """`deliveries list/show` print what the receiver recorded (JSON for scripts)."""
    body, _ = capture("update_job_completed.json")
    delivery_id = post(client, body).json["delivery_id"]
    post(client, capture("ping.json")[0])
    listed = json.loads(run("deliveries", "list", "--json").output)
    assert [d["event"] for d in listed] == ["ping", "update:job"]
    only = json.loads(run("deliveries", "list", "--rule", "export-finished-jobs", "--json").output)
    assert [d["delivery_id"] for d in only] == [delivery_id]
    shown = run("deliveries", "show", delivery_id[:12])
    assert "export-finished-jobs" in shown.output and "became 'completed'" in shown.output
    as_json = json.loads(run("deliveries", "show", delivery_id, "--json").output)
    assert as_json["status"] == "pending" and as_json["actions"][0]["status"] == "queued"


def test_replay_of_pending_delivery_refuses(run, client):
    """A replay never doubles an action that is still queued."""
    body, _ = capture("update_job_completed.json")
    delivery_id = post(client, body).json["delivery_id"]
    result = CliRunner().invoke(main, ["deliveries", "replay", delivery_id])
    assert result.exit_code == 1
    assert "no failed action" in result.output


# -- send: a delivery without CVAT (issue 18, item 3) ---------------------------------------------

EXAMPLES = ROOT / "examples" / "payloads"


def test_send_uses_the_headers_cvat_sends():
    """`send` signs the exact bytes as CVAT 2.73 did (same X-Signature-256) with CVAT's Content-Type."""
    from operations.send import headers_for

    body, cvat_headers = capture("update_job_completed.json")
    headers = headers_for(body, SECRET)
    assert headers["X-Signature-256"] == cvat_headers["X-Signature-256"]
    assert headers["Content-Type"] == cvat_headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(("name", "status", "answer"), [
    ("ping.json", 200, "ping"),                      # CVAT's ping: recorded, nothing to do
    ("create_task.json", 202, "queued"),             # matches the shipped label check
    ("update_job_completed.json", 202, "queued"),    # matches the shipped export of finished jobs
], ids=["ping", "create-task", "job-completed"])
def test_send_delivers_an_example_signed_with_the_services_own_secret(run, settings, live_receiver, name,
                                                                      status, answer):
    """Without --secret, `send` signs with the secret the service keeps in its store (the trial's, here),
    POSTs to the receiver and prints its status and body; the receiver recorded the delivery."""
    from receiver.settings import Settings

    trial, created = Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(settings.data_dir)}).with_trial_secret()
    assert created and trial.secrets[0] != SECRET
    result = run("send", str(EXAMPLES / name), "--url", live_receiver.url)
    assert result.exit_code == 0, result.output
    head, body = result.stdout.split("\n", 1)
    assert head.startswith(f"{status} ")
    assert json.loads(body)["status"] == answer
    assert any(d["event"] == json.loads((EXAMPLES / name).read_bytes())["event"]
               for d in json.loads(run("deliveries", "list", "--json").output))


def test_send_with_a_wrong_secret_prints_the_401_and_fails(run, live_receiver):
    """`send --secret` with a secret the receiver does not accept prints its 401 and exits 1."""
    result = CliRunner().invoke(main, ["send", str(EXAMPLES / "ping.json"), "--url", live_receiver.webhook_url,
                                       "--secret", "not-the-receivers-secret"])
    assert result.exit_code == 1
    assert result.stdout.startswith("401 ") and "Signature-256 mismatch" in result.stdout
    assert "give the one it uses with --secret" in result.stderr


def test_send_to_nothing_says_so(run, tmp_path: Path):
    """`send` to a port where nothing listens exits 1 with a one-line reason, no traceback."""
    from tests.conftest import free_port

    result = CliRunner().invoke(main, ["send", str(EXAMPLES / "ping.json"), "--port", str(free_port()),
                                       "--secret", SECRET])
    assert result.exit_code == 1
    assert "cannot reach http://127.0.0.1:" in result.output and "Traceback" not in result.output


def test_send_without_any_secret_says_where_one_comes_from(run):
    """`send` with no --secret and no secret configured anywhere exits 1 saying how to get one."""
    result = CliRunner().invoke(main, ["send", str(EXAMPLES / "ping.json"), "--port", "9"],
                                env={"CVAT_HOOKS_SECRET": ""})
    assert result.exit_code == 1
    assert "no webhook secret to sign with" in result.output and "--secret" in result.output
