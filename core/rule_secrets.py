"""``${NAME}`` references in credential parameters, resolved by the worker when it uses them.

A rule's webhook URL or ``Authorization`` header is a credential. Written literally in ``rules.yaml``
it would travel inside the rendered parameters into the RQ job and the delivery record, and sit in
Redis for the retention period. Written as ``${NAME}``, the receiver renders it *sealed*
(``receiver.rules.templating``): the reference stays a reference, and only the worker, at the moment
it sends, replaces it with the value of its environment variable ``NAME``. What Redis keeps is the
name.

Names of the service's own credentials (``CVAT_*``, ``AWS_*``) cannot be referenced: whoever edits
the rules (a ConfigMap) must not be able to post the CVAT password or the S3 keys to a URL of their
choice.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from core.errors import PermanentError

FORBIDDEN_PREFIXES = ("CVAT_", "AWS_")
"""Prefixes of the service's own configuration, which holds its credentials."""

NAME = re.compile(r"[A-Z][A-Z0-9_]*")
"""A name ``${NAME}`` may reference: upper case, so it never reads as a payload path (CVAT's are lower case)."""
_REFERENCE = re.compile(rf"\$\{{({NAME.pattern})\}}")
_SEALED = re.compile(rf"\$(\$|\{{({NAME.pattern})\}})")


def references(template: str) -> list[str]:
    """The names an unrendered template references as ``${NAME}``."""
    return _REFERENCE.findall(template)


def is_reference(text: str) -> bool:
    """Whether ``text`` is one ``${NAME}`` reference and nothing else (a name, no secret: showable)."""
    return _REFERENCE.fullmatch(text) is not None


def forbidden(name: str) -> str | None:
    """Why a rule may not reference ``name``, or ``None`` if it may."""
    if name.startswith(FORBIDDEN_PREFIXES):
        return (f"${{{name}}}: variables named {' or '.join(p + '*' for p in FORBIDDEN_PREFIXES)} hold the "
                "service's own credentials and cannot be used in rules; use a name of your own")
    return None


def unseal(text: str, lookup: Callable[[str], str | None]) -> str:
    """``text`` as rendered sealed, with ``$$`` back to ``$`` and each ``${NAME}`` replaced by
    ``lookup(NAME)``. An unset or forbidden name is a permanent error that names the variable only."""

    def value(m: re.Match[str]) -> str:
        if m.group(1) == "$":
            return "$"
        name = m.group(2)
        why = forbidden(name)
        if why is not None:
            raise PermanentError(why)
        found = lookup(name)
        if found is None:
            raise PermanentError(f"${{{name}}} is not set in the worker's environment")
        return found

    return _SEALED.sub(value, text)
