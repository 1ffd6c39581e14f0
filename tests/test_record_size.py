"""Delivery records and last-seen snapshots are stored compressed, and read back as they were."""

from __future__ import annotations

import json

from core.delivery_log import PACKED_RECORD_FIELD, RECORD_FIELD, DeliveryLog, record_key
from core.state import KEY, PACKED, StateStore, unpack
from tests.conftest import capture, post


def test_a_record_is_stored_compressed_and_read_back_whole(client, redis):
    """A real delivery's record (payload included) is kept zlib-compressed, several times smaller
    than its JSON, and every reader gets the same record back."""
    body, headers = capture("update_job_completed.json")
    answer = post(client, body, {"X-Signature-256": headers["X-Signature-256"]})
    delivery_id = answer.json["delivery_id"]
    stored = redis.hgetall(record_key(delivery_id))
    assert RECORD_FIELD.encode() not in stored
    record = DeliveryLog(redis, retention_seconds=60).get(delivery_id).record
    assert record["payload"] == json.loads(body)
    assert len(stored[PACKED_RECORD_FIELD.encode()]) * 2 < len(json.dumps(record))


def test_a_record_stored_plain_is_still_read(redis):
    """Records written before compression (plain JSON) are read as before."""
    record = {"delivery_id": "d1", "event": "ping", "outcome": "ping"}
    redis.hset(record_key("d1"), RECORD_FIELD, json.dumps(record))
    assert DeliveryLog(redis, retention_seconds=60).get("d1").record == record


def test_a_snapshot_is_stored_compressed_and_read_back(client, redis):
    """The last-seen state of a job is kept compressed and reads back as the payload's job."""
    body, headers = capture("update_job_completed.json")
    post(client, body, {"X-Signature-256": headers["X-Signature-256"]})
    stored = json.loads(redis.get(KEY.format(resource="job", id=1)))
    assert stored["s"].startswith(PACKED)
    assert unpack(stored["s"]) == json.loads(body)["job"] == StateStore(redis, 60).last("job", 1)
