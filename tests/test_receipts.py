"""The receiver's two scripts per delivery (receiver.receipts) against a real redis-server, and the
redactor's fast path that the delivery record goes through."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.events import parse_event
from receiver.receipts import SEEN_KEY, Batch, Receipts
from receiver.state import StateStore
from workers.redaction import Redactor

PAYLOADS = Path(__file__).resolve().parent / "payloads"


def event(name: str = "update_job_completed.json"):
    return parse_event(json.loads((PAYLOADS / "cvat-2.73" / name).read_text())["body_raw"].encode())


def writes(*ops: tuple) -> Batch:
    batch = Batch()
    for op, *args in ops:
        getattr(batch, op)(*args)
    return batch


def test_commit_applies_writes_once_and_the_loser_gets_the_duplicate_writes(redis):
    """Two receivers committing the same event: one stores it, the other only notes a duplicate."""
    receipts = Receipts(redis, StateStore(redis, 60))
    ev = event()
    first = receipts.commit(ev, 1, 60, writes(("rpush", "t:new", "a"), ("hincrby", "t:n", "new", 1)),
                            writes(("hincrby", "t:n", "dup", 1)))
    second = receipts.commit(ev, 2, 60, writes(("rpush", "t:new", "b"), ("hincrby", "t:n", "new", 1)),
                             writes(("hincrby", "t:n", "dup", 1)))
    assert (first, second) == (True, False)
    assert redis.lrange("t:new", 0, -1) == [b"a"]
    assert redis.hgetall("t:n") == {b"new": b"1", b"dup": b"1"}
    assert redis.get(SEEN_KEY.format(ev.delivery_id)) == b"1"
    assert 0 < redis.ttl(SEEN_KEY.format(ev.delivery_id)) <= 60


def test_begin_reports_a_duplicate_and_applies_only_then_its_writes(redis):
    receipts = Receipts(redis, StateStore(redis, 60))
    ev = event()
    dup = writes(("hincrby", "t:n", "dup", 1))
    assert receipts.begin(ev, dup).duplicate is False
    assert redis.hget("t:n", "dup") is None
    receipts.commit(ev, 1, 60, Batch(), dup)
    assert receipts.begin(ev, dup).duplicate is True
    assert redis.hget("t:n", "dup") == b"1"


def test_begin_swaps_the_last_seen_state(redis):
    """begin runs receiver.state's swap: first sight is unknown, the same delivery again the same."""
    receipts = Receipts(redis, StateStore(redis, 60))
    ev = event()
    first = receipts.begin(ev, Batch())
    again = receipts.begin(ev, Batch())
    assert first.seen.source == again.seen.source == "unknown"
    assert StateStore(redis, 60).last("job", ev.resource_id)["state"] == ev.obj["state"]


def test_if_exists_skips_its_writes_when_the_key_is_missing(redis):
    batch = Batch()
    with batch.if_exists("t:record"):
        batch.hincrby("t:record", "count", 1)
        batch.rpush("t:steps", "x")
    batch.rpush("t:after", "y")
    receipts = Receipts(redis, StateStore(redis, 60))
    receipts.commit(event(), 1, 60, batch, Batch())
    assert not redis.exists("t:record", "t:steps")
    assert redis.lrange("t:after", 0, -1) == [b"y"]

    redis.hset("t:record", "count", 5)
    redis.delete(SEEN_KEY.format(event().delivery_id))
    receipts.commit(event(), 1, 60, batch, Batch())
    assert redis.hget("t:record", "count") == b"6"
    assert redis.lrange("t:steps", 0, -1) == [b"x"]
    assert redis.lrange("t:after", 0, -1) == [b"y", b"y"]


def test_batch_writes_what_a_pipeline_would(redis):
    """Every command the batch offers lands as redis-py's pipeline method of that name would."""
    batch = writes(("hset", "b:h", "f", "v"), ("set", "b:s", 1.5, 30), ("sadd", "b:set", "a", "b"),
                   ("lpush", "b:l", "x"), ("zadd", "b:z", {"m": 2.5}), ("hincrbyfloat", "b:h", "g", 0.5),
                   ("zremrangebyscore", "b:z", "-inf", 1), ("expire", "b:h", 40))
    batch.hset("b:h", mapping={"k1": b"\x00\xff", "k2": 3})
    Receipts(redis, StateStore(redis, 60)).commit(event(), 1, 60, batch, Batch())
    assert redis.hgetall("b:h") == {b"f": b"v", b"g": b"0.5", b"k1": b"\x00\xff", b"k2": b"3"}
    assert (redis.get("b:s"), 0 < redis.ttl("b:s") <= 30) == (b"1.5", True)
    assert redis.smembers("b:set") == {b"a", b"b"}
    assert redis.zrange("b:z", 0, -1, withscores=True) == [(b"m", 2.5)]
    assert 0 < redis.ttl("b:h") <= 40


SECRETS = ["s3cr3t-token", 'quo"te\\key', "ünïcode-secret"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.lists(st.sampled_from(
        ["a", " ", ":", "@", "/", '"', "\\", "\n", "é", "http://", "u:p@", *SECRETS]), max_size=12).map("".join),
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
