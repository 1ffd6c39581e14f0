"""Bench-only actions, registered in the bench process and in bench workers (``workers/`` untouched).

``bench_noop`` records when it started (in Redis, for event-to-action-start latency) and returns;
with ``crash: true`` it kills its own process instead, to show what a crashing action takes down;
with ``sleep: <seconds>`` it takes that long (an action caught while it runs).
Registered by :func:`register`, which ``bench.worker`` calls when ``CVAT_HOOKS_BENCH_ACTIONS=1``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

NAME = "bench_noop"
STARTS_KEY = "bench:noop:started"
"""Hash: job id -> the action's start time (``time.time()``, as text)."""
ENV = "CVAT_HOOKS_BENCH_ACTIONS"


def register() -> None:
    """Add ``bench_noop`` to the action registry of this process."""
    from workers.actions import REGISTRY, ActionSpec

    REGISTRY[NAME] = ActionSpec(NAME, __name__, summary="benchmark: record the start time, do nothing")


def validate(params: Mapping[str, Any]) -> list[str]:
    """Only ``crash`` (a bool) and ``sleep`` (seconds) are accepted."""
    unknown = sorted(set(params) - {"crash", "sleep"})
    return [f"unknown parameter {name!r}" for name in unknown]


def run(ctx: Any) -> dict[str, Any]:
    """Note the start time and return at once (or die, with ``crash: true``)."""
    started = time.time()
    if ctx.params.get("crash"):
        os._exit(70)  # what a segfault or the OOM killer does: no exception, no cleanup
    ctx.redis.hset(STARTS_KEY, ctx.call.job_id, repr(started))
    time.sleep(float(ctx.params.get("sleep", 0)))
    return {"noop": True}
