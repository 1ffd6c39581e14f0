"""The cvat-hooks command line, run through click with the real rules, payloads and Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from receiver.cli import main
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
