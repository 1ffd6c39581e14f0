"""The receiver's round trips per delivery (core.receipts) against a real redis-server, and the
redactor's fast path that the delivery record goes through."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from core.events import parse_event
from core.receipts import SEEN_KEY, Batch, Receipts
from core.redaction import Redactor
from core.state import StateStore

PAYLOADS = Path(__file__).resolve().parent / "payloads"


def event(name: str = "update_job_completed.json"):
    return parse_event(json.loads((PAYLOADS / "cvat-2.73" / name).read_text())["body_raw"].encode())


def writes(*ops: tuple) -> Batch:
    batch = Batch()
    for op, *args in ops:
        getattr(batch, op)(*args)
    return batch


def pushes(key: str, value: str):
    """Commit writes: push ``value`` on ``key`` and count it (on the claim's real pipeline)."""
    def queue(pipe) -> None:
        pipe.rpush(key, value)
        pipe.hincrby("t:n", "new", 1)
    return queue


def test_commit_applies_writes_once_and_the_loser_gets_the_duplicate_writes(redis):
    """Two receivers holding a claim on the same event at once: the first to commit stores it, the
    other's writes are not applied (its transaction is refused) and it notes a duplicate instead."""
    receipts = Receipts(redis, StateStore(redis, 60))
    ev = event()
    with receipts.claim(ev) as first, receipts.claim(ev) as second:
        won = first.commit(1, 60, pushes("t:new", "a"), writes(("hincrby", "t:n", "dup", 1)))
        lost = second.commit(2, 60, pushes("t:new", "b"), writes(("hincrby", "t:n", "dup", 1)))
    assert (won, lost) == (True, False)
    assert redis.lrange("t:new", 0, -1) == [b"a"]
    assert redis.hgetall("t:n") == {b"new": b"1", b"dup": b"1"}
    assert redis.get(SEEN_KEY.format(ev.delivery_id)) == b"1"
    assert 0 < redis.ttl(SEEN_KEY.format(ev.delivery_id)) <= 60


def test_begin_reports_a_duplicate_and_applies_only_then_its_writes(redis):
    """begin applies a duplicate's writes only once the event is stored."""
    receipts = Receipts(redis, StateStore(redis, 60))
    ev = event()
    dup = writes(("hincrby", "t:n", "dup", 1))
    assert receipts.begin(ev, dup).duplicate is False
    assert redis.hget("t:n", "dup") is None
    with receipts.claim(ev) as claim:
        assert claim.stored_before() is False
        assert claim.commit(1, 60, lambda pipe: None, dup)
    assert receipts.begin(ev, dup).duplicate is True
    assert redis.hget("t:n", "dup") == b"1"
    with receipts.claim(ev) as claim:
        assert claim.stored_before() is True


def test_begin_swaps_the_last_seen_state(redis):
    """begin runs core.state's swap: first sight is unknown, the same delivery again the same."""
    receipts = Receipts(redis, StateStore(redis, 60))
    ev = event()
    first = receipts.begin(ev, Batch())
    again = receipts.begin(ev, Batch())
    assert first.seen.source == again.seen.source == "unknown"
    assert StateStore(redis, 60).last("job", ev.resource_id)["state"] == ev.obj["state"]


def test_if_exists_skips_its_writes_when_the_key_is_missing(redis):
    """A duplicate's writes inside ``if_exists`` apply only while that key exists (an expired record
    gets no steps), the ones after it always."""
    batch = Batch()
    with batch.if_exists("t:record"):
        batch.hincrby("t:record", "count", 1)
        batch.rpush("t:steps", "x")
    batch.rpush("t:after", "y")
    receipts = Receipts(redis, StateStore(redis, 60))
    redis.set(SEEN_KEY.format(event().delivery_id), 1)  # a duplicate's writes apply to a stored event
    receipts.note_duplicate(event(), batch)
    assert not redis.exists("t:record", "t:steps")
    assert redis.lrange("t:after", 0, -1) == [b"y"]

    redis.hset("t:record", "count", 5)
    receipts.note_duplicate(event(), batch)
    assert redis.hget("t:record", "count") == b"6"
    assert redis.lrange("t:steps", 0, -1) == [b"x"]
    assert redis.lrange("t:after", 0, -1) == [b"y", b"y"]


def test_jobs_are_what_rqs_enqueue_many_writes_on_a_real_pipeline(redis):
    """A delivery's jobs are queued by RQ's own ``enqueue_many`` in the commit's transaction: RQ reads
    them back as queued jobs with their retry; a commit refused as a duplicate queues nothing."""
    import dataclasses

    from rq.job import Job

    from core.contract import LIGHT_QUEUE, ActionCall
    from core.queueing import SERIALIZER, enqueue, queue
    from core.retry import RetryPolicy

    call = ActionCall(delivery_id="d" * 40, rule_id="r", index=0, action="notify", params={}, event={},
                      retry=RetryPolicy(attempts=2, backoff=(1.0,)))
    receipts = Receipts(redis, StateStore(redis, 60))
    ev = event()
    with receipts.claim(ev) as first, receipts.claim(ev) as second:
        assert first.commit(1, 60, lambda pipe: enqueue([call], redis, pipe, failure_ttl=60), Batch())
        again = dataclasses.replace(call, rule_id="other")
        assert not second.commit(1, 60, lambda pipe: enqueue([again], redis, pipe, failure_ttl=60), Batch())
    assert queue(LIGHT_QUEUE, redis).job_ids == [call.job_id]
    job = Job.fetch(call.job_id, connection=redis, serializer=SERIALIZER)
    assert job.get_status() == "queued" and job.retries_left == 2 and list(job.args) == [call.to_json()]
    assert not redis.exists(Job.key_for(again.job_id))


SECRETS = ["s3cr3t-token", 'quo"te\\key', "ünïcode-secret"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.lists(st.sampled_from(
        ["a", " ", ":", "@", "/", '"', "\\", "\n", "\x00", "\x7f", "é", "\u2028", "😀", "http://", "u:p@",
         *SECRETS]), max_size=12).map("".join),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(json_values)
def test_redactor_dumps_is_the_walk_serialized(value):
    """The fast path never differs from masking string by string, secrets and URL credentials alike."""
    redactor = Redactor(SECRETS)
    assert json.loads(redactor.dumps(value)) == redactor.data(value)


def test_redactor_dumps_masks_a_secret_in_a_record():
    redactor = Redactor(["s3cr3t-token"])
    out = redactor.dumps({"payload": {"url": "https://bot:pw@cvat.example/api", "note": "key s3cr3t-token"}})
    assert "s3cr3t-token" not in out and "bot:pw" not in out
    assert json.loads(out) == {"payload": {"url": "https://***@cvat.example/api", "note": "key ***"}}
