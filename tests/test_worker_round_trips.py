"""What a worker sends to Redis around each job, counted on a real redis-server: each round trip costs
the worker and Redis CPU on every job, and those before an action's start add to its latency
(bench/README.md, latency), so the counts are pinned."""

from __future__ import annotations

from typing import Any

import pytest
from redis import ConnectionPool, Redis
from redis.connection import Connection
from rq import SimpleWorker

from core.contract import LIGHT_QUEUE
from core.queueing import SERIALIZER, queue
from workers.worker import WORKER_CLASSES


class CountingConnection(Connection):
    """redis-py's connection, counting what it sends: one send is one round trip."""

    sends = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        super().send_packed_command(command, check_health)


@pytest.fixture
def counted(redis: Redis) -> Redis:
    kwargs = redis.connection_pool.connection_kwargs
    pool = ConnectionPool(connection_class=CountingConnection, host=kwargs["host"], port=kwargs["port"],
                          db=kwargs.get("db", 0))
    client = Redis(connection_pool=pool)
    client.ping()
    yield client
    client.close()


def round_trips(call: Any) -> int:
    before = CountingConnection.sends
    call()
    return CountingConnection.sends - before


def test_rq_sends_a_heartbeat_given_no_pipeline_as_three_round_trips(counted: Redis):
    """RQ's own behaviour, why ``workers.worker.Maintained.heartbeat`` exists: when this fails, RQ
    batches its heartbeat itself and the override can go."""
    worker = SimpleWorker([queue(LIGHT_QUEUE, counted)], connection=counted, serializer=SERIALIZER)
    worker.register_birth()
    assert round_trips(worker.heartbeat) == 3


@pytest.mark.parametrize("kind", sorted(WORKER_CLASSES))
def test_our_workers_send_a_heartbeat_in_one_round_trip_with_rqs_writes(counted: Redis, redis: Redis, kind: str):
    worker = WORKER_CLASSES[kind]([queue(LIGHT_QUEUE, counted)], connection=counted, serializer=SERIALIZER)
    worker.register_birth()
    redis.hdel(worker.key, "last_heartbeat")
    redis.persist(worker.key)
    assert round_trips(lambda: worker.heartbeat(42)) == 1
    assert redis.hget(worker.key, "last_heartbeat")
    assert 0 < redis.ttl(worker.key) <= 42


def test_a_heartbeat_given_a_pipeline_goes_on_it(counted: Redis, redis: Redis):
    """RQ's own calls with a pipeline (its job preparation, its suspension check) keep theirs."""
    worker = WORKER_CLASSES["simple"]([queue(LIGHT_QUEUE, counted)], connection=counted, serializer=SERIALIZER)
    worker.register_birth()
    redis.hdel(worker.key, "last_heartbeat")
    with counted.pipeline() as pipe:
        assert round_trips(lambda: worker.heartbeat(pipeline=pipe)) == 0
        pipe.execute()
    assert redis.hget(worker.key, "last_heartbeat")
