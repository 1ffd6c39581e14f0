"""``check_labels``: compare a task's labels with a required set; report, add what is missing, or fail.

Parameters::

    require:                      # label names, or mappings with a type and attribute names
      - car
      - {name: person, type: rectangle, attributes: [occluded, age]}
    on_mismatch: report | add_missing | fail   # default report

The labels come from the API, not the webhook (a ``create:task`` payload carries only a URL), and
may be the task's own or inherited from its project. A required label is *matched* when a label
of that name exists with the required type (if one is given) and at least the required attribute
names; *mismatched* when it exists but differs; *missing* when no label has its name. Labels the
task has beyond the required ones are *unexpected*: reported, never a failure (a task may use more
labels than a rule cares about). Skeleton points (labels with a ``parent_id``) are not compared.

``add_missing`` creates only the missing labels, on the task or, when the task inherits, on its
project (CVAT refuses task labels then); it does not touch mismatched labels, whose change could
invalidate existing annotations. ``fail`` raises ``PermanentError`` carrying the report as
``.result``, so the delivery record shows it. Re-running is harmless: a second check finds nothing
missing.

Result: ``{task_id, source: task|project, project_id, missing, unexpected, matched, mismatched,
added, ok}``; ``mismatched`` is a list of ``{name, type?: {expected, actual}, missing_attributes?}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import PermanentError
from workers.actions._params import event_id, unknown_params
from workers.context import ActionContext

PARAMS = ("require", "on_mismatch")
ON_MISMATCH = ("report", "add_missing", "fail")
LABEL_TYPES = ("any", "cuboid", "ellipse", "mask", "points", "polygon", "polyline", "rectangle",
               "skeleton", "tag")
"""CVAT's label types (``LabelType`` in the API schema)."""
_REQUIRE_KEYS = ("name", "type", "attributes")


@dataclass(frozen=True)
class Required:
    name: str
    type: str | None = None
    attributes: tuple[str, ...] = ()

    def as_new_label(self) -> dict[str, Any]:
        """The label to create for ``add_missing``."""
        label: dict[str, Any] = {"name": self.name}
        if self.type:
            label["type"] = self.type
        if self.attributes:
            # Names only: the gateway gives them the fields CVAT requires (input type and so on).
            label["attributes"] = [{"name": a} for a in self.attributes]
        return label


def _problems_of(index: int, item: Any) -> list[str]:
    where = f"require[{index}]"
    if isinstance(item, str):
        return [] if item.strip() else [f"{where}: a label name cannot be empty"]
    if not isinstance(item, Mapping):
        return [f"{where}: expected a label name or a mapping with name, type, attributes"]
    problems = [f"{where}: unknown key {key!r} (known: {', '.join(_REQUIRE_KEYS)})"
                for key in item if key not in _REQUIRE_KEYS]
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}: name is required and must be a non-empty string")
    kind = item.get("type")
    if kind is not None and kind not in LABEL_TYPES:
        problems.append(f"{where}: type {kind!r} is not one of {', '.join(LABEL_TYPES)}")
    attributes = item.get("attributes")
    if attributes is not None and (not isinstance(attributes, list)
                                   or not all(isinstance(a, str) and a.strip() for a in attributes)):
        problems.append(f"{where}: attributes must be a list of attribute names")
    return problems


def validate(params: Mapping[str, Any]) -> list[str]:
    """``require`` is a non-empty list of unique names or ``{name, type?, attributes?}``."""
    problems = unknown_params(params, PARAMS)
    require = params.get("require")
    if not isinstance(require, list) or not require:
        problems.append("require must be a non-empty list of label names or {name, type, attributes}")
    else:
        names = []
        for index, item in enumerate(require):
            item_problems = _problems_of(index, item)
            problems += item_problems
            if not item_problems:
                names.append(item if isinstance(item, str) else item["name"])
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"require names a label more than once: {', '.join(duplicates)}")
    on_mismatch = params.get("on_mismatch", "report")
    if on_mismatch not in ON_MISMATCH:
        problems.append(f"on_mismatch: {on_mismatch!r} is not one of {', '.join(ON_MISMATCH)}")
    return problems


def required_labels(require: list[Any]) -> list[Required]:
    """The validated ``require`` list as values."""
    return [Required(item) if isinstance(item, str)
            else Required(item["name"], item.get("type"), tuple(item.get("attributes") or ()))
            for item in require]


def compare(required: list[Required], labels: list[dict[str, Any]]) -> dict[str, Any]:
    """The difference between what is required and what a task has (a pure function)."""
    present = {label.get("name"): label for label in labels if not label.get("parent_id")}
    wanted = {r.name for r in required}
    missing, matched, mismatched = [], [], []
    for req in required:
        label = present.get(req.name)
        if label is None:
            missing.append(req.name)
            continue
        difference: dict[str, Any] = {}
        if req.type and label.get("type") != req.type:
            difference["type"] = {"expected": req.type, "actual": label.get("type")}
        have = {a.get("name") for a in label.get("attributes") or () if isinstance(a, Mapping)}
        lacking = [a for a in req.attributes if a not in have]
        if lacking:
            difference["missing_attributes"] = lacking
        if difference:
            mismatched.append({"name": req.name, **difference})
        else:
            matched.append(req.name)
    unexpected = sorted(str(name) for name in present if name not in wanted)
    return {"missing": missing, "unexpected": unexpected, "matched": matched, "mismatched": mismatched}


def causes(params: Mapping[str, Any]) -> tuple[str, ...]:
    """CVAT events this action can cause: label PATCHes (``update:task``/``update:project``) with
    ``add_missing`` only; a report or a failure changes nothing in CVAT."""
    return ("update:task", "update:project") if params.get("on_mismatch") == "add_missing" else ()


def run(ctx: ActionContext) -> dict[str, Any]:
    """Check (and maybe complete) the labels of the event's task; see the module docstring."""
    problems = validate(ctx.params)
    if problems:
        raise PermanentError("; ".join(problems))
    task_id = event_id(ctx.event, "task_id")
    if task_id is None:
        raise PermanentError(f"event {ctx.event.get('event')!r} names no task (task_id is missing)")
    on_mismatch = ctx.params.get("on_mismatch", "report")
    required = required_labels(ctx.params["require"])

    label_set = ctx.gateway.task_labels(task_id)
    source = "project" if label_set.project_id is not None else "task"
    report: dict[str, Any] = {"task_id": task_id, "source": source, "project_id": label_set.project_id,
                              **compare(required, label_set.labels), "added": []}
    ctx.note(f"task {task_id}: {len(report['matched'])} matched, {len(report['missing'])} missing, "
             f"{len(report['mismatched'])} mismatched ({source} labels)")

    if on_mismatch == "add_missing" and report["missing"]:
        new = [r.as_new_label() for r in required if r.name in report["missing"]]
        if label_set.project_id is not None:
            ctx.gateway.add_labels(new, project_id=label_set.project_id)
        else:
            ctx.gateway.add_labels(new, task_id=task_id)
        report["added"] = [label["name"] for label in new]
        ctx.note(f"added {len(new)} label(s) to {source} "
                 f"{label_set.project_id if label_set.project_id is not None else task_id}",
                 labels=report["added"])
    report["ok"] = not report["mismatched"] and (not report["missing"] or bool(report["added"]))

    if on_mismatch == "fail" and not report["ok"]:
        parts = []
        if report["missing"]:
            parts.append(f"missing {', '.join(report['missing'])}")
        if report["mismatched"]:
            parts.append(f"mismatched {', '.join(m['name'] for m in report['mismatched'])}")
        raise PermanentError(f"task {task_id} labels do not match: {'; '.join(parts)}", result=report)
    return report
