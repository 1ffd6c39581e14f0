"""The registry of actions: their names, where their code lives, and how their parameters are checked.

The receiver validates every rule's parameters against this registry when ``rules.yaml`` loads, so
a typo fails at load time instead of at 3 a.m. in a worker. Action modules are imported lazily and
must stay light at import time (``cvat_sdk`` is only imported by ``workers.cvat_client``).

An action module defines:

- ``validate(params: Mapping[str, Any]) -> list[str]``: problems with the *unrendered* parameters
  (placeholders such as ``{job_id}`` are still in the strings), one sentence each, empty if fine;
- ``run(ctx: workers.context.ActionContext) -> dict``: do the work, idempotently, and return the
  JSON result recorded in the delivery log. Raise ``core.errors`` errors on purpose; anything
  else is classified by ``core.errors.classify``;
- optionally ``causes(params) -> tuple[str, ...]``: which of its :attr:`ActionSpec.causes` these
  parameters can actually make CVAT send (``check_labels`` changes nothing unless ``add_missing``).

Any other name a rule gives is looked up as a plugin (``workers.actions.plugins``): a declared
``package.module:function`` or an entry point of the group ``cvat_hooks.actions``. ``REGISTRY``
iterates over the built-ins only; looking a name up in it (``REGISTRY.get``, ``REGISTRY[name]``)
also finds plugins, so the matcher and the workers treat both alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from core.contract import ANNOTATE_QUEUE, EXPORT_QUEUE, LIGHT_QUEUE

COMMON_PARAMS = frozenset({"require_all_jobs"})
"""Parameters any action accepts; handled by ``workers.jobs`` before the action runs."""

JOB_STAGES = ("annotation", "validation", "acceptance")
JOB_STATES = ("new", "in progress", "rejected", "completed")


@dataclass(frozen=True)
class ActionSpec:
    """How the receiver and the workers know an action."""

    name: str
    module: str
    queue: str = LIGHT_QUEUE
    path_params: frozenset[str] = frozenset()
    """Parameters that are file or object paths: placeholder values rendered into them cannot
    contain ``/`` or ``..``, so an event cannot steer a write outside its directory."""
    secret_params: frozenset[str] = frozenset()
    """Parameters that may hold credentials: rendered sealed, so they may reference ``${NAME}``
    values the worker reads from its environment at run time (``core.rule_secrets``)."""
    summary: str = ""
    causes: tuple[str, ...] = ()
    """CVAT events the action's own changes make CVAT send back (the one table of them): a rule
    listening to one of them could trigger itself, so the receiver does not fire it on such an event
    sent because of cvat-hooks's own CVAT account (``receiver.rules.own_events``)."""
    causes_param: str | None = None
    """A parameter in which the rule itself lists the CVAT events the action causes (``run``'s
    ``causes``: what a script does is not ours to know)."""

    def load(self) -> ModuleType:
        """Import the action's module (lazily: the receiver only needs ``validate``)."""
        return importlib.import_module(self.module)


class LoadWarning(str):
    """A problem that does not make the rules unusable (the loader reports it as a warning): e.g.
    ``run`` cannot check ``CVAT_HOOKS_RUN_DIRS`` where the rules load, the worker will."""


class Registry(dict[str, ActionSpec]):
    """The built-in actions by name; a lookup of any other name resolves it as a plugin."""

    def __missing__(self, name: str) -> ActionSpec:
        from workers.actions.plugins import PluginError, resolve

        try:
            spec = resolve(name, self.keys())
        except PluginError:
            spec = None
        if spec is None:
            raise KeyError(name)
        return spec

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        try:
            return self[name]
        except KeyError:
            return default


REGISTRY: dict[str, ActionSpec] = Registry({
    spec.name: spec
    for spec in (
        # An export is a CVAT background request; CVAT reports its end to the webhooks.
        ActionSpec("export", "workers.actions.export", EXPORT_QUEUE, frozenset({"to"}),
                   summary="export a job's, task's or project's annotations, dataset or backup to storage",
                   causes=("completed:request[export:annotations]", "completed:request[export:dataset]",
                           "completed:request[export:backup]")),
        # add_missing PATCHes the labels of the task, or of its project (tests/cvat_server, and the
        # recorded CVAT 2.73 exchanges b.02/b.03, d.08: a task PATCH is delivered as update:task).
        ActionSpec("check_labels", "workers.actions.check_labels",
                   summary="compare a task's labels with a required set; report, add or fail",
                   causes=("update:task", "update:project")),
        ActionSpec("notify", "workers.actions.notify", secret_params=frozenset({"url", "headers"}),
                   summary="POST a templated message (JSON, Slack or Teams)"),
        # A job PATCH is update:job; CVAT then recomputes the task's status from its jobs and saves
        # the task when it changed, which is update:task (cvat/apps/engine/signals.py,
        # update_task_status).
        ActionSpec("update_job", "workers.actions.update_job",
                   summary="set a job's stage, state and/or assignee (round-robin over a list)",
                   causes=("update:job", "update:task")),
        # Saving annotations (PATCH or PUT .../annotations) saves every job of the task: update:job.
        ActionSpec("auto_annotate", "workers.actions.auto_annotate", ANNOTATE_QUEUE,
                   summary="run an auto-annotation function (cvat-sdk's interface) over a task's frames",
                   causes=("update:job",)),
        # An import saves the jobs; CVAT 2.73 delivers no completed:request for an import
        # (cvat/apps/webhooks/utils.py, REQUEST_COMPLETION_RESOURCES).
        ActionSpec("import_annotations", "workers.actions.import_annotations", EXPORT_QUEUE, frozenset({"from"}),
                   summary="upload an annotation file (local or s3://) to a task or job, appending or replacing",
                   causes=("update:job",)),
        # What a script changes in CVAT, and as which user, only the rule's author knows.
        ActionSpec("run", "workers.actions.run", secret_params=frozenset({"env"}), causes_param="causes",
                   summary="run an executable from CVAT_HOOKS_RUN_DIRS with the event on stdin (no shell)"),
    )
})


def validate_require_all_jobs(value: Any) -> list[str]:
    """Check the common ``require_all_jobs: {stage, state}`` condition."""
    if not isinstance(value, Mapping) or not value:
        return ["require_all_jobs must be a mapping with 'stage' and/or 'state'"]
    problems = []
    for key, item in value.items():
        allowed = {"stage": JOB_STAGES, "state": JOB_STATES}.get(key)
        if allowed is None:
            problems.append(f"require_all_jobs: unknown key {key!r} (expected 'stage' or 'state')")
        elif item not in allowed:
            problems.append(f"require_all_jobs.{key}: {item!r} is not one of {', '.join(allowed)}")
    return problems


def validate_params(name: str, params: Mapping[str, Any]) -> list[str]:
    """Every problem with one action's parameters; an unknown action name is one of them."""
    spec: ActionSpec | None = dict.get(REGISTRY, name)
    if spec is None:
        from workers.actions.plugins import PluginError, resolve

        try:
            spec = resolve(name, REGISTRY.keys())
        except PluginError as exc:
            return [str(exc)]
        if spec is None:
            return [f"unknown action {name!r} (built-in: {', '.join(sorted(REGISTRY))}; a plugin is named "
                    "package.module:function or by an entry point of the group cvat_hooks.actions)"]
    problems: list[str] = []
    if "require_all_jobs" in params:
        problems += validate_require_all_jobs(params["require_all_jobs"])
    own = {k: v for k, v in params.items() if k not in COMMON_PARAMS}
    problems += spec.load().validate(own)
    return problems


def events_caused(name: str, params: Mapping[str, Any]) -> tuple[str, ...]:
    """The CVAT events one action with these (unrendered) parameters can make CVAT send back.

    :attr:`ActionSpec.causes`, narrowed by the module's ``causes(params)`` when it has one. An
    unknown action causes nothing; a module that cannot say keeps the whole table (a guard too many
    skips one of our own events, a guard too few lets a rule loop).
    """
    spec = REGISTRY.get(name)
    if spec is not None and spec.causes_param is not None:
        listed = params.get(spec.causes_param)
        return tuple(e for e in listed if isinstance(e, str)) if isinstance(listed, list) else ()
    if spec is None or not spec.causes:
        return ()
    try:
        narrow = getattr(spec.load(), "causes", None)
        possible = set(narrow(params)) if narrow is not None else set(spec.causes)
    except Exception:  # a broken module is reported by validate_params; stay on the safe side here
        possible = set(spec.causes)
    return tuple(event for event in spec.causes if event in possible)


def public_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """An action's parameters as they may be shown to people: an action whose parameters can hold
    credentials (``notify``: its URL and headers) defines ``public_params`` to cut them down. The
    job and the delivery record keep them whole: the action, and a replay, need them."""
    spec = REGISTRY.get(name)
    shown = getattr(spec.load(), "public_params", None) if spec is not None else None
    return shown(params) if shown is not None else dict(params)


def runner(name: str) -> Callable[..., dict[str, Any]]:
    """The ``run`` function of an action (KeyError for an unknown name; ``UnknownAction`` saying
    why for a plugin this worker cannot load)."""
    spec = dict.get(REGISTRY, name)
    if spec is None:
        from core.errors import UnknownAction
        from workers.actions.plugins import PluginError, resolve

        try:
            spec = resolve(name, REGISTRY.keys())
        except PluginError as exc:
            raise UnknownAction(f"action {name!r} cannot be loaded in this worker: {exc}") from None
        if spec is None:
            raise KeyError(name)
    return spec.load().run


def list_actions() -> dict[str, Any]:
    """``{"actions": [...], "problems": [...]}``: the built-in actions and the installed plugin
    (entry point) actions with their parameters, and the entry points that cannot be used."""
    from workers.actions.plugins import listing

    return listing(REGISTRY)
