"""Sending the contract's exchanges to a CVAT (the test server or a real one) and comparing answers.

An exchange (one entry of ``cvat-2.73.json``) names its request with placeholders such as
``{task_in_project}``, resolved against a :class:`World` (the objects a run creates first, and what
the exchange's ``setup`` steps saved). An answer is reduced to its *shape* (:func:`shape`): JSON
types, object keys, array items; :func:`compare` holds an actual answer to the recorded one:

- the status code and the media type of ``Content-Type`` are equal, ``Vary`` names ``Accept`` when
  the recorded answer's did;
- every key real CVAT returned is present with the same JSON type, recursively (extra keys are
  allowed: the test server may know more than one CVAT version); ``null`` matches only ``null``;
- a recorded non-empty array must not come back empty, and each item has the recorded items' shape;
- a bare-list error body stays a list (CVAT's ``["All label names must be unique"]``);
- ``values``: exact values at JSON pointers (``*`` for every array item), origins written ``{base}``;
  ``absent``: pointers that must not exist (labels of a task in a project carry no ``task_id``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

MEDIA_JSON = "application/vnd.cvat+json"
PLACEHOLDER = re.compile(r"\{([a-z_0-9]+)(?:\|(quote))?\}")
POLL_SECONDS = 30.0
"""How long a ``setup`` step with ``until`` polls before giving up."""


@dataclass
class World:
    """What one run created, as placeholder values, and how to authenticate as each role."""

    base: str
    values: dict[str, Any]
    auth: dict[str, dict[str, str]]
    """Role (``admin``, ``outsider``, ``anonymous``, ``bad-token``, ``wrong-basic``) -> headers."""
    http: urllib3.PoolManager = field(default_factory=lambda: urllib3.PoolManager(retries=False, timeout=30))

    def resolve(self, value: Any, saved: dict[str, Any]) -> Any:
        """``value`` with every ``{name}`` (``{name|quote}`` URL-encoded) replaced; a string that is
        a single placeholder takes the value's own type (an id stays a number)."""
        names = {**self.values, **saved, "base": self.base}
        if isinstance(value, str):
            whole = PLACEHOLDER.fullmatch(value)
            if whole and whole.group(2) is None:
                return names[whole.group(1)]

            def one(match: re.Match[str]) -> str:
                text = str(names[match.group(1)])
                return quote(text, safe="") if match.group(2) else text

            return PLACEHOLDER.sub(one, value)
        if isinstance(value, list):
            return [self.resolve(v, saved) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v, saved) for k, v in value.items()}
        return value

    def send(self, request: dict[str, Any], saved: dict[str, Any]) -> urllib3.BaseHTTPResponse:
        """One request of an exchange (or of its setup), as its role, over real HTTP."""
        headers = dict(self.auth[request.get("as", "admin")])
        headers.update(self.resolve(request.get("headers", {}), saved))
        body: bytes | None = None
        if "json" in request:
            body = json.dumps(self.resolve(request["json"], saved)).encode()
            headers.setdefault("Content-Type", "application/json")
        elif "raw_body" in request:
            body = request["raw_body"].encode()
            headers.setdefault("Content-Type", "application/json")
        url = self.base + self.resolve(request["path"], saved)
        query = self.resolve(request.get("query", {}), saved)
        if query:
            url += "?" + urlencode(query)
        return self.http.request(request["method"], url, body=body, headers=headers, redirect=False)

    def run(self, exchange: dict[str, Any]) -> tuple[urllib3.BaseHTTPResponse, dict[str, Any]]:
        """The exchange's setup steps (saving values, polling ``until``), then its request."""
        saved: dict[str, Any] = {}
        for step in exchange.get("setup", []):
            deadline = time.monotonic() + POLL_SECONDS
            while True:
                answer = self.send(step, saved)
                if answer.status >= 400 and answer.status != 409:  # 409: that export already runs
                    raise AssertionError(f"setup {step['method']} {step['path']}: {answer.status} "
                                         f"{answer.data[:300]!r}")
                data = answer.json() if answer.data and "json" in answer.headers.get("Content-Type", "") else None
                until = step.get("until")
                if until is None or pick(data, until["pointer"]) in until["in"]:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"setup {step['path']}: {until} not reached: {data}")
                time.sleep(0.2)
            for name, pointer in step.get("save", {}).items():
                saved[name] = pick(data, pointer)
            for name, header in step.get("save_headers", {}).items():  # TUS answers carry no body
                saved[name] = answer.headers.get(header)
        return self.send(exchange["request"], saved), saved


def pick(data: Any, pointer: str) -> Any:
    """The value at a JSON pointer; ``*`` maps over an array (a list of the items' values)."""
    if pointer in ("", "/"):
        return data
    head, _, rest = pointer[1:].partition("/")
    rest = "/" + rest if rest else ""
    if head == "*":
        return [pick(item, rest) for item in data]
    if isinstance(data, list):
        return pick(data[int(head)], rest)
    return pick(data[head], rest)


def exists(data: Any, pointer: str) -> bool:
    """Whether a pointer names something (for ``*``: in any item)."""
    head, _, rest = pointer[1:].partition("/")
    rest = "/" + rest if rest else ""
    if head == "*":
        return isinstance(data, list) and any(exists(item, rest) if rest else True for item in data)
    if isinstance(data, dict) and head in data:
        return exists(data[head], rest) if rest else True
    return False


# -- shapes ---------------------------------------------------------------------------------------


def shape(value: Any) -> Any:
    """The JSON shape of a value: ``"null"``, ``"boolean"``, ``"number"``, ``"string"``,
    ``{"object": {key: shape}}``, ``{"array": item shape or None, "nonempty": bool}`` or
    ``{"anyOf": [...]}`` where array items differ (truncation markers of the recordings are dropped)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return {"object": {k: shape(v) for k, v in value.items()}}
    items = [v for v in value if not (isinstance(v, str) and v.startswith("<... ") and v.endswith("truncated>"))]
    merged: Any = None
    for item in items:
        merged = merge(merged, shape(item))
    return {"array": merged, "nonempty": bool(items)}


def merge(a: Any, b: Any) -> Any:
    """One shape for two array items: common keys of objects, ``anyOf`` for different types."""
    if a is None or a == b:
        return b
    if isinstance(a, dict) and isinstance(b, dict) and "object" in a and "object" in b:
        return {"object": {k: merge(v, b["object"][k]) for k, v in a["object"].items() if k in b["object"]}}
    if isinstance(a, dict) and isinstance(b, dict) and "array" in a and "array" in b:
        return {"array": merge(a["array"], b["array"]), "nonempty": a["nonempty"] or b["nonempty"]}
    options = (a["anyOf"] if isinstance(a, dict) and "anyOf" in a else [a])
    return {"anyOf": options + [b] if b not in options else options}


def shape_errors(expected: Any, value: Any, where: str = "") -> list[str]:
    """How ``value`` departs from the recorded ``expected`` shape (empty: it conforms)."""
    here = where or "/"
    if isinstance(expected, dict) and "anyOf" in expected:
        if any(not shape_errors(option, value, where) for option in expected["anyOf"]):
            return []
        return [f"{here}: {json.dumps(value)[:80]} matches none of {len(expected['anyOf'])} recorded shapes"]
    if isinstance(expected, str):
        actual = shape(value)
        return [] if actual == expected else [f"{here}: expected {expected}, got {describe(actual)}"]
    if "object" in expected:
        if not isinstance(value, dict):
            return [f"{here}: expected an object, got {describe(shape(value))}"]
        errors = []
        for key, sub in expected["object"].items():
            if key not in value:
                errors.append(f"{where}/{key}: missing")
            else:
                errors.extend(shape_errors(sub, value[key], f"{where}/{key}"))
        return errors
    if not isinstance(value, list):
        return [f"{here}: expected an array, got {describe(shape(value))}"]
    if expected["nonempty"] and not value:
        return [f"{here}: empty, real CVAT answered items"]
    if expected["array"] is None:
        return []
    return [e for i, item in enumerate(value) for e in shape_errors(expected["array"], item, f"{where}/{i}")]


def describe(s: Any) -> str:
    return s if isinstance(s, str) else next(iter(s))


# -- answers --------------------------------------------------------------------------------------


def media_type(response: urllib3.BaseHTTPResponse) -> str | None:
    value = response.headers.get("Content-Type")
    return value.split(";")[0].strip().lower() if value else None


def body_of(response: urllib3.BaseHTTPResponse) -> tuple[str, Any]:
    """(kind, content): ``json`` parsed, ``empty``, ``binary`` (a download) or ``text``."""
    data = response.data
    kind = media_type(response) or ""
    if not data:
        return "empty", None
    if kind == MEDIA_JSON or kind.endswith("+json") or kind == "application/json":
        return "json", json.loads(data)
    if kind.startswith("text/"):
        return "text", data.decode("utf-8", "replace")
    return "binary", len(data)


def answer_record(response: urllib3.BaseHTTPResponse, exchange: dict[str, Any], world: World,
                  saved: dict[str, Any]) -> dict[str, Any]:
    """The ``response`` part of the fixture for a live answer (what ``record`` writes)."""
    kind, body = body_of(response)
    return expectation(exchange, response.status, media_type(response), "accept" in vary(response), kind, body,
                       base=world.base, names={**world.values, **saved})


def expectation(exchange: dict[str, Any], status: int, content_type: str | None, vary_accept: bool, kind: str,
                body: Any, *, base: str, names: dict[str, Any]) -> dict[str, Any]:
    """The recorded answer of an exchange: status, type, body kind, shape and checked values."""
    record: dict[str, Any] = {"status": status, "content_type": content_type, "vary_accept": vary_accept,
                              "body": kind}
    if kind == "json":
        used = set(PLACEHOLDER.findall(json.dumps([exchange["request"], exchange.get("setup", [])])))
        mine = {k: v for k, v in names.items() if k in {name for name, _ in used} or k == "rq_id"}
        record["shape"] = shape(body)
        record["values"] = {p: unresolve(pick(body, p), p, base, names, mine)
                            for p in exchange.get("check_values", []) if exists_or_root(body, p)}
    return record


def exists_or_root(body: Any, pointer: str) -> bool:
    return pointer in ("", "/") or exists(body, pointer)


def unresolve(value: Any, pointer: str, base: str, names: dict[str, Any], mine: dict[str, Any]) -> Any:
    """A recorded value with run-specific parts written as placeholders: the origin as ``{base}``; in
    ``*id`` fields the ids of the run's objects (those the exchange names, or any of two digits or
    more); in strings (links, rq_ids) the ids the exchange itself names (so ``page=2`` stays) and the
    run's names (slugs, usernames)."""
    if isinstance(value, list):
        return [unresolve(v, pointer, base, names, mine) for v in value]
    if isinstance(value, dict):
        return {k: unresolve(v, f"{pointer}/{k}", base, names, mine) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool) and pointer.endswith("id"):
        for source in (mine, {k: v for k, v in names.items() if isinstance(v, int) and v >= 10}):
            name = next((k for k, v in source.items() if v == value and not isinstance(v, bool)), None)
            if name is not None:
                return "{" + name + "}"
        return value
    if isinstance(value, str):
        text = value.replace(base, "{base}")
        for name, known in mine.items():
            if isinstance(known, int) and not isinstance(known, bool):
                text = re.sub(rf"(?<=[=/]){known}(?=$|[&/?])", "{" + name + "}", text)
        for name, known in sorted(names.items(), key=lambda kv: -len(str(kv[1]))):
            if isinstance(known, str) and len(known) > 3 and quote(known, safe="") in text:
                text = text.replace(quote(known, safe=""), "{" + name + "|quote}")
            if isinstance(known, str) and len(known) > 3 and known in text:
                text = text.replace(known, "{" + name + "}")
        return text
    return value


def vary(response: urllib3.BaseHTTPResponse) -> set[str]:
    return {v.strip().lower() for v in (response.headers.get("Vary") or "").split(",") if v.strip()}


def compare(exchange: dict[str, Any], response: urllib3.BaseHTTPResponse, world: World,
            saved: dict[str, Any]) -> list[str]:
    """Every way this answer departs from the recorded one (empty: it conforms)."""
    expected = exchange["response"]
    errors = []
    kind, body = body_of(response)
    if response.status != expected["status"]:
        errors.append(f"status {response.status}, real CVAT {expected['status']} "
                      f"(body: {response.data[:200]!r})")
    if media_type(response) != expected["content_type"]:
        errors.append(f"Content-Type {media_type(response)}, real CVAT {expected['content_type']}")
    if expected.get("vary_accept") and "accept" not in vary(response):
        errors.append(f"Vary {response.headers.get('Vary')!r} does not name Accept")
    if kind != expected["body"]:
        errors.append(f"a {kind} body, real CVAT {expected['body']}")
        return errors
    if kind == "json":
        errors.extend(shape_errors(expected["shape"], body))
        for pointer, value in expected.get("values", {}).items():
            want = world.resolve(value, saved)
            got = pick(body, pointer) if exists_or_root(body, pointer) else "<missing>"
            if got != want:
                errors.append(f"{pointer}: {json.dumps(got)[:200]}, real CVAT {json.dumps(want)[:200]}")
        for pointer in exchange.get("absent", []):
            if exists(body, pointer):
                errors.append(f"{pointer}: present, real CVAT has no such key")
    return errors

