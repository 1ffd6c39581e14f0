"""What one delivery sends to Redis, seen by a real redis-server's MONITOR: the receiver's cost per
command and per round trip is most of its CPU (bench/README.md, intake), so the count is pinned."""

from __future__ import annotations

from typing import Any

from redis import Redis

from core.events import parse_event
from core.keys import DELIVERIES_KEY, DELIVERY_KEY, DELIVERY_TIMELINE_KEY, SEEN_KEY
from core.receipts import Batch, Receipts
from core.state import StateStore
from tests.conftest import capture, post

SENTINEL = "test-dispatch-round-trips-done"


def deliver(client, name: str):
    """POST a real capture with its own signature."""
    body, headers = capture(name)
    return post(client, body, {"X-Signature-256": headers["X-Signature-256"],
                               "Content-Type": headers["Content-Type"]})


def warmed(client) -> None:
    """One delivery first, so connections are open and scripts loaded (each a one-time cost)."""
    assert deliver(client, "create_task.json").status_code == 202


def sent_by_clients(redis: Redis, deliver: Any) -> tuple[list[list[str]], list[list[str]], Any]:
    """Run ``deliver()`` under MONITOR; return the commands clients sent and the ones scripts ran,
    each split into words (without the sentinel's own connection), and what ``deliver()`` returned."""
    seen: list[dict[str, Any]] = []
    with redis.monitor() as monitor:
        answer = deliver()
        redis.echo(SENTINEL)
        while not seen or seen[-1]["command"].split()[:2] != ["ECHO", SENTINEL]:
            seen.append(monitor.next_command())
    sentinel_port = seen[-1]["client_port"]
    clients = [c["command"].split() for c in seen if c["client_type"] != "lua" and c["client_port"] != sentinel_port]
    scripts = [c["command"].split() for c in seen if c["client_type"] == "lua"]
    return clients, scripts, answer


def test_a_queued_delivery_is_three_round_trips_and_one_script_call_of_ours_in_its_transaction(client, redis):
    """WATCH, the begin script, then one MULTI/EXEC holding our writes as a single EVAL beside RQ's own
    commands: nothing of ours is sent as a command of its own."""
    warmed(client)
    clients, scripts, answer = sent_by_clients(redis, lambda: deliver(client, "update_job_completed.json"))
    assert answer.status_code == 202, answer.json
    names = [words[0].upper() for words in clients]
    assert names[:4] == ["WATCH", "EVALSHA", "MULTI", "EVAL"], names
    assert names[-1] == "EXEC" and names.count("EXEC") == 1 and names.count("MULTI") == 1, names
    rq_commands = clients[4:-1]
    assert rq_commands and all(words[1].startswith("rq:") for words in rq_commands), rq_commands
    written = {words[1] for words in scripts if words[0].upper() in ("SET", "HSET", "RPUSH", "ZADD", "HINCRBY")}
    delivery_id = answer.json["delivery_id"]
    assert {SEEN_KEY.format(delivery_id), DELIVERY_KEY.format(delivery_id),
            DELIVERY_TIMELINE_KEY.format(delivery_id), DELIVERIES_KEY} <= written, written


def test_a_duplicate_is_answered_from_the_begin_script_without_a_transaction(client, redis):
    """The same event again: WATCH, the begin script (which notes the duplicate) and redis-py's UNWATCH
    as the claim ends; no MULTI."""
    assert deliver(client, "update_job_completed.json").status_code == 202
    clients, _scripts, answer = sent_by_clients(redis, lambda: deliver(client, "update_job_completed.json"))
    assert answer.json["status"] == "duplicate"
    assert [words[0].upper() for words in clients] == ["WATCH", "EVALSHA", "UNWATCH"]


def test_begin_on_a_claim_loads_its_script_again_when_redis_lost_it(redis):
    """After SCRIPT FLUSH (what a Redis restart does), begin on the claim's connection loads the script
    and answers; the commit then stores the event once."""
    receipts = Receipts(redis, StateStore(redis, 60))
    event = parse_event(capture("update_job_completed.json")[0])
    redis.script_flush()
    with receipts.claim(event) as claim:
        assert receipts.begin(event, Batch(), claim).seen.source == "unknown"
        assert claim.commit(1, 60, lambda pipe: None, Batch())
    redis.script_flush()
    with receipts.claim(event) as claim:
        assert receipts.begin(event, Batch(), claim).duplicate
