"""Replays that re-judge a delivery with the current rules, replays offered only where they can do
something, and bulk replays after an outage (issue 18, item 8): CLI and admin API on real Redis."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from core.contract import EXPORT_QUEUE, LIGHT_QUEUE
from core.delivery_log import DeliveryLog
from core.queueing import queue
from core.replay import why_not
from operations.cli import main
from receiver.app import create_app
from tests.conftest import capture, post, succeed, with_settings

ADMIN = "rematch-admin-token-0123456789abcdef-xyz"
BEARER = {"Authorization": f"Bearer {ADMIN}"}
ISSUE_RULE = ("  - id: notify-issues\n    on: create:issue\n    do:\n"
              "      - action: notify\n        url: http://127.0.0.1:9/hook\n        text: an issue was created\n")


@pytest.fixture
def client(settings):
    """A receiver with the admin API on."""
    return create_app(with_settings(settings, admin_token=ADMIN)).test_client()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, settings):
    """Run ``cvat-hooks`` against the test's Redis and rules; (exit code, output)."""
    monkeypatch.setenv("CVAT_HOOKS_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("CVAT_HOOKS_RULES", str(settings.rules_path))
    monkeypatch.setenv("CVAT_HOOKS_DATA_DIR", str(settings.data_dir))

    def invoke(*args: str, stdin: str | None = None) -> tuple[int, str]:
        result = CliRunner().invoke(main, list(args), input=stdin)
        return result.exit_code, result.output

    return invoke


def deliver(client, name: str) -> str:
    """POST a captured delivery; its id."""
    body, _ = capture(name)
    return post(client, body).json["delivery_id"]


def fail_all(redis, delivery_id: str) -> list[str]:
    """Give up on every action of a delivery, as a worker would; their job ids."""
    log = DeliveryLog(redis, retention_seconds=3600)
    jobs = list(log.get(delivery_id).actions)
    for job_id in jobs:
        log.action_failed(delivery_id, job_id, attempt=1, started=time.time(), error_class="CvatUnavailable",
                          message="CVAT answered 502", kind="transient", next_retry_at=None)
    return jobs


def test_rematch_runs_a_rule_added_after_the_delivery(client, cli, redis, rules_file: Path):
    """A delivery that matched nothing is judged again after a rule is added: its action is queued, recorded."""
    delivery_id = deliver(client, "create_issue.json")
    code, out = cli("deliveries", "replay", delivery_id)
    assert code == 1 and "matched no rule" in out and "--rematch" in out
    rules_file.write_text(rules_file.read_text() + ISSUE_RULE)
    code, out = cli("deliveries", "replay", delivery_id, "--rematch")
    job_id = f"cvh-{delivery_id[:32]}-notify-issues-0"
    assert code == 0 and f"queued 1 job(s): {job_id}" in out, out
    assert job_id in queue(LIGHT_QUEUE, redis).job_ids
    delivery = DeliveryLog(redis, retention_seconds=3600).get(delivery_id)
    assert delivery.status.value == "pending"
    assert any("re-matched with rules version" in step["message"] for step in delivery.timeline)
    code, out = cli("deliveries", "replay", delivery_id, "--rematch")
    assert code == 1 and "still queued" in out


def test_rematch_renders_the_fixed_rule_as_a_new_run(client, cli, redis, rules_file: Path):
    """A failed export re-matched after its rule changed runs as run 1 with the new parameters."""
    delivery_id = deliver(client, "update_job_completed.json")
    [job_id] = fail_all(redis, delivery_id)
    rules_file.write_text(rules_file.read_text().replace("exports/{project_id}", "fixed/{project_id}"))
    code, out = cli("deliveries", "replay", delivery_id, "--rematch")
    assert code == 0 and f"{job_id}-r1" in out, out
    job = queue(EXPORT_QUEUE, redis).fetch_job(f"{job_id}-r1")
    assert job.args[0]["params"]["to"].startswith("fixed/")


def test_no_replay_for_a_ping(client, cli):
    """A ping has nothing to replay, rematched or not, and the CLI says why."""
    delivery_id = deliver(client, "ping.json")
    for extra in ((), ("--rematch",)):
        code, out = cli("deliveries", "replay", delivery_id, *extra)
        assert code == 1 and "is a ping" in out, out


def test_rematch_says_why_nothing_matches_now(client, cli):
    """A rematch that still matches nothing names each rule's reason."""
    delivery_id = deliver(client, "create_issue.json")
    code, out = cli("deliveries", "replay", delivery_id, "--rematch")
    assert code == 1 and "no rule matches it now" in out and "export-finished-jobs" in out, out


def test_api_rematch(client, redis, rules_file: Path):
    """POST /api/deliveries/<id>/replay {"rematch": true} queues what matches now, 409 when nothing does."""
    delivery_id = deliver(client, "create_issue.json")
    answer = client.post(f"/api/deliveries/{delivery_id}/replay", json={"rematch": True}, headers=BEARER)
    assert answer.status_code == 409 and "no rule matches it now" in answer.json["error"]
    rules_file.write_text(rules_file.read_text() + ISSUE_RULE)
    time.sleep(1.1)  # the store checks the file at most once a second
    answer = client.post(f"/api/deliveries/{delivery_id}/replay", json={"rematch": True}, headers=BEARER)
    assert answer.status_code == 202, answer.json
    assert answer.json["jobs"] == [f"cvh-{delivery_id[:32]}-notify-issues-0"]
    assert {r["rule_id"]: r["matched"] for r in answer.json["rules"]}["notify-issues"] is True


def test_a_refusal_names_its_remedy_in_each_front_ends_own_terms(client, cli, redis):
    """What would make a refused replay run something is worded by the CLI as a flag, by the API as a
    JSON field, by the UI as its control: none of them shows another's wording."""
    from receiver.admin.ui import _say

    unmatched = deliver(client, "create_issue.json")
    done = deliver(client, "update_job_completed.json")
    log = DeliveryLog(redis, retention_seconds=3600)
    for job_id in log.get(done).actions:
        succeed(log, done, job_id, {})
    for delivery_id, remedy, flag in ((unmatched, "rematch", "--rematch judges"), (done, "force", "--force runs")):
        code, out = cli("deliveries", "replay", delivery_id)
        assert code == 1 and flag in out, out
        answer = client.post(f"/api/deliveries/{delivery_id}/replay", headers=BEARER)
        assert answer.status_code == 409 and answer.json["remedy"] == remedy
        assert f'{{"{remedy}": true}}' in answer.json["error"] and "--" not in answer.json["error"]
        shown = _say(why_not(log.get(delivery_id)))
        assert shown is not None and "--" not in shown and ("tick 'force'" in shown or "'Re-match'" in shown)
    assert client.post(f"/api/deliveries/{done}/replay", json={"force": True}, headers=BEARER).status_code == 202
    assert client.post(f"/api/deliveries/{done}/replay", headers=BEARER).json["remedy"] is None  # still queued


def test_bulk_replay_counts_confirms_and_replays(client, cli, redis):
    """--status failed --since: the count first, no queueing when refused or dry, all replayed with --yes."""
    failed = [deliver(client, name) for name in ("update_job_completed.json", "create_task.json")]
    for delivery_id in failed:
        fail_all(redis, delivery_id)
    deliver(client, "ping.json")
    light, export = queue(LIGHT_QUEUE, redis), queue(EXPORT_QUEUE, redis)
    before = len(light.job_ids) + len(export.job_ids)

    code, out = cli("deliveries", "replay", "--status", "failed", "--since", "1h", stdin="n\n")
    assert code == 1 and "2 deliveries selected" in out and "Aborted" in out
    code, out = cli("deliveries", "replay", "--status", "failed", "--since", "1h", "--dry-run")
    assert code == 0 and "would replay 2, skipped 0" in out, out
    assert len(light.job_ids) + len(export.job_ids) == before
    code, out = cli("deliveries", "replay", "--status", "failed", "--since", "1h", "--rule",
                    "check-new-task-labels", "--yes")
    assert code == 0 and "1 delivery selected" in out and "replayed 1, skipped 0, queued 1 job(s)" in out, out
    code, out = cli("deliveries", "replay", "--status", "failed", "--since", "1h", stdin="y\n")
    assert code == 0 and "1 delivery selected" in out and "replayed 1, skipped 0" in out, out  # the other is pending
    code, out = cli("deliveries", "replay", "--status", "pending", "--since", "1h", "--yes")
    assert code == 0 and "replayed 0, skipped 2" in out and "still queued or running" in out, out
    assert len(light.job_ids) + len(export.job_ids) == before + 2


def test_bulk_and_id_do_not_mix(cli):
    """A delivery id and bulk filters together, or neither, is a usage error."""
    assert cli("deliveries", "replay", "abcdef", "--status", "failed")[0] == 2
    assert cli("deliveries", "replay")[0] == 2
