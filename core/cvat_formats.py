"""CVAT's annotation format names, for checking a rule's ``format:`` before any CVAT is asked.

``cvat_formats.json`` beside this module lists the export and import format names of a real CVAT
(``GET /api/server/annotation/formats``; regenerate it with ``tests/make_cvat_formats.py``). Import
and export names differ (``CVAT for images 1.1`` exports, ``CVAT 1.1`` imports), so every check
names its kind. The receiver loads rules without CVAT, so this list is what a load checks against;
``cvat-hooks rules check --online`` passes the server's own list as ``offered``, and an action
still asks the server when it runs (``export.check_format``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection
from functools import cache
from importlib import resources
from typing import Literal

FormatKind = Literal["export", "import"]
KINDS: tuple[FormatKind, ...] = ("export", "import")


@cache
def _shipped() -> dict[str, object]:
    """The shipped file, read once per process."""
    text = resources.files(__package__).joinpath("cvat_formats.json").read_text(encoding="utf-8")
    data: dict[str, object] = json.loads(text)
    return data


def shipped_version() -> str:
    """The CVAT version the shipped list was read from."""
    return str(_shipped()["cvat_version"])


def known_formats(kind: FormatKind) -> tuple[str, ...]:
    """The format names of the shipped list for one kind."""
    if kind not in KINDS:
        raise ValueError(f"format kind must be one of {', '.join(KINDS)}, not {kind!r}")
    names = _shipped()[kind]
    assert isinstance(names, list)
    return tuple(str(name) for name in names)


def closest(name: str, names: Collection[str], n: int = 3) -> list[str]:
    """The names nearest to ``name``: differing case or spacing first, then difflib's closest."""
    def squeeze(text: str) -> str:
        return "".join(text.split()).casefold()

    same = [known for known in names if squeeze(known) == squeeze(name)]
    if same:
        return same[:n]
    rest = difflib.get_close_matches(name, list(names), n=n, cutoff=0.5)
    starts = [k for k in names if k.casefold().startswith(name.casefold()) and k not in rest]
    return (rest + sorted(starts))[:n]


def format_problem(kind: FormatKind, name: str, offered: Collection[str] | None = None) -> str | None:
    """Why ``name`` is not a format CVAT can ``kind`` with, or ``None`` when it is.

    ``offered`` is a server's own list; without one, the shipped list of CVAT :func:`shipped_version`.
    """
    if kind not in KINDS:
        raise ValueError(f"format kind must be one of {', '.join(KINDS)}, not {kind!r}")
    names = tuple(offered) if offered is not None else known_formats(kind)
    if name in names:
        return None
    where = "this CVAT server" if offered is not None else f"CVAT {shipped_version()}"
    near = closest(name, names)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}?" if near else "names are exact, version included"
    return f"format {name!r} is not an {kind} format of {where} ({hint})"
