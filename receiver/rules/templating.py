"""Render ``{path}`` placeholders in action parameters: a tiny, safe template language.

``str.format`` is not used on purpose: it allows attribute access and indexing
(``{job.__class__}``), which would let a rules file, or a payload value, reach Python objects.
Here a placeholder is only a dotted path of names and digits, looked up in plain dicts and lists,
and checked when ``rules.yaml`` loads. ``{{`` and ``}}`` are literal braces.

Values substituted into a *path parameter* (``ActionSpec.path_params``, e.g. ``export.to``) are made
path-safe, so a task named ``../../etc`` cannot steer a write outside its directory, nor one named
``..%2F..%2Fwebhook-secrets`` once storage percent-decodes a ``file://`` URL (``%`` is neutralised
too: a value is made safe *before* the destination is decoded, so it must not carry escapes). The literal
parts of the template are the rules author's and are checked by storage, not here.

Parameters that may hold credentials (``ActionSpec.secret_params``: ``notify``'s URL and headers) are
rendered *sealed*: ``${NAME}`` (an upper-case name) stays a reference that only the worker resolves,
from its own environment, when it sends (``core.rule_secrets``), so the value never reaches the
RQ job, the delivery record or Redis; every other ``$`` becomes ``$$``, so a payload value can never
smuggle in a reference of its own.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from core.events import Event
from core.rule_secrets import NAME as SECRET_NAME
from receiver.rules.conditions import getter, is_missing

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX = re.compile(r"[0-9]+")


class TemplateError(ValueError):
    """A template that cannot be rendered whatever the event (a load-time error)."""


class RenderError(ValueError):
    """A template that cannot be rendered for this event (a placeholder's path is missing)."""


@dataclass(frozen=True)
class Placeholder:
    """A ``{dotted.path}`` inside a template."""

    path: str


Part = str | Placeholder


def _check_path(content: str) -> str | None:
    """Why a placeholder's content is not an allowed dotted path, or ``None`` if it is."""
    hint = ""
    if any(c in content for c in "!:"):
        hint = " (format specs and conversions are not allowed)"
    elif any(c in content for c in "[]"):
        hint = " (use a dotted path such as labels.0.name instead of indexing)"
    elif any(c in content for c in "()"):
        hint = " (calls are not allowed)"
    segments = content.split(".")
    if not content or not all(_NAME.fullmatch(s) or _INDEX.fullmatch(s) for s in segments):
        return f"placeholder {{{content}}} is not a dotted path of names and digits{hint}"
    if not _NAME.fullmatch(segments[0]):
        return f"placeholder {{{content}}} must start with a name"
    if any(s.startswith("__") for s in segments):
        return f"placeholder {{{content}}}: names starting with '__' are not allowed (no attribute access)"
    return None


@lru_cache(maxsize=2048)
def parse_template(text: str) -> tuple[Part, ...]:
    """Split a template into literal strings and placeholders (``TemplateError`` if malformed)."""
    parts: list[Part] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "{}" and text.startswith(c * 2, i):
            literal.append(c)
            i += 2
        elif c == "}":
            raise TemplateError(f"single '}}' at position {i} (write '}}}}' for a literal brace)")
        elif c == "{":
            end = text.find("}", i + 1)
            nested = text.find("{", i + 1)
            if end < 0 or (0 <= nested < end):
                raise TemplateError(f"unclosed '{{' at position {i} (write '{{{{' for a literal brace)")
            content = text[i + 1 : end]
            problem = _check_path(content)
            if problem:
                raise TemplateError(problem)
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(Placeholder(content))
            i = end + 1
        else:
            literal.append(c)
            i += 1
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def check_template(text: str) -> str | None:
    """Why a template is malformed, or ``None`` if it is fine (used by the loader)."""
    try:
        parse_template(text)
    except TemplateError as exc:
        return str(exc)
    return None


def to_text(value: Any) -> str:
    """How a value reads inside a string: ``none``, ``true``/``false``, numbers, JSON for structures."""
    if isinstance(value, str):
        return value
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return _COMPACT_JSON.encode(value)


_COMPACT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)
"""``json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)``, built once (``json.dumps``
with options builds an encoder per call). It keeps no state between calls."""


_UNSAFE = "/\\%"
"""Characters of a substituted value replaced by ``_`` in a path parameter."""


def path_safe(value: str) -> str:
    """A substituted value that cannot add a directory level or climb out of one.

    Separators, and ``%`` (storage percent-decodes ``file://`` URLs after rendering, so ``%2F`` would
    be a separator and ``%2e%2e`` a ``..`` by then), become ``_``; control characters (NUL included)
    are removed, and a value that would be a special or empty path segment (``.``, ``..``, ``""``)
    becomes ``_``.
    """
    if value.isprintable() and not any(c in value for c in _UNSAFE) and value not in ("", ".", ".."):
        return value  # already safe, as ids and most names are (printable: no control character)
    cleaned = "".join(
        "_" if c in _UNSAFE else c for c in value if unicodedata.category(c) != "Cc"
    )
    return "_" if cleaned in ("", ".", "..") else cleaned


def _secret_ref(parts: tuple[Part, ...], i: int) -> str | None:
    """The name when ``parts[i]`` is the ``{NAME}`` of a ``${NAME}`` reference, else ``None``."""
    part = parts[i]
    if not isinstance(part, Placeholder) or not SECRET_NAME.fullmatch(part.path) or i == 0:
        return None
    before = parts[i - 1]
    return part.path if isinstance(before, str) and before.endswith("$") else None


def render(text: str, variables: Mapping[str, Any], *, safe_for_path: bool = False, sealed: bool = False) -> str:
    """Render one template string (``RenderError`` if a placeholder's path is not in ``variables``);
    ``sealed``: keep ``${NAME}`` references and escape every other ``$`` (see the module docstring)."""
    parts = parse_template(text)
    if not sealed and len(parts) == 1 and isinstance(parts[0], str):  # no placeholder, as most parameters
        return parts[0]
    out: list[str] = []
    for i, part in enumerate(parts):
        ref = _secret_ref(parts, i + 1) if sealed and i + 1 < len(parts) else None
        if isinstance(part, str):
            literal = part[:-1] if ref is not None else part
            out.append(literal.replace("$", "$$") if sealed else literal)
            continue
        if sealed and _secret_ref(parts, i) is not None:
            out.append(f"${{{part.path}}}")
            continue
        value = getter(part.path)(variables)
        if is_missing(value):
            raise RenderError(f"placeholder {{{part.path}}} not found in the event")
        rendered = to_text(value)
        rendered = path_safe(rendered) if safe_for_path else rendered
        out.append(rendered.replace("$", "$$") if sealed else rendered)
    return "".join(out)


def render_value(value: Any, variables: Mapping[str, Any], *, safe_for_path: bool = False,
                 sealed: bool = False) -> Any:
    """Render every string inside a value (recursing through dicts and lists); other values pass."""
    if isinstance(value, str):
        return render(value, variables, safe_for_path=safe_for_path, sealed=sealed)
    if isinstance(value, Mapping):
        return {k: render_value(v, variables, safe_for_path=safe_for_path, sealed=sealed) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render_value(v, variables, safe_for_path=safe_for_path, sealed=sealed) for v in value]
    return value


def render_params(
    params: Mapping[str, Any], variables: Mapping[str, Any], *, path_params: Collection[str] = frozenset(),
    secret_params: Collection[str] = frozenset(),
) -> dict[str, Any]:
    """Render an action's parameters; values substituted into ``path_params`` are made path-safe, and
    ``secret_params`` are rendered sealed."""
    return {k: render_value(v, variables, safe_for_path=k in path_params, sealed=k in secret_params)
            for k, v in params.items()}


def template_variables(event: Event, *, now: datetime) -> dict[str, Any]:
    """What placeholders can name: the event context plus ``delivery_id`` and ``date``.

    ``date`` is the UTC day of receipt (``YYYY-MM-DD``); ``now`` is passed in so rendering stays
    pure and a retried delivery can be rendered as it was (a naive ``now`` is taken as UTC).
    """
    moment = now if now.tzinfo else now.replace(tzinfo=UTC)
    variables = event.context()
    variables["delivery_id"] = event.delivery_id
    variables["date"] = _day(moment.astimezone(UTC))
    return variables


def _day(moment: datetime) -> str:
    """``YYYY-MM-DD``: ``isoformat`` is several times faster than ``strftime``, and the same from year 1000."""
    return moment.date().isoformat() if moment.year >= 1000 else moment.strftime("%Y-%m-%d")
