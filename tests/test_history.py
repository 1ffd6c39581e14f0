"""The per-minute figures behind the UI's charts: written cheaply, read back into buckets (real Redis)."""

from __future__ import annotations

from core import history, metrics
from core.delivery_log import INDEX_KEY

NOW = 1_800_000_000.0 - 1_800_000_000.0 % 3600 + 1840  # 40 s into the 31st minute of an hour


def test_failures_deliveries_and_depth_land_in_their_buckets(redis):
    """A given-up run counted through metrics.inc, deliveries in the index and depth samples fill the right bars."""
    metrics.inc(redis, "cvat_hooks_action_runs_total", action="export", outcome="succeeded")
    with redis.pipeline() as pipe:  # as a worker counts: inside its own transaction
        history.count_failure(pipe, at=NOW - 30)
        history.count_failure(pipe, at=NOW - 3000)
        pipe.execute()
    redis.zadd(INDEX_KEY, {"a": NOW - 10, "b": NOW - 20, "c": NOW - 4000})
    history.sample_depth(redis, 7, at=NOW - 5)
    history.sample_depth(redis, 99, at=NOW - 1)  # same minute: the first sample stays
    hour = history.buckets(redis, INDEX_KEY, span=3600, step=60, now=NOW)
    assert len(hour) == 60 and hour[-1].start <= NOW < hour[-1].start + 60
    assert (hour[-1].deliveries, hour[-1].failures, hour[-1].depth) == (2, 1, 7)
    assert sum(b.failures for b in hour) == 2 and sum(b.deliveries for b in hour) == 2
    day = history.buckets(redis, INDEX_KEY, span=86400, step=1800, now=NOW)
    assert len(day) == 48 and sum(b.deliveries for b in day) == 3 and sum(b.failures for b in day) == 2
    assert 0 < redis.ttl(f"{history.KEY}{int(NOW // 3600)}") <= history.KEEP_SECONDS


def test_only_given_up_runs_are_charted(redis):
    """Succeeded and retried runs write no per-minute figure (one write per failure, none otherwise)."""
    for outcome in ("succeeded", "retrying", "skipped"):
        metrics.inc(redis, "cvat_hooks_action_runs_total", action="notify", outcome=outcome)
    assert redis.keys(f"{history.KEY}*") == []
    metrics.inc(redis, "cvat_hooks_action_runs_total", action="notify", outcome="failed")
    assert len(redis.keys(f"{history.KEY}*")) == 1
