"""Transitions from the first event on a CVAT that sends no ``before_update`` (2.76+): learning the
current state of projects, tasks and jobs from CVAT's API (``operations.state_sync``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.delivery_log import DeliveryLog
from core.state import StateStore
from operations.state_sync import FULL_EVERY, learn_states
from tests.conftest import capture, post, signed
from workers.gateway import Resource


def stripped(name: str, **job: Any) -> bytes:
    """A real 2.73 delivery as CVAT 2.76+ sends it: no ``before_update``, no ``changes``."""
    body, _ = capture(name)
    payload = json.loads(body)
    payload.pop("before_update", None)
    payload.pop("changes", None)
    payload["job"].update(job)
    return json.dumps(payload).encode()


def rules_of(redis, answer) -> list[str]:
    record = DeliveryLog(redis, retention_seconds=60).get(answer.json["delivery_id"])
    assert record is not None
    return record.rule_ids


def test_first_completion_of_a_job_never_seen_fires_once_its_state_is_learned(client, redis, cvat_server,
                                                                           cvat_gateway):
    """A job completed in CVAT 2.76 (no before_update) fires `became: completed` when its old state
    was learned from the API, where without it the receiver has nothing to compare with."""
    report = learn_states(cvat_gateway, StateStore(redis, 3600))
    assert report["job"]["learned"] == len(cvat_server.state.jobs)
    assert StateStore(redis, 3600).last("job", 1)["state"] == "new"
    body = stripped("update_job_completed.json")
    answer = post(client, body, signed(body))
    assert answer.status_code == 202, answer.json
    assert rules_of(redis, answer) == ["export-finished-jobs"]


def test_without_learning_the_first_completion_is_first_sight(client, redis):
    """The same delivery with no learned state is first sight: nothing fires (README: Transitions)."""
    body = stripped("update_job_completed.json")
    answer = post(client, body, signed(body))
    assert answer.status_code == 200 and answer.json["status"] == "no_match"


def test_a_learned_state_is_not_the_state_before_the_event_that_made_it(client, redis, cvat_server,
                                                                        cvat_gateway):
    """Learned after the change (same updated_date as the event): the old state is unknown, so the
    event neither fires from its own result nor claims 'no change'."""
    job = cvat_server.state.jobs[1]
    job.update(state="completed", stage="acceptance", updated_date="2026-11-22T17:39:11.960910Z")
    learn_states(cvat_gateway, StateStore(redis, 3600))
    body = stripped("update_job_completed.json")
    answer = post(client, body, signed(body))
    assert answer.json["status"] == "no_match"
    record = DeliveryLog(redis, retention_seconds=60).get(answer.json["delivery_id"])
    assert record is not None and record.record["transitions"]["source"] == "unknown"


def test_learning_never_replaces_what_a_delivery_taught(client, redis, cvat_server, cvat_gateway):
    """A state the receiver saw in a delivery stays; learning fills only the gaps."""
    first = stripped("update_job_completed.json", state="in progress", stage="annotation",
                     updated_date="2026-11-22T17:39:10.000000Z")
    assert post(client, first, signed(first)).json["status"] == "no_match"
    cvat_server.state.jobs[1].update(state="completed", stage="acceptance",
                                     updated_date="2026-11-22T17:39:11.960910Z")
    report = learn_states(cvat_gateway, StateStore(redis, 3600))
    assert report["job"]["learned"] == len(cvat_server.state.jobs) - 1
    assert StateStore(redis, 3600).last("job", 1)["state"] == "in progress"
    body = stripped("update_job_completed.json")
    answer = post(client, body, signed(body))
    assert rules_of(redis, answer) == ["export-finished-jobs"]


class Pages:
    """CVAT's newest-first lists as a gateway (our own boundary): counts the pages asked."""

    def __init__(self, dates: list[str], *, page_size: int = 2) -> None:
        self.items = [{"id": i + 1, "updated_date": d} for i, d in enumerate(dates)]
        self.page_size = page_size
        self.asked: list[tuple[str, int]] = []

    def newest_first(self, resource: Resource, *, page: int = 1, page_size: int = 100) -> dict[str, Any]:
        self.asked.append((resource.value, page))
        if resource is not Resource.JOB:
            return {"count": 0, "next": None, "results": []}
        start = (page - 1) * self.page_size
        more = start + self.page_size < len(self.items)
        return {"count": len(self.items), "next": "more" if more else None,
                "results": self.items[start:start + self.page_size]}


def day(n: int) -> str:
    return f"2026-11-{n:02d}T10:00:00.000000Z"


def test_a_later_walk_stops_below_what_the_last_one_saw(redis):
    """After the first full walk, a walk reads newest-first only down to the last newest (less the
    overlap), not every page again."""
    store = StateStore(redis, 3600)
    gateway = Pages([day(20), day(19), day(10), day(9), day(8), day(7)])
    assert learn_states(gateway, store, now=1000.0)["job"] == {"read": 6, "learned": 6, "pages": 3, "full": True}
    gateway.items.insert(0, {"id": 99, "updated_date": day(21)})
    gateway.asked.clear()
    report = learn_states(gateway, store, now=2000.0)["job"]
    assert report == {"read": 4, "learned": 1, "pages": 2, "full": False}


def test_a_server_that_ignores_sort_is_read_whole(redis):
    """Pages not newest-first cannot end a walk early: every page is read."""
    store = StateStore(redis, 3600)
    gateway = Pages([day(20), day(19), day(10), day(9), day(8), day(7)])
    learn_states(gateway, store, now=1000.0)
    gateway.items = [{"id": 50, "updated_date": day(1)}, {"id": 51, "updated_date": day(2)},
                     *gateway.items, {"id": 52, "updated_date": day(25)}]
    report = learn_states(gateway, store, now=2000.0)["job"]
    assert report["pages"] == 5 and report["learned"] == 3


@pytest.mark.parametrize("elapsed,full", [(FULL_EVERY - 1, False), (FULL_EVERY, True)],
                         ids=["within-a-day", "a-day-later"])
def test_everything_is_read_again_once_a_day(redis, elapsed, full):
    """A day after the last full walk the next one is full again, for states that expired."""
    store = StateStore(redis, 3600)
    gateway = Pages([day(20), day(19), day(10), day(9)])
    learn_states(gateway, store, now=1000.0)
    assert learn_states(gateway, store, now=1000.0 + elapsed)["job"]["full"] is full


def test_an_event_older_than_the_learned_state_is_judged_by_its_payload(client, redis, cvat_server, cvat_gateway):
    """A completion CVAT sent before the state was learned (redelivered by reconcile, say) is not
    stale: with CVAT 2.73's before_update it still fires, once."""
    cvat_server.state.jobs[1].update(state="completed", stage="acceptance",
                                     updated_date="2026-11-22T17:40:00.000000Z")
    learn_states(cvat_gateway, StateStore(redis, 3600))
    body, headers = capture("update_job_completed.json")
    answer = post(client, body, {"X-Signature-256": headers["X-Signature-256"]})
    assert rules_of(redis, answer) == ["export-finished-jobs"]
    assert StateStore(redis, 3600).last("job", 1)["updated_date"] == "2026-11-22T17:40:00.000000Z"


def test_a_completion_proven_by_cvat_fires_once_whatever_the_arrival_order(client, redis):
    """A completed update that arrives after a later update of the same job (CVAT's retries
    reorder) still fires `became: completed`, from CVAT's own before_update, and only once."""
    body, headers = capture("update_job_completed.json")
    completed = json.loads(body)
    later = dict(completed, job=dict(completed["job"], updated_date="2026-11-22T17:45:00.000000Z"),
                 before_update={"updated_date": completed["job"]["updated_date"]},
                 changes={"updated_date": {"from": completed["job"]["updated_date"],
                                           "to": "2026-11-22T17:45:00.000000Z"}})
    first = post(client, json.dumps(later).encode())
    assert first.json["status"] == "no_match"
    late = post(client, body, {"X-Signature-256": headers["X-Signature-256"]})
    assert late.status_code == 202 and rules_of(redis, late) == ["export-finished-jobs"]
    again = post(client, body, {"X-Signature-256": headers["X-Signature-256"]})
    assert again.json["status"] == "duplicate"


def test_without_before_update_a_late_event_stays_stale(client, redis):
    """The same late completion from a CVAT 2.76+ (no before_update) cannot be proven: it is stale."""
    newer = stripped("update_job_completed.json", updated_date="2026-11-22T17:45:00.000000Z")
    post(client, newer, signed(newer))
    late = stripped("update_job_completed.json")
    answer = post(client, late, signed(late))
    assert answer.json["status"] == "no_match"
    record = DeliveryLog(redis, retention_seconds=60).get(answer.json["delivery_id"])
    assert record is not None and record.record["transitions"]["source"] == "stale"
