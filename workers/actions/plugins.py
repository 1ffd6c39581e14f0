"""Actions of your own: a Python callable a rule names, declared with :func:`action`.

A rule names a plugin action in one of two ways::

    - action: my_package.hooks:tag_task      # package.module:function, importable by receiver and workers
    - action: tag_task                       # an entry point in the group ``cvat_hooks.actions``

The callable is declared with :func:`action`, which says what the receiver checks when
``rules.yaml`` loads (the parameters, as for the built-in actions), which queue runs it, and which
CVAT events it can cause (the loop guard, ``receiver.rules.own_events``)::

    from workers.actions.plugins import Param, PermanentError, TransientError, action

    @action(summary="count a task's jobs", params={"task": Param(int, required=True)})
    def count_jobs(ctx):
        return {"jobs": len(ctx.gateway.list_jobs(ctx.params["task"]))}

It gets the built-in actions' :class:`workers.context.ActionContext` (CVAT as ``ctx.gateway``, the
event, the call with its delivery id, rule, action index and replay number, Redis, ``ctx.note``),
returns a JSON object for the delivery log, and raises ``TransientError`` (retried) or
``PermanentError`` (not); any other exception is classified by ``core.errors.classify``.

A plugin name never shadows a built-in action: a built-in name always means the built-in, and
``cvat-hooks actions list`` reports an entry point that tries. Only a callable carrying the
declaration can be named, so a rule cannot call an arbitrary function such as ``os:system``.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

from core.contract import EXPORT_QUEUE, LIGHT_QUEUE
from core.errors import PermanentError, TransientError
from workers.actions import COMMON_PARAMS, ActionSpec

__all__ = ["Param", "PermanentError", "TransientError", "action"]
"""What a plugin imports: the declaration, and the two errors that say whether to retry (the
errors live in ``core.errors``, shared with the rest of cvat-hooks; this is their address for plugins)."""

ENTRY_POINT_GROUP = "cvat_hooks.actions"
DECLARATION_ATTR = "__cvat_hooks_action__"
"""The attribute :func:`action` sets on the callable."""
QUEUES = {"light": LIGHT_QUEUE, "long": EXPORT_QUEUE}
"""``light``: beside notifications, limited to 5 minutes a run; ``long``: in the export worker's
process, up to an hour, so a slow plugin never holds up light actions."""
TYPES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                          list: "list", dict: "mapping"}
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_PARAM_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")

F = TypeVar("F", bound=Callable[..., Any])


class PluginError(Exception):
    """A plugin action that cannot be used: not importable, not declared, or declared wrongly."""


def _a(kind: type) -> str:
    """``a string``, ``an integer``: the type's name with its article."""
    name = TYPES[kind]
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _is_type(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@dataclass(frozen=True)
class Param:
    """One parameter of a plugin action, checked at load (unrendered) and again at run (rendered).

    An ``int`` or ``float`` parameter may also be written as a placeholder (``"{task_id}"``): the
    rendered text is converted before the action runs, and a value that is no number fails then.
    """

    type: type = str
    """``str``, ``int``, ``float``, ``bool``, ``list`` or ``dict``."""
    required: bool = False
    default: Any = None
    """Given to the action when the rule leaves the parameter out (``None``: left out)."""
    choices: tuple[Any, ...] = ()
    """The only values allowed, when set."""
    help: str = ""
    """One line, shown by ``cvat-hooks actions list``."""
    secret: bool = False
    """Masked where parameters are shown (admin pages, ``rules test``); the job keeps it whole."""
    path: bool = False
    """A file or object path: values rendered into it have ``/`` and ``..`` neutralised."""

    def problems(self, name: str) -> list[str]:
        """What is wrong with this declaration itself."""
        out = []
        if self.type not in TYPES:
            out.append(f"parameter {name!r}: type must be one of {', '.join(t.__name__ for t in TYPES)}, "
                       f"not {self.type!r}")
            return out
        if self.required and self.default is not None:
            out.append(f"parameter {name!r}: a required parameter takes no default")
        if self.default is not None and not _is_type(self.default, self.type):
            out.append(f"parameter {name!r}: default {self.default!r} is not {_a(self.type)}")
        if not isinstance(self.choices, tuple) or not all(_is_type(c, self.type) for c in self.choices):
            out.append(f"parameter {name!r}: choices must be a tuple of {TYPES[self.type]} values")
        return out

    def check(self, name: str, value: Any, *, rendered: bool) -> list[str]:
        """Problems with one value (before rendering, a placeholder stands for any number)."""
        if self.type in (int, float) and isinstance(value, str):
            if not rendered and _PLACEHOLDER.search(value):
                return []
            try:
                value = self.convert(value)
            except ValueError:
                return [f"{name} must be {_a(self.type)}, not {value!r}"]
        if not _is_type(value, self.type):
            return [f"{name} must be {_a(self.type)}, not {value!r}"]
        if self.choices and value not in self.choices:
            return [f"{name}: {value!r} is not one of {', '.join(map(repr, self.choices))}"]
        return []

    def convert(self, value: Any) -> Any:
        """A rendered value as the declared type (``"12"`` for an ``int`` is 12)."""
        if self.type in (int, float) and isinstance(value, str):
            return self.type(value.strip())
        return value

    def describe(self, name: str) -> dict[str, Any]:
        """The parameter as ``cvat-hooks actions list`` shows it."""
        shown: dict[str, Any] = {"name": name, "type": TYPES.get(self.type, repr(self.type)),
                                 "required": self.required}
        if self.default is not None:
            shown["default"] = self.default
        if self.choices:
            shown["choices"] = list(self.choices)
        for flag in ("secret", "path"):
            if getattr(self, flag):
                shown[flag] = True
        if self.help:
            shown["help"] = self.help
        return shown


@dataclass(frozen=True)
class Declaration:
    """What :func:`action` records on a callable."""

    params: Mapping[str, Param] = field(default_factory=dict)
    summary: str = ""
    causes: tuple[str, ...] = ()
    """CVAT events the action's own changes through ``ctx.gateway`` make CVAT send back (as
    ``ActionSpec.causes``): ``update:job`` for an action that PATCHes jobs."""
    queue: str = "light"
    validate: Callable[[Mapping[str, Any]], list[str]] | None = None
    """Optional extra check of the (unrendered) parameters, for rules between them."""

    def problems(self) -> list[str]:
        """What is wrong with the declaration (reported at load, with the rule's file and line)."""
        out = []
        if not isinstance(self.params, Mapping):
            return ["params must be a mapping of parameter names to Param(...)"]
        for name, param in self.params.items():
            if not isinstance(name, str) or not _PARAM_NAME.fullmatch(name):
                out.append(f"parameter name {name!r} must be lower-case letters, digits and '_'")
            elif name in COMMON_PARAMS or name == "action":
                out.append(f"parameter name {name!r} is reserved by cvat-hooks")
            if not isinstance(param, Param):
                out.append(f"parameter {name!r} must be declared as Param(...), not {param!r}")
            else:
                out += param.problems(str(name))
        if self.queue not in QUEUES:
            out.append(f"queue must be one of {', '.join(QUEUES)}, not {self.queue!r}")
        if not isinstance(self.causes, tuple) or not all(isinstance(c, str) for c in self.causes):
            out.append("causes must be a tuple of CVAT event names, e.g. ('update:job',)")
        if self.validate is not None and not callable(self.validate):
            out.append("validate must be a function of the parameters")
        return out


def action(*, params: Mapping[str, Param] | None = None, summary: str = "", causes: Iterable[str] = (),
           queue: str = "light", validate: Callable[[Mapping[str, Any]], list[str]] | None = None
           ) -> Callable[[F], F]:
    """Declare a function ``f(ctx) -> dict`` as a cvat-hooks action (see the module docstring).

    The declaration is checked when a rule names the action, not here, so a mistake in it shows as
    a load error of ``rules.yaml`` with the rule's file and line rather than as an import failure.
    """
    declared = Declaration(dict(params or {}), summary, tuple(causes), queue, validate)

    def mark(func: F) -> F:
        setattr(func, DECLARATION_ATTR, declared)
        return func

    return mark


@dataclass(frozen=True)
class PluginAction:
    """A declared callable, with the ``validate``/``run``/``public_params`` face of an action module."""

    name: str
    func: Callable[..., Any]
    declaration: Declaration

    def validate(self, params: Mapping[str, Any], *, rendered: bool = False) -> list[str]:
        """Unknown, missing and ill-typed parameters, then the plugin's own check."""
        declared = self.declaration.params
        problems = [f"unknown parameter {name!r} (known: {', '.join(sorted(declared)) or 'none'})"
                    for name in params if name not in declared and name not in COMMON_PARAMS]
        for name, param in declared.items():
            if name in params:
                problems += param.check(name, params[name], rendered=rendered)
            elif param.required:
                problems.append(f"{name} is required")
        if self.declaration.validate is not None and not problems:
            try:
                problems += list(self.declaration.validate(params))
            except Exception as exc:  # the plugin's check failing is one more problem to report
                problems.append(f"its parameter check failed ({type(exc).__name__}: {exc})")
        return problems

    def run(self, ctx: Any) -> dict[str, Any]:
        """Check the rendered parameters, convert them to their declared types, add defaults, run."""
        problems = self.validate(ctx.params, rendered=True)
        if problems:
            raise PermanentError(f"action {self.name}: " + "; ".join(problems))
        params = dict(ctx.params)
        for name, param in self.declaration.params.items():
            if name in params:
                params[name] = param.convert(params[name])
            elif param.default is not None:
                params[name] = param.default
        ctx.call = _with_params(ctx.call, params)
        result = self.func(ctx)
        if result is None:
            result = {}
        if not isinstance(result, dict):
            raise PermanentError(f"action {self.name} returned a {type(result).__name__}, not a dict")
        try:
            json.dumps(result)
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"action {self.name} returned a result that is not JSON: {exc}") from None
        return result

    def public_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters with the values of ``secret`` ones masked."""
        secret = {n for n, p in self.declaration.params.items() if p.secret}
        return {k: ("***" if k in secret else v) for k, v in params.items()}


def _with_params(call: Any, params: dict[str, Any]) -> Any:
    from dataclasses import replace

    return replace(call, params=params)


@dataclass(frozen=True)
class PluginSpec(ActionSpec):
    """An :class:`ActionSpec` whose code is a declared callable rather than a module of ours."""

    plugin: PluginAction | None = None
    source: str = ""
    """Where it came from: ``module:function``, or ``entry point <name> (<distribution>)``."""

    def load(self) -> Any:
        """The plugin's action face (already imported when the spec was made)."""
        return self.plugin


_resolved: dict[str, PluginSpec] = {}
"""Plugins resolved in this process (failures are not kept: a fixed install works at the next load)."""


def _entry_points(name: str | None = None) -> dict[str, list[EntryPoint]]:
    """This environment's ``cvat_hooks.actions`` entry points by name (one per distinct target)."""
    found: dict[str, list[EntryPoint]] = {}
    try:
        listed = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as exc:  # a malformed .dist-info somewhere on the path
        raise PluginError(f"the installed entry points cannot be read: {type(exc).__name__}: {exc}") from None
    for ep in listed:
        if name is not None and ep.name != name:
            continue
        same = found.setdefault(ep.name, [])
        if all(other.value != ep.value for other in same):
            same.append(ep)
    return found


def _distribution(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def _import(target: str) -> Any:
    """``package.module:attr.attr`` imported, with what went wrong as a :class:`PluginError`."""
    module_name, _, attr = target.partition(":")
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attr):
        raise PluginError(f"{target!r} is not package.module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the plugin's module raised while importing
        raise PluginError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"module {module_name!r} has no {attr!r}") from None
    return obj


def _spec(name: str, obj: Any, source: str) -> PluginSpec:
    """The spec of a loaded object, or a :class:`PluginError` saying why it cannot be an action."""
    declaration = getattr(obj, DECLARATION_ATTR, None)
    if not callable(obj) or not isinstance(declaration, Declaration):
        raise PluginError(f"{source} is not a cvat-hooks action: declare it with "
                          "@workers.actions.plugins.action(params={...})")
    problems = declaration.problems()
    if problems:
        raise PluginError(f"{source} declares its action wrongly: " + "; ".join(problems))
    paths = frozenset(n for n, p in declaration.params.items() if p.path)
    plugin = PluginAction(name, obj, declaration)
    return PluginSpec(name=name, module=getattr(obj, "__module__", "") or "", queue=QUEUES[declaration.queue],
                      path_params=paths, summary=declaration.summary, causes=declaration.causes, plugin=plugin,
                      source=source)


def resolve(name: str, builtins: Iterable[str] = ()) -> PluginSpec | None:
    """The plugin action a rule's ``action:`` names; ``None`` when it names none (an unknown
    action); :class:`PluginError` when it names one that cannot be used. Built-in names are never
    plugins (the caller passes them)."""
    if name in _resolved:
        return _resolved[name]
    if name in set(builtins):
        return None
    if ":" in name:
        spec = _spec(name, _import(name), name)
    else:
        candidates = _entry_points(name).get(name, [])
        if not candidates:
            return None
        if len(candidates) > 1:
            raise PluginError(f"entry point {name!r} of group {ENTRY_POINT_GROUP} is defined more than once: "
                              + ", ".join(f"{ep.value} ({_distribution(ep)})" for ep in candidates))
        ep = candidates[0]
        source = f"entry point {name!r} ({ep.value}, {_distribution(ep)})"
        try:
            obj = ep.load()
        except Exception as exc:  # ImportError, or the plugin's module raising at import
            raise PluginError(f"{source} cannot be loaded: {type(exc).__name__}: {exc}") from None
        spec = _spec(name, obj, source)
    _resolved[name] = spec
    return spec


def forget() -> None:
    """Drop what this process resolved (tests that install and remove plugins)."""
    _resolved.clear()


def describe(spec: ActionSpec, *, kind: str) -> dict[str, Any]:
    """One action as ``cvat-hooks actions list`` shows it."""
    shown: dict[str, Any] = {"name": spec.name, "kind": kind, "summary": spec.summary, "queue": spec.queue,
                             "causes": list(spec.causes)}
    if isinstance(spec, PluginSpec) and spec.plugin is not None:
        shown["source"] = spec.source
        shown["params"] = [p.describe(n) for n, p in spec.plugin.declaration.params.items()]
    else:
        module = spec.load()
        shown["params"] = [{"name": n} for n in getattr(module, "PARAMS", ())]
    return shown


def listing(builtins: Mapping[str, ActionSpec]) -> dict[str, Any]:
    """Every action this environment knows: the built-ins, then each entry point (loaded, so a
    broken one shows its error), and the entry points that are ignored because they shadow a
    built-in. ``package.module:function`` actions are not listed: any importable one can be named."""
    actions = [describe(spec, kind="built-in") for spec in builtins.values()]
    problems = []
    try:
        installed = _entry_points()
    except PluginError as exc:
        return {"actions": actions, "problems": [{"name": ENTRY_POINT_GROUP, "error": str(exc)}]}
    for name, eps in sorted(installed.items()):
        if name in builtins:
            problems.append({"name": name, "error": f"entry point {name!r} ({', '.join(e.value for e in eps)}) "
                                                    "has the name of a built-in action and is ignored"})
            continue
        try:
            spec = resolve(name, builtins)
        except PluginError as exc:
            problems.append({"name": name, "error": str(exc)})
            continue
        if spec is not None:
            actions.append(describe(spec, kind="plugin"))
    return {"actions": actions, "problems": problems}


def listing_lines(actions: list[dict[str, Any]]) -> list[str]:
    """:func:`listing`'s actions as text: one line per action, one per parameter under it."""
    lines = []
    for item in actions:
        lines.append(f"{item['name']} ({item['kind']}, queue {item['queue']}): {item['summary']}")
        if item.get("source"):
            lines.append(f"    from {item['source']}")
        if item["params"] and all(list(p) == ["name"] for p in item["params"]):
            lines.append("    params: " + ", ".join(p["name"] for p in item["params"]))
            item = {**item, "params": []}
        for param in item["params"]:
            extra = [param["type"]] if "type" in param else []
            extra += ["required"] if param.get("required") else []
            extra += [f"default {param['default']!r}"] if "default" in param else []
            extra += [f"one of {', '.join(map(str, param['choices']))}"] if "choices" in param else []
            described = f" ({', '.join(extra)})" if extra else ""
            lines.append(f"    {param['name']}{described}" + (f": {param['help']}" if param.get("help") else ""))
        if item["causes"]:
            lines.append(f"    causes {', '.join(item['causes'])}")
    return lines
