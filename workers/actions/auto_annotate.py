"""``auto_annotate``: run an auto-annotation function over every frame of a task, with cvat-sdk's
``cvat_sdk.auto_annotation.annotate_task``.

Parameters::

    function: examples.functions.haar_faces       # package.module, or package.module:attr (required)
    function_parameters: {scale_factor: 1.1}      # passed to the module's create(...) when it has one
    conf_threshold: 0.5                           # 0..1, handed to the function's context
    allow_unmatched_labels: false                 # drop the function's labels the task lacks (else fail)
    clear_existing: false                         # replace the task's annotations instead of adding

``function`` names what ``cvat-cli task auto-annotate --function-module`` takes: a module (or a
module attribute) with the SDK's detection-function interface, ``spec`` and ``detect``; if it has a
``create`` callable, ``create(**function_parameters)`` makes the function, as the CLI does. It is a
literal: a placeholder in it is a load error, so no payload can choose the code that runs. The
receiver checks only that the name is well formed and does *not* import it: a module is user code,
may load a model of gigabytes at import, and needs dependencies only the annotation workers have.
A module that cannot be imported fails the run permanently, with the import error.

The task is read from the event (``task_id``: ``completed:request[create:task]`` with
``request.status: finished`` is when a task has its data). It runs on its own queue
(``core.contract.ANNOTATE_QUEUE``, 4 h per run) in a worker process of its own.

Progress: ``annotated N of M frames`` steps in the delivery's timeline, at most one per tenth of the
frames or per ``PROGRESS_SECONDS``, and one at the end.

Idempotency: the version key hashes the task, its data (``data`` id and ``size``), the function and
every option. Once the upload is done, ``cvat-hooks:annotate-done:<key>`` holds the result for 30
days and a re-run (duplicate delivery, replay, retry after success) skips with ``{"skipped":
"already annotated"}``. ``clear_existing: true`` is idempotent by itself (CVAT replaces the
annotations in one ``PUT``); without it a worker killed between the upload and the marker annotates
twice on its retry.

Result: ``{task_id, function, frames, detections, clear_existing, version, seconds}``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from core.errors import ActionError, PermanentError
from core.keys import ANNOTATE_DONE_KEY as MARKER_PREFIX
from workers.actions._params import event_id, has_placeholder, text, unknown_params
from workers.annotation_gateway import AnnotationGateway
from workers.context import ActionContext
from workers.gateway import Resource
from workers.storage import TMP_DIR

PARAMS = ("function", "function_parameters", "conf_threshold", "allow_unmatched_labels", "clear_existing")
MARKER_TTL = 30 * 86400
"""Seconds an annotate-done marker is kept (30 days)."""
PROGRESS_SECONDS = 30.0
"""Longest time between two progress steps in the timeline while frames are being annotated."""
PROGRESS_STEPS = 10
"""Progress steps per run at most, besides the time-based ones (one per tenth of the frames)."""

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
FUNCTION_NAME = re.compile(rf"({_DOTTED})(?::({_DOTTED}))?")
"""``package.module`` or ``package.module:attr`` (attr may be dotted)."""
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def validate(params: Mapping[str, Any]) -> list[str]:
    """Types and ranges; the function's name is checked for shape, never imported (module docstring)."""
    problems = unknown_params(params, PARAMS)
    function = params.get("function")
    if function is None:
        problems.append("function is required: package.module or package.module:attr")
    elif not isinstance(function, str) or has_placeholder(function):
        problems.append(f"function must be a literal package.module or package.module:attr, not {function!r} "
                        "(the event must not choose the code that runs)")
    elif not FUNCTION_NAME.fullmatch(function):
        problems.append(f"function: {function!r} is not package.module or package.module:attr")
    parameters = params.get("function_parameters")
    if parameters is not None:
        if not isinstance(parameters, Mapping):
            problems.append("function_parameters must be a mapping of names to values")
        else:
            for name, value in parameters.items():
                if not isinstance(name, str) or not _PARAM_NAME.fullmatch(name):
                    problems.append(f"function_parameters: {name!r} is not a Python identifier")
                elif not isinstance(value, str | int | float | bool):
                    problems.append(f"function_parameters.{name} must be a string, number or boolean")
    threshold = params.get("conf_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or not 0 <= threshold <= 1):
        problems.append(f"conf_threshold must be a number from 0 to 1, not {threshold!r}")
    for flag in ("allow_unmatched_labels", "clear_existing"):
        if flag in params and not isinstance(params[flag], bool):
            problems.append(f"{flag} must be true or false, not {params[flag]!r}")
    return problems


def causes(params: Mapping[str, Any]) -> tuple[str, ...]:
    """Saving annotations saves the task's jobs: CVAT sends update:job for each."""
    return ("update:job",)


def load_function(name: str, parameters: Mapping[str, Any]) -> Any:
    """The detection function ``name`` names, made with ``create(**parameters)`` when it has one."""
    match = FUNCTION_NAME.fullmatch(name)
    if match is None:
        raise PermanentError(f"function: {name!r} is not package.module or package.module:attr")
    module_name, attr = match[1], match[2]
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of user code at import is the rule's to fix
        raise PermanentError(f"function {name!r}: cannot import {module_name!r}: "
                             f"{type(exc).__name__}: {exc}") from None
    for part in attr.split(".") if attr else ():
        if not hasattr(obj, part):
            raise PermanentError(f"function {name!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    create = getattr(obj, "create", None)
    if callable(create):
        try:
            obj = create(**parameters)
        except ActionError:
            raise
        except TypeError as exc:
            raise PermanentError(f"function {name!r}: create() refused function_parameters: {exc}") from None
    elif parameters:
        raise PermanentError(f"function {name!r} has no create(), so it takes no function_parameters")
    if not hasattr(obj, "spec") or not callable(getattr(obj, "detect", None)):
        raise PermanentError(f"function {name!r} is not a detection function (it needs spec and detect)")
    return obj


class ProgressNotes:
    """Turns ``(frames_done, frames_total)`` callbacks into a few timeline steps."""

    def __init__(self, ctx: ActionContext, *, seconds: float = PROGRESS_SECONDS) -> None:
        self.ctx = ctx
        self.seconds = seconds
        self.noted = -1
        self.noted_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        step = max(1, total // PROGRESS_STEPS)
        now = time.monotonic()
        if done == self.noted:
            return
        if done in (0, total) or done >= self.noted + step or now - self.noted_at >= self.seconds:
            self.noted, self.noted_at = done, now
            self.ctx.note(f"annotated {done} of {total} frames", frames_done=done, frames_total=total)


def _version(task_id: int, task: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    identity = {"task_id": task_id, "data": task.get("data"), "size": task.get("size"),
                **{name: params.get(name) for name in PARAMS}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def run(ctx: ActionContext) -> dict[str, Any]:
    """Annotate once per task data and options; see the module docstring."""
    problems = validate(ctx.params)
    if problems:
        raise PermanentError("; ".join(problems))
    params = ctx.params
    task_id = event_id(ctx.event, "task_id")
    if task_id is None:
        raise PermanentError(f"event {ctx.event.get('event')!r} names no task (task_id is missing)")
    gateway = cast(AnnotationGateway, ctx.gateway)
    task = gateway.get_resource(Resource.TASK, task_id)
    if not task.get("size"):
        raise PermanentError(f"task {task_id} has no data yet: run on completed:request[create:task] "
                             "with request.status: finished, not on create:task")
    version = _version(task_id, task, params)
    marker = MARKER_PREFIX + version
    previous = text(ctx.redis.get(marker))
    if previous is not None:
        ctx.note("already annotated", version=version)
        return {"skipped": "already annotated", **json.loads(previous)}
    function = load_function(params["function"], params.get("function_parameters") or {})
    clear = bool(params.get("clear_existing", False))
    ctx.note("auto-annotation started", task_id=task_id, function=params["function"], frames=task.get("size"),
             clear_existing=clear)
    staging = ctx.settings.data_dir / TMP_DIR
    staging.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"annotate-{task_id}-", dir=staging))
    started = time.monotonic()
    try:
        outcome = gateway.auto_annotate(
            task_id, function, work_dir=work_dir, clear_existing=clear,
            allow_unmatched_labels=bool(params.get("allow_unmatched_labels", False)),
            conf_threshold=params.get("conf_threshold"), progress=ProgressNotes(ctx))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result = {"task_id": task_id, "function": params["function"], "frames": outcome.frames,
              "detections": outcome.detections, "clear_existing": clear, "version": version,
              "seconds": round(time.monotonic() - started, 3)}
    ctx.note("annotations uploaded", frames=outcome.frames, detections=outcome.detections)
    ctx.redis.set(marker, json.dumps(result), ex=MARKER_TTL)
    return result
