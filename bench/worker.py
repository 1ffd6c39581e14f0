"""``python -m bench.worker [--class fork|simple] ...``: ``cvat-hooks worker``, plus the bench actions.

The very worker cvat-hooks ships (``operations.cli worker``), with ``bench_noop`` registered first when
``CVAT_HOOKS_BENCH_ACTIONS=1``. A forking worker's work-horses inherit the registration.

``CVAT_HOOKS_BENCH_EXPERIMENTS`` (a comma list) applies changes cvat-hooks does not ship, to measure
what a proposal in bench/README.md would buy before anyone edits ``workers/``:

- ``preload``: the parent imports every action module, cvat-sdk and boto3 and builds the job
  runtime before it starts forking, so each work-horse starts with them;
- ``gc_freeze``: ``gc.freeze()`` before the worker starts, so a work-horse's collector does not walk
  (and copy) every object inherited from the parent;
- ``redis_libver``: redis-py looks its own version up in the package metadata (``importlib.metadata``,
  a few ms) for every new connection, and a work-horse makes new ones for every job; cache it.
"""

from __future__ import annotations

import os
import sys

from bench.noop_action import ENV, register

EXPERIMENTS_ENV = "CVAT_HOOKS_BENCH_EXPERIMENTS"
EXPERIMENTS = ("preload", "gc_freeze", "redis_libver")


def preload() -> None:
    """Import what work-horses would otherwise import for every job, in the parent."""
    import boto3  # noqa: F401

    import workers.cvat_client  # noqa: F401
    from workers import jobs
    from workers.actions import REGISTRY

    for spec in REGISTRY.values():
        spec.load()
    jobs.runtime()


def cache_redis_lib_version() -> None:
    """Look redis-py's version up once (it is read from package metadata per connection)."""
    import functools

    import redis.utils

    redis.utils.get_lib_version = functools.cache(redis.utils.get_lib_version)


def main(argv: list[str]) -> None:
    """Register the bench actions if asked, apply experiments, run the shipped CLI's ``worker``."""
    if os.environ.get(ENV) == "1":
        register()
    experiments = {e.strip() for e in os.environ.get(EXPERIMENTS_ENV, "").split(",") if e.strip()}
    unknown = experiments - set(EXPERIMENTS)
    if unknown:
        raise SystemExit(f"unknown experiment(s): {sorted(unknown)}; known: {EXPERIMENTS}")
    if "redis_libver" in experiments:
        cache_redis_lib_version()
    if "preload" in experiments:
        preload()
    from operations.cli import main as cli

    if "gc_freeze" in experiments:
        import gc

        gc.freeze()
    cli(["worker", *argv], prog_name="cvat-hooks")


if __name__ == "__main__":
    main(sys.argv[1:])
