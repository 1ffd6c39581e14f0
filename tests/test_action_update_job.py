"""The update_job action: parameter checks, the PATCH (or not), and round-robin assignment."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest

from core.errors import PermanentError
from tests.fake_gateway import FakeGateway, job_event, make_context
from workers.actions import update_job, validate_params
from workers.actions.update_job import round_robin_key
from workers.gateway import Resource

USERS = {"alice": 11, "bob": 12, "carol": 13}


def gateway_with_job(job_id: int = 1, **fields: Any) -> FakeGateway:
    job = {"id": job_id, "task_id": 2, "stage": "annotation", "state": "completed", "assignee": None,
           **fields}
    return FakeGateway(resources={(Resource.JOB, job_id): job}, users=dict(USERS))


def run(params: dict[str, Any], gateway: FakeGateway, redis: Any = None, *,
        event: dict[str, Any] | None = None, delivery_id: str = "d" * 64, rule_id: str = "to-review",
        run: int = 0) -> dict[str, Any]:
    ctx = make_context("update_job", params, event=event or job_event(), gateway=gateway,
                       redis=redis if redis is not None else fakeredis.FakeRedis(), delivery_id=delivery_id,
                       rule_id=rule_id, run=run)
    return update_job.run(ctx)


def patches(gateway: FakeGateway) -> list[tuple[int, dict[str, Any]]]:
    return gateway.called("update_job")


# -- validate ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {"stage": "validation", "state": "new"},
    {"state": "in progress"},
    {"assignee": "alice"},
    {"assignee": ["alice", "bob"], "stage": "validation"},
    {"assignee": None},
    {"stage": "acceptance", "job": "{job_id}"},
    {"state": "completed", "job": 7},
], ids=["stage-state", "state-with-space", "user", "round-robin", "unassign", "job-placeholder", "job-id"])
def test_valid_params(params: dict[str, Any]) -> None:
    """CVAT's stages and states, a name / list / null assignee and a job id or placeholder pass."""
    assert validate_params("update_job", params) == []


@pytest.mark.parametrize(("params", "problem"), [
    ({}, "set at least one of stage, state, assignee"),
    ({"job": 3}, "set at least one of stage, state, assignee"),
    ({"stage": "review"}, "stage: 'review' is not one of annotation, validation, acceptance"),
    ({"state": "done"}, "state: 'done' is not one of new, in progress, rejected, completed"),
    ({"assignee": []}, "a round-robin list must hold at least one username"),
    ({"assignee": ["alice", 3]}, "a round-robin list must hold at least one username"),
    ({"assignee": ["alice", "alice"]}, "names someone twice"),
    ({"assignee": 12}, "assignee must be a username, a list of usernames, or null"),
    ({"state": "new", "job": "abc"}, "job must be a job id or a placeholder"),
    ({"state": "new", "job": True}, "job must be a job id or a placeholder"),
    ({"state": "new", "jobs": 1}, "unknown parameter 'jobs'"),
], ids=["nothing", "only-job", "bad-stage", "bad-state", "empty-list", "list-with-number", "duplicate",
        "assignee-number", "job-text", "job-bool", "typo"])
def test_invalid_params(params: dict[str, Any], problem: str) -> None:
    """Each mistake is reported in a sentence naming it."""
    problems = validate_params("update_job", params)
    assert any(problem in p for p in problems), problems


# -- run ---------------------------------------------------------------------------------------

def test_sets_stage_and_state() -> None:
    """The requested fields are PATCHed and the result lists them and what changed."""
    gateway = gateway_with_job()
    result = run({"stage": "validation", "state": "new"}, gateway)
    assert patches(gateway) == [(1, {"stage": "validation", "state": "new"})]
    assert result == {"job_id": 1, "stage": "validation", "state": "new", "changed": ["stage", "state"]}


def test_unchanged_job_is_not_patched() -> None:
    """A job that already has every requested value is left alone, and the result says so."""
    gateway = gateway_with_job(stage="validation", state="new", assignee={"id": 12, "username": "bob"})
    result = run({"stage": "validation", "state": "new", "assignee": "bob"}, gateway)
    assert patches(gateway) == []
    assert result["unchanged"] is True and result["changed"] == []


def test_all_requested_fields_are_sent_together() -> None:
    """Only the stage differs, yet the state goes too: CVAT resets the state when the stage changes alone."""
    gateway = gateway_with_job(stage="annotation", state="in progress")
    result = run({"stage": "validation", "state": "in progress"}, gateway)
    assert patches(gateway) == [(1, {"stage": "validation", "state": "in progress"})]
    assert result["changed"] == ["stage"]


@pytest.mark.parametrize(("current", "assignee", "expected_patch"), [
    (None, "carol", {"assignee": 13}),
    ({"id": 11, "username": "alice"}, None, {"assignee": None}),
], ids=["assign", "unassign"])
def test_assignee_by_username(current: Any, assignee: str | None, expected_patch: dict[str, Any]) -> None:
    """A username is resolved to its id; null unassigns."""
    gateway = gateway_with_job(assignee=current)
    result = run({"assignee": assignee}, gateway)
    assert patches(gateway) == [(1, expected_patch)]
    assert result["assignee"] == assignee and result["assignee_id"] == expected_patch["assignee"]


def test_unknown_user_fails_permanently() -> None:
    """A username CVAT does not know fails at once, before any PATCH."""
    gateway = gateway_with_job()
    with pytest.raises(PermanentError, match="no CVAT user named 'dave'"):
        run({"assignee": "dave"}, gateway)
    assert patches(gateway) == []


@pytest.mark.parametrize(("params", "event", "job_id"), [
    ({"state": "new"}, job_event(job_id=1), 1),
    ({"state": "new", "job": "5"}, job_event(job_id=1), 5),
    ({"state": "new", "job": 5}, {"event": "create:issue", "job_id": None}, 5),
], ids=["event-job", "rendered-placeholder", "explicit-id"])
def test_job_id_from_event_or_param(params: dict[str, Any], event: dict[str, Any], job_id: int) -> None:
    """The job defaults to the event's; a ``job`` parameter (rendered to digits) overrides it."""
    gateway = FakeGateway(resources={(Resource.JOB, i): {"id": i, "state": "completed"} for i in (1, 5)})
    run(params, gateway, event=event)
    assert patches(gateway)[0][0] == job_id


def test_event_without_a_job_fails_permanently() -> None:
    """No job parameter and no job in the event: nothing to update."""
    with pytest.raises(PermanentError, match="names no job"):
        run({"state": "new"}, gateway_with_job(), event={"event": "create:task", "task_id": 2})


# -- round-robin -------------------------------------------------------------------------------

def test_round_robin_takes_turns_across_deliveries() -> None:
    """Each delivery gets the next reviewer of the list, wrapping around."""
    redis = fakeredis.FakeRedis()
    gateway = gateway_with_job()
    reviewers = ["alice", "bob", "carol"]
    chosen = [run({"assignee": reviewers}, gateway, redis, delivery_id=f"{n:064d}")["assignee"]
              for n in range(4)]
    assert chosen == ["alice", "bob", "carol", "alice"]


def test_retry_of_a_call_keeps_its_reviewer() -> None:
    """A retried job (same delivery, rule, index, run) picks the same reviewer; the turn does not advance."""
    redis = fakeredis.FakeRedis()
    gateway = gateway_with_job()
    reviewers = ["alice", "bob", "carol"]
    first = run({"assignee": reviewers}, gateway, redis)["assignee"]
    again = run({"assignee": reviewers}, gateway, redis)["assignee"]
    assert first == again == "alice"
    assert redis.get(round_robin_key("to-review", reviewers)) == b"1"
    assert run({"assignee": reviewers}, gateway, redis, run=1)["assignee"] == "bob"  # a replay is a new turn


def test_round_robin_turns_are_per_rule_and_list() -> None:
    """Another rule, or another list, keeps its own turn."""
    redis = fakeredis.FakeRedis()
    gateway = gateway_with_job()
    run({"assignee": ["alice", "bob"]}, gateway, redis, delivery_id="1" * 64)
    assert run({"assignee": ["alice", "bob"]}, gateway, redis, delivery_id="2" * 64,
               rule_id="other")["assignee"] == "alice"
    assert run({"assignee": ["alice", "bob", "carol"]}, gateway, redis,
               delivery_id="3" * 64)["assignee"] == "alice"
    assert run({"assignee": ["alice", "bob"]}, gateway, redis, delivery_id="4" * 64)["assignee"] == "bob"
