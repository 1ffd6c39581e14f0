"""Start an RQ worker on cvat-hooks' queues, with RQ's scheduler (needed for delayed retries)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from rq import SimpleWorker, Worker

from workers.contract import QUEUES
from workers.jobs import on_work_horse_killed
from workers.queueing import SERIALIZER, queue
from workers.redis_conn import connect
from workers.settings import WorkerSettings

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

WORKER_CLASSES: dict[str, type[Worker]] = {"fork": Worker, "simple": SimpleWorker}
"""``fork`` runs each job in a child process (a crashing action takes down only that child, and RQ
retries it); ``simple`` runs jobs in the worker itself (faster, but a crash takes the worker down:
RQ's abandoned-job cleanup then retries the job from another worker)."""


def preload() -> None:
    """Import what actions use before forking, so each work-horse starts with it in shared pages
    instead of importing cvat-sdk and boto3 itself (bench/: export overhead 0.47 s -> 0.14 s,
    and less memory per export)."""
    import importlib

    from workers.actions import REGISTRY

    for spec in REGISTRY.values():
        spec.load()
    for module in ("workers.cvat_client", "workers.storage", "boto3", "botocore.session"):
        try:
            importlib.import_module(module)
        except ImportError as exc:  # an optional piece missing must not stop the worker
            log.warning("worker: could not preload %s: %s", module, exc)


def build_worker(settings: WorkerSettings, *, queues: Sequence[str] = QUEUES, kind: str = "fork",
                 name: str | None = None) -> Worker:
    """A worker serving ``queues`` in order (light actions before exports)."""
    redis = connect(settings.redis_url)
    cls = WORKER_CLASSES[kind]
    return cls([queue(q, redis) for q in queues], connection=redis, serializer=SERIALIZER, name=name,
               work_horse_killed_handler=on_work_horse_killed)


def run(settings: WorkerSettings, *, burst: bool = False, queues: Sequence[str] = QUEUES, kind: str = "fork",
        name: str | None = None, at_start: Callable[[Redis], object] | None = None) -> bool:
    """Work until stopped (or, with ``burst``, until the queues are empty).

    ``at_start`` is called with the worker's Redis before it works, unless ``burst``: the command
    line schedules the periodic reconcile there (``receiver.reconcile.schedule_periodic``), so a
    one-off burst worker leaves no periodic job behind.
    """
    if kind == "fork":
        preload()
    worker = build_worker(settings, queues=queues, kind=kind, name=name)
    if at_start is not None and not burst:
        at_start(worker.connection)
    log.info("worker %s: serving %s (%s)", worker.name, ", ".join(queues), kind)
    return worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
