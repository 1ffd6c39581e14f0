"""Load and validate ``rules.yaml`` (version 1), reporting every problem at once with its line.

The file is read with PyYAML's *composed node tree* (safe tags only) so each rule, key and value
keeps its line for messages such as
``rules.yaml:14: rule 'export-finished-jobs': unknown operator 'eq' on 'job.state' (known: ...)``.
Keys, ids and event names are taken as the text written, not as YAML 1.1 would resolve them:
an unquoted ``on`` key is the boolean ``true`` to PyYAML, and ``on`` is our most important key.

Errors make the file unusable (:class:`RulesError`): an ``on`` pattern that matches no CVAT event
and a path that is not in the payload of any of the rule's events (:mod:`receiver.rules.shapes`)
are errors, with the closest names. Warnings (a field CVAT 2.73 does not send but a newer CVAT may,
a rule whose own action can trigger it) are kept on the :class:`RuleSet` for
``cvat-hooks rules check`` to show.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

import workers.actions
from core.cvat_events import EVENT_NAMES, expand, resource_of
from core.retry import RetryPolicy
from core.rule_secrets import NAME as SECRET_NAME
from receiver.rules.conditions import RegexError, compile_regex
from receiver.rules.model import (
    OPERATORS,
    TRANSITION_OPERATORS,
    ActionDecl,
    All,
    AnyOf,
    Check,
    Condition,
    Not,
    Problem,
    Rule,
    RulesError,
    RuleSet,
)
from receiver.rules.own_events import OPT_OUT_KEY, self_trigger_warning
from receiver.rules.shapes import path_problem
from receiver.rules.templating import Placeholder, check_template, parse_template

Validator = Callable[[str, Mapping[str, Any]], list[str]]
"""``(action name, params without 'action') -> problems``; :func:`workers.actions.validate_params`."""
CausesOf = Callable[[str, Mapping[str, Any]], tuple[str, ...]]
"""``(action name, params) -> CVAT events it can cause``; :func:`workers.actions.events_caused`."""

VERSION = 1
TOP_KEYS = ("version", "rules")
RULE_KEYS = ("id", "description", "on", "if", "do", "retry", OPT_OUT_KEY)
RETRY_KEYS = ("attempts", "backoff")

_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*")
_PATH = re.compile(r"[^.\s]+(?:\.[^.\s]+)*")


def _line(node: Node) -> int:
    return node.start_mark.line + 1


class _Builder:
    """One validation pass: collects problems instead of stopping at the first."""

    def __init__(self, source: str, loader: yaml.SafeLoader, validate_action: Validator,
                 causes_of: CausesOf) -> None:
        self.source = source
        self.loader = loader
        self.validate_action = validate_action
        self.causes_of = causes_of
        self.problems: list[Problem] = []
        self.events: tuple[str, ...] = ()
        """The known event names the rule being read listens to (its paths are checked against them)."""

    # -- reporting and small helpers ------------------------------------------------------------

    def error(self, node: Node | None, message: str, rule: str | None = None, *, warn: bool = False) -> None:
        line = _line(node) if node is not None else None
        self.problems.append(Problem(self.source, line, message, rule, "warning" if warn else "error"))

    def value(self, node: Node) -> Any:
        """The Python value of a node (safe types only; tags were checked before the walk)."""
        return self.loader.construct_object(node, deep=True)

    def pairs(self, node: MappingNode, rule: str | None) -> Iterator[tuple[str, Node, Node]]:
        """``(key text, key node, value node)`` of a mapping; non-text and duplicate keys reported."""
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.error(key_node, "keys must be plain names", rule)
                continue
            key = key_node.value
            if key in seen:
                self.error(key_node, f"duplicate key {key!r} (first at line {seen[key]})", rule)
                continue
            seen[key] = _line(key_node)
            yield key, key_node, value_node

    # -- the file -------------------------------------------------------------------------------

    def ruleset(self, root: Node | None) -> tuple[int, list[Rule]]:
        if root is None:
            self.error(None, f"empty file: expected 'version: {VERSION}' and 'rules'")
            return VERSION, []
        if not isinstance(root, MappingNode):
            self.error(root, f"the file must be a mapping with 'version: {VERSION}' and 'rules'")
            return VERSION, []
        found = {key: (knode, vnode) for key, knode, vnode in self.pairs(root, None)}
        for key, (knode, _) in found.items():
            if key not in TOP_KEYS:
                self.error(knode, f"unknown top-level key {key!r} (allowed: {', '.join(TOP_KEYS)})")
        if "version" not in found:
            self.error(root, f"missing 'version: {VERSION}'")
        else:
            version_node = found["version"][1]
            version = self.value(version_node)
            if isinstance(version, bool) or version != VERSION:
                self.error(version_node, f"unsupported version {version!r} (this receiver reads {VERSION})")
        if "rules" not in found:
            self.error(root, "missing 'rules' (a list of rules)")
            return VERSION, []
        rules_node = found["rules"][1]
        if not isinstance(rules_node, SequenceNode):
            self.error(rules_node, "'rules' must be a list of rules")
            return VERSION, []
        first_line: dict[str, int] = {}
        rules = []
        for position, node in enumerate(rules_node.value, start=1):
            rule = self.rule(node, position, first_line)
            if rule is not None:
                rules.append(rule)
        return VERSION, rules

    # -- one rule -------------------------------------------------------------------------------

    def rule(self, node: Node, position: int, first_line: dict[str, int]) -> Rule | None:
        label = f"#{position}"
        if not isinstance(node, MappingNode):
            self.error(node, "a rule must be a mapping with 'id', 'on' and 'do'", label)
            return None
        found = {key: (knode, vnode) for key, knode, vnode in self.pairs(node, label)}
        rule_id, usable = self.rule_id(found.get("id"), node, label, first_line)
        label = rule_id or label
        for key, (knode, _) in found.items():
            if key not in RULE_KEYS:
                self.error(knode, f"unknown key {key!r} (allowed: {', '.join(RULE_KEYS)})", label)
        for key in ("on", "do"):
            if key not in found:
                self.error(node, f"missing {key!r}", label)
        on = self.on(found["on"][1], label) if "on" in found else ()
        self.events = tuple(dict.fromkeys(name for pattern in on for name in expand(pattern)))
        condition = self.condition(found["if"][1], label, on) if "if" in found else None
        actions = self.actions(found["do"][1], label) if "do" in found else ()
        retry = self.retry(found["retry"][1], label) if "retry" in found else RetryPolicy()
        description = ""
        if "description" in found:
            desc = found["description"][1]
            if isinstance(desc, ScalarNode) and isinstance(self.value(desc), str | None):
                description = desc.value
            else:
                self.error(desc, "'description' must be text", label)
        allow_self_trigger = self.flag(found[OPT_OUT_KEY][1], OPT_OUT_KEY, label) if OPT_OUT_KEY in found else False
        if rule_id is None or not usable:
            return None
        rule = Rule(rule_id, on, condition, actions, retry or RetryPolicy(), description, _line(node),
                    allow_self_trigger)
        if (warning := self_trigger_warning(rule)) is not None:
            self.error(node, warning, label, warn=True)
        return rule

    def flag(self, node: Node, key: str, label: str) -> bool:
        """A ``true``/``false`` rule key (anything else is reported, and counts as ``false``)."""
        value = self.value(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            self.error(node, f"{key!r} must be true or false", label)
            return False
        return value

    def rule_id(self, item: tuple[Node, Node] | None, rule_node: Node, label: str,
                first_line: dict[str, int]) -> tuple[str | None, bool]:
        """The rule's id (``None`` if unusable as a label) and whether the rule may be built with it."""
        if item is None:
            self.error(rule_node, "missing 'id'", label)
            return None, False
        node = item[1]
        if not isinstance(node, ScalarNode) or not _SLUG.fullmatch(node.value):
            shown = node.value if isinstance(node, ScalarNode) else "a " + getattr(node, "id", "node")
            self.error(node, f"id {shown!r} is not a slug (lowercase letters, digits, '-' and '_', "
                             "starting with a letter or digit)", label)
            return None, False
        rule_id = node.value
        if rule_id in first_line:
            first = first_line[rule_id]
            self.error(node, f"duplicate id {rule_id!r} (first defined at line {first})", rule_id)
            return rule_id, False  # still named by its id in the messages about it
        first_line[rule_id] = _line(rule_node)
        return rule_id, True

    def on(self, node: Node, label: str) -> tuple[str, ...]:
        items = node.value if isinstance(node, SequenceNode) else [node]
        if isinstance(node, SequenceNode) and not items:
            self.error(node, "'on' must name at least one event", label)
        patterns = []
        for item in items:
            if not isinstance(item, ScalarNode) or not item.value.strip():
                self.error(item, "'on' must be an event name or a list of them", label)
                continue
            pattern = item.value.strip()
            patterns.append(pattern)
            if not expand(pattern):
                close = difflib.get_close_matches(pattern, EVENT_NAMES, n=3, cutoff=0.75)
                hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else \
                    "see README.md, Rules reference: Events"
                self.error(item, f"on {pattern!r} matches no CVAT event ({hint})", label)
        return tuple(patterns)

    # -- conditions -----------------------------------------------------------------------------

    def condition(self, node: Node, label: str, on: tuple[str, ...]) -> Condition | None:
        """A condition mapping: paths and ``all``/``any``/``not`` groups, ANDed."""
        if not isinstance(node, MappingNode) or not node.value:
            self.error(node, "a condition must be a non-empty mapping of 'path: condition'", label)
            return None
        items: list[Condition] = []
        for key, knode, vnode in self.pairs(node, label):
            if key in ("all", "any"):
                if not isinstance(vnode, SequenceNode) or not vnode.value:
                    self.error(vnode, f"'{key}' must be a non-empty list of conditions", label)
                    continue
                subs = [c for c in (self.condition(n, label, on) for n in vnode.value) if c is not None]
                items.append(All(tuple(subs)) if key == "all" else AnyOf(tuple(subs)))
            elif key == "not":
                sub = self.condition(vnode, label, on)
                if sub is not None:
                    items.append(Not(sub))
            elif not _PATH.fullmatch(key):
                self.error(knode, f"bad path {key!r} (dotted names, e.g. job.state or labels.0.name)", label)
            else:
                self.check_path(key, knode, label)
                items.extend(self.checks(key, knode, vnode, label, on))
        return items[0] if len(items) == 1 else All(tuple(items))

    def check_path(self, path: str, node: Node, label: str, *, template: bool = False, where: str = "") -> None:
        """A path that is in none of the payloads CVAT sends for the rule's events would never match."""
        problem = path_problem(path, self.events, template=template)
        if problem is not None:
            self.error(node, where + problem.message, label, warn=problem.severity == "warning")

    def checks(self, path: str, knode: Node, vnode: Node, label: str, on: tuple[str, ...]) -> list[Check]:
        """The operators applied to one path (a plain value means ``equals``)."""
        if not isinstance(vnode, MappingNode):
            return [Check(path, "equals", self.value(vnode))]
        if not vnode.value:
            self.error(vnode, f"no operator given for {path!r}", label)
        checks = []
        for op, onode, arg_node in self.pairs(vnode, label):
            if op not in OPERATORS:
                known = ", ".join(OPERATORS)
                self.error(onode, f"unknown operator {op!r} on {path!r} (known: {known})", label)
                continue
            arg = self.value(arg_node)
            problem = _operand_problem(op, arg)
            if problem:
                self.error(arg_node, f"{op!r} on {path!r}: {problem}", label)
                continue
            if op in TRANSITION_OPERATORS:
                self.check_transition(path, op, onode, label, on)
            pattern = compile_regex(arg) if op == "regex" else None
            checks.append(Check(path, op, tuple(arg) if op in ("in", "not_in") else arg, pattern))
        return checks

    def check_transition(self, path: str, op: str, node: Node, label: str, on: tuple[str, ...]) -> None:
        """A transition on a field of a resource none of the rule's events carry can never match."""
        resources = {resource_of(name) for pattern in on for name in expand(pattern)}
        head = path.split(".", 1)[0]
        if resources and None not in resources and head not in resources:
            about = ", ".join(sorted(r for r in resources if r))
            self.error(node, f"{op!r} on {path!r} can never match: the rule's events are about {about}, "
                             "and transitions only apply to the event's own object", label)

    # -- actions and retry ----------------------------------------------------------------------

    def actions(self, node: Node, label: str) -> tuple[ActionDecl, ...]:
        if not isinstance(node, SequenceNode) or not node.value:
            self.error(node, "'do' must be a non-empty list of actions", label)
            return ()
        decls = []
        for index, item in enumerate(node.value):
            where = f"action #{index + 1}"
            if not isinstance(item, MappingNode):
                self.error(item, f"{where} must be a mapping with 'action' and its parameters", label)
                continue
            name, params = None, {}
            for key, _, vnode in self.pairs(item, label):
                if key == "action":
                    name = self.value(vnode)
                    if not isinstance(name, str):
                        self.error(vnode, f"{where}: 'action' must be an action name", label)
                        name = None
                    continue
                params[key] = self.value(vnode)
                self.check_templates(vnode, f"{where}: {key}", label)
            if name is None:
                self.error(item, f"{where}: missing 'action'", label)
                continue
            for problem in self.action_problems(name, params):
                self.error(item, f"{where} ({name}): {problem}", label,
                           warn=isinstance(problem, workers.actions.LoadWarning))
            decls.append(ActionDecl(index, name, params, _line(item), self.action_causes(name, params)))
        return tuple(decls)

    def action_problems(self, name: str, params: dict[str, Any]) -> list[str]:
        try:
            return list(self.validate_action(name, params))
        except Exception as exc:  # a broken action module must not hide the file's other problems
            return [f"parameters could not be checked ({type(exc).__name__}: {exc})"]

    def action_causes(self, name: str, params: dict[str, Any]) -> tuple[str, ...]:
        try:
            return tuple(self.causes_of(name, params))
        except Exception:  # as for validation: reported there, and no guard is better than no file
            return ()

    def check_templates(self, node: Node, where: str, label: str) -> None:
        """Every string inside a parameter must be a valid template (checked at load, not at 3 a.m.)."""
        if isinstance(node, ScalarNode):
            text = self.value(node)
            if isinstance(text, str) and (problem := check_template(text)):
                self.error(node, f"{where}: {problem}", label)
            elif isinstance(text, str) and "{" in text:
                parts = parse_template(text)
                for i, part in enumerate(parts):
                    before = parts[i - 1] if i else ""
                    if not isinstance(part, Placeholder) or (
                            isinstance(before, str) and before.endswith("$") and SECRET_NAME.fullmatch(part.path)):
                        continue  # a ${NAME} reference to the worker's environment is not the event's
                    self.check_path(part.path, node, label, template=True, where=f"{where}: placeholder: ")
        elif isinstance(node, SequenceNode):
            for child in node.value:
                self.check_templates(child, where, label)
        elif isinstance(node, MappingNode):
            for key_node, child in node.value:
                key = key_node.value if isinstance(key_node, ScalarNode) else "?"
                self.check_templates(child, f"{where}.{key}", label)

    def retry(self, node: Node, label: str) -> RetryPolicy | None:
        if not isinstance(node, MappingNode):
            self.error(node, "'retry' must be a mapping with 'attempts' and/or 'backoff'", label)
            return None
        found = {}
        for key, knode, vnode in self.pairs(node, label):
            if key not in RETRY_KEYS:
                self.error(knode, f"unknown retry key {key!r} (allowed: {', '.join(RETRY_KEYS)})", label)
            else:
                found[key] = self.value(vnode)
        kwargs: dict[str, Any] = {}
        if "backoff" in found:
            if not isinstance(found["backoff"], list):
                self.error(node, "retry backoff must be a list of seconds", label)
                return None
            kwargs["backoff"] = tuple(found["backoff"])
            kwargs["attempts"] = len(found["backoff"])  # one retry per listed delay unless told
        if "attempts" in found:
            kwargs["attempts"] = found["attempts"]
        try:
            return RetryPolicy(**kwargs)
        except (TypeError, ValueError) as exc:
            self.error(node, str(exc), label)
            return None


def _operand_problem(op: str, arg: Any) -> str | None:
    """What is wrong with an operator's operand, if anything."""
    if op in ("in", "not_in") and not isinstance(arg, list):
        return "expects a list of values"
    if op in ("exists", "changed") and not isinstance(arg, bool):
        return "expects true or false"
    if op in ("gt", "gte", "lt", "lte") and (isinstance(arg, bool) or not isinstance(arg, int | float | str)):
        return "expects a number or an ISO date string"
    if op == "regex":
        if not isinstance(arg, str):
            return "expects a regular expression string"
        try:
            compile_regex(arg)
        except RegexError as exc:
            return f"bad regex {arg!r}: {exc}"
    return None


MAX_NODES = 100_000
"""YAML nodes a rules file may stand for once every alias is expanded. A real file has a few hundred;
an alias bomb ("billion laughs": nine aliases of nine aliases of...) has billions, and checking its
templates, or rendering its parameters for each event, would never end."""
MAX_NESTING = 100
"""Deepest nesting accepted in a rules file (a real one is about 8 levels deep)."""


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


class _Oversized(Exception):
    """A document beyond :data:`MAX_NODES` or :data:`MAX_NESTING`, or a recursive alias."""


def _expanded_shape(root: Node) -> tuple[int, int]:
    """``(nodes, depth)`` of the tree ``root`` stands for with its aliases expanded, in time linear in
    the nodes written (each shared node is measured once); :class:`_Oversized` for a recursive alias."""
    done: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            kids = [done[id(k)] for k in _children(node)]
            nodes = min(1 + sum(k[0] for k in kids), MAX_NODES + 1)
            done[key] = (nodes, 1 + max((k[1] for k in kids), default=0))
            on_path.discard(key)
            continue
        if key in done:
            continue
        on_path.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in on_path:
                raise _Oversized(f"recursive: an alias on line {_line(kid)} refers to a node containing it")
            if id(kid) not in done:
                stack.append((kid, False))
    return done[id(root)]


def _compose(text: str, source: str) -> tuple[Node | None, yaml.SafeLoader]:
    """The node tree of a document, syntax and unsafe tags rejected as a :class:`RulesError`, and so
    are documents nested or aliased beyond what any rules file needs (see :data:`MAX_NODES`)."""
    try:
        loader = yaml.SafeLoader(text)  # checks the characters at once: NUL and other controls are refused
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise RulesError([Problem(source, line, f"YAML error: {exc.reason} (character #x{exc.character:04x})")]) \
            from exc
    try:
        root = loader.get_single_node()
        if root is not None:
            nodes, depth = _expanded_shape(root)
            if depth > MAX_NESTING:
                raise _Oversized(f"nested deeper than {MAX_NESTING} levels")
            if nodes > MAX_NODES:
                raise _Oversized(f"more than {MAX_NODES} values once its aliases are expanded")
            loader.construct_document(root)  # rejects tags the safe loader does not know
    except (_Oversized, RecursionError) as exc:
        # PyYAML composes recursively: a deep enough document exhausts the stack before we can measure it.
        loader.dispose()
        why = str(exc) if isinstance(exc, _Oversized) else "nested too deeply"
        raise RulesError([Problem(source, None, f"YAML error: the document is {why}")]) from exc
    except yaml.MarkedYAMLError as exc:
        loader.dispose()
        mark = exc.problem_mark or exc.context_mark
        what = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise RulesError([Problem(source, mark.line + 1 if mark else None, f"YAML error: {what}")]) from exc
    except yaml.YAMLError as exc:
        loader.dispose()
        raise RulesError([Problem(source, None, f"YAML error: {exc}")]) from exc
    except (ValueError, OverflowError) as exc:
        # A constructor refusing a value PyYAML's scanner accepted: an int of 5,000 digits, a 13th month.
        loader.dispose()
        raise RulesError([Problem(source, None, f"YAML error: a value cannot be read: {exc}")]) from exc
    return root, loader


def parse_rules(data: str | bytes, source: str = "rules.yaml", *,
                validate_action: Validator | None = None, causes_of: CausesOf | None = None) -> RuleSet:
    """Validate rules text and build a :class:`RuleSet` (``RulesError`` listing every problem).

    ``validate_action`` checks one action's parameters; it defaults to
    :func:`workers.actions.validate_params` (tests inject a fake, the actions are the workers').
    ``causes_of`` says which CVAT events an action can cause; it defaults to
    :func:`workers.actions.events_caused`.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError([Problem(source, None, f"not UTF-8 text: {exc}")]) from exc
    root, loader = _compose(text, source)
    try:
        builder = _Builder(source, loader, validate_action or workers.actions.validate_params,
                           causes_of or workers.actions.events_caused)
        version, rules = builder.ruleset(root)
    finally:
        loader.dispose()
    problems = sorted(builder.problems, key=lambda p: p.line or 0)
    if any(p.severity == "error" for p in problems):
        raise RulesError(problems)
    return RuleSet(version, tuple(rules), source, tuple(problems), hashlib.sha256(raw).hexdigest())


def load_rules(path: str | Path, *, validate_action: Validator | None = None,
               causes_of: CausesOf | None = None) -> RuleSet:
    """Read and validate a rules file (an unreadable file is a :class:`RulesError` too)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        problem = Problem(str(path), None, f"cannot read the rules file: {exc.strerror or exc}")
        raise RulesError([problem]) from exc
    return parse_rules(raw, str(path), validate_action=validate_action, causes_of=causes_of)
