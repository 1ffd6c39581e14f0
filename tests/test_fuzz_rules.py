"""Property-based tests of the rules loader: mutated ``rules.yaml`` documents load or fail clearly.

``receiver.rules.parse_rules`` (with the real action validators) gets the shipped file, a document
using every action and operator, and the README's examples, mutated at the byte, line and structure
level, plus hostile documents (alias bombs, recursive aliases, deep nesting, unsafe tags, values no
constructor accepts). The properties: the only exception is ``RulesError`` with located problems;
nothing takes long; and a rule set that loads can be matched against every real CVAT capture
without raising (what loads, runs). Deterministic for CI: ``derandomize=True``, no example database.
"""

from __future__ import annotations

import json
import random
import time
from datetime import UTC, datetime

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.events import parse_event
from receiver.rules import Previous, RulesError, RuleSet, match, parse_rules
from tests.conftest import PAYLOADS, ROOT

EXAMPLES = {"text": 400, "structure": 300}
"""Examples per property (a parse takes a few milliseconds)."""

SLOW = 5.0
"""Seconds any single load may take (generous, for a loaded CI machine): an alias bomb or a deep
document must be refused, not worked through for minutes."""

RICH = """
version: 1
rules:
  - id: send-to-review
    description: every action and operator, once
    on: [update:job, "completed:request[export:*]"]
    if:
      all:
        - job.state: {became: completed}
        - job.stage: {in: [annotation, validation]}
        - any:
            - job.assignee.username: {regex: "^a"}
            - not: {job.id: {lt: 0}}
        - job.task_name: {exists: true}
        - job.id: {gte: 1, lte: 1000000}
    do:
      - action: update_job
        stage: validation
        state: new
        assignee: [alice, bob, carol]
      - action: notify
        url: https://hooks.example.com/services/T/B/X?token=abc
        format: teams
        text: "Job {job_id} of task {task_id} is {job.state} ({{literal}})"
        headers: {Authorization: "Bearer x"}
        timeout: 5
      - action: export
        resource: task
        kind: dataset
        format: COCO 1.0
        to: s3://datasets/{project_id}/task-{task_id}.zip
        require_all_jobs: {stage: acceptance, state: completed}
      - action: check_labels
        require: [car, person, {name: vehicle, type: rectangle, attributes: [color]}]
        on_mismatch: add_missing
    retry: {attempts: 4, backoff: [1, 2.5, 60]}
  - id: backups
    on: update:project
    if: {project.name: {not_equals: scratch}, project.id: {not_in: [1, 2]}}
    do:
      - {action: export, resource: project, kind: backup, lightweight: true, to: "cvat-cloud://3/p-{project_id}.zip"}
"""


def readme_rules() -> list[str]:
    """The README's YAML examples of rules, each made a whole document."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    docs = []
    for block in blocks:
        if block.lstrip().startswith("- id:"):
            body = "\n".join("  " + line for line in block.splitlines())
            docs.append("version: 1\nrules:\n" + body + "\n")
        elif "rules:" in block:
            docs.append(block)
    return docs


SEEDS = [(ROOT / "rules.yaml").read_text(), RICH, *readme_rules()]


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed-{i}" for i in range(len(SEEDS))])
def test_every_seed_loads(seed: str) -> None:
    """The mutations start from valid files: a seed the loader refuses would only fuzz its first error."""
    assert parse_rules(seed).rules


def load_events() -> list:  # type: ignore[type-arg]
    events = []
    for path in sorted((PAYLOADS / "cvat-2.73").glob("*.json")):
        events.append(parse_event(json.loads(path.read_text())["body_raw"].encode()))
    return events


EVENTS = load_events()
NOW = datetime(2026, 11, 22, 17, 40, tzinfo=UTC)


def load_or_fail_clearly(text: str | bytes) -> RuleSet | None:
    """The property: a RuleSet that every real event can be matched against, or a located RulesError."""
    started = time.monotonic()
    try:
        ruleset = parse_rules(text)
    except RulesError as exc:
        assert exc.problems and all(p.message for p in exc.problems)
        assert str(exc)
        ruleset = None
    assert time.monotonic() - started < SLOW, "a load must never take long"
    if ruleset is not None:
        for event in EVENTS:
            for previous in (None, Previous(event.resource, {"state": "new", "stage": "annotation"}, "last-seen")):
                match(ruleset, event, previous, NOW)
    return ruleset


def fuzz_settings(name: str) -> settings:
    return settings(max_examples=EXAMPLES[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- text mutations --------------------------------------------------------------------------------

TOKENS = ["{", "}", "[", "]", ":", "- ", "&a ", "*a", "!!python/object:os.system ", "!!binary ", "!!set ",
          "<<: *a", "? ", "|", ">", "'", '"', "#", "\t", "\n", "---\n", "...\n", "%YAML 1.1\n", "~", "null",
          "yes", "on", "0x1F", "1e999", "9" * 5000, "2001-13-45", ".nan", "-.inf", "{job_id}", "{{", "{a.__class__}",
          "\u0000", "\ufeff", "\U0001f600", "action: notify", "action: export", "on: update:*", "if:", "do:",
          "retry: {attempts: -1}", "version: 2", "id: x", "id: X Y"]


def mutate_text(text: str, ops: list[tuple[int, int]]) -> str | bytes:
    """Line and character level mutations; a few produce bytes that are not UTF-8."""
    for op, seed in ops:
        rng = random.Random(seed)
        lines = text.splitlines(keepends=True) or [""]
        at = rng.randrange(len(text) + 1)
        if op == 0:  # drop a line
            del lines[rng.randrange(len(lines))]
            text = "".join(lines)
        elif op == 1:  # duplicate a line
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            text = "".join(lines)
        elif op == 2:  # swap two lines
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
        elif op == 3:  # re-indent a line
            i = rng.randrange(len(lines))
            lines[i] = " " * rng.choice([0, 1, 3, 8]) + lines[i].lstrip(" ")
            text = "".join(lines)
        elif op == 4:  # insert a token
            text = text[:at] + rng.choice(TOKENS) + text[at:]
        elif op == 5:  # delete characters
            text = text[:at] + text[at + rng.randrange(1, 20):]
        elif op == 6:  # truncate
            text = text[:at]
        elif op == 7:  # replace a scalar after a colon
            colon = text.find(": ", at)
            if colon >= 0:
                end = text.find("\n", colon)
                end = len(text) if end < 0 else end
                text = text[:colon + 2] + rng.choice(TOKENS).strip() + text[end:]
        elif op == 8:  # random printable noise
            text = text[:at] + "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 6))) + text[at:]
        else:  # bytes that are not UTF-8
            raw = text.encode()
            return raw[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]) + raw[at:]
    return text


@fuzz_settings("text")
@given(seed=st.sampled_from(SEEDS), ops=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 1 << 30)),
                                                 min_size=1, max_size=4))
def test_text_mutations_load_or_fail_clearly(seed: str, ops: list[tuple[int, int]]) -> None:
    """Lines dropped, doubled, swapped or re-indented, tokens and noise inserted, bytes broken:
    a rule set or a located RulesError, never another exception."""
    load_or_fail_clearly(mutate_text(seed, ops))


# -- structure mutations --------------------------------------------------------------------------


def random_value(rng: random.Random, depth: int = 0):  # type: ignore[no-untyped-def]
    """Something YAML can hold: every scalar type, odd strings, small lists and mappings."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 3, 2 ** 63, 10 ** 40, rng.randrange(-100, 100)])
    if kind == 2:
        return rng.choice([0.5, -0.0, 1e308, float("inf"), float("nan")])
    if kind in (3, 4, 5):
        return rng.choice(["", "update:job", "update:*", "x" * 300, "{job_id}", "{a.b.0}", "{bad!r}", "{", "}}",
                           "completed", "CVAT for images 1.1", "exports/{task_id}.zip", "../../etc/passwd",
                           "s3://b/k", "http://127.0.0.1/", "notify", "export", "in", "regex", "(", "became",
                           "\u00e9", "\U0001f600", "\x00", "a" * 3, "car", "ping"])
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["id", "on", "if", "do", "retry", "action", "attempts", "backoff", "all", "any", "not", "equals", "in",
            "regex", "became", "changed", "was", "exists", "gt", "to", "format", "text", "url", "job.state", 1, None]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def mutate_structure(seed_text: str, ops: list[tuple[int, int]]) -> str:
    """Change, drop or add a value at a random path of the parsed document, then dump it again."""
    doc = yaml.safe_load(seed_text)
    for op, seed in ops:
        rng = random.Random(seed)
        node, parent, key = doc, None, None
        while isinstance(node, dict | list) and node and rng.random() < 0.75:
            parent = node
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            node = node[key]
        if parent is None:
            doc = random_value(rng) if op == 0 else doc
            continue
        if op == 0 or op == 1:
            parent[key] = random_value(rng)
        elif op == 2 and isinstance(parent, dict):
            del parent[key]
        elif op == 2:
            parent.pop(key)
        elif isinstance(parent, dict):
            parent[random_value(rng, 3) if rng.random() < 0.2 else rng.choice(["extra", "on", "if", "do"])] = \
                random_value(rng)
        else:
            parent.append(random_value(rng))
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@fuzz_settings("structure")
@given(seed=st.sampled_from(SEEDS), ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 30)),
                                                 min_size=1, max_size=4))
def test_structure_mutations_load_or_fail_clearly(seed: str, ops: list[tuple[int, int]]) -> None:
    """Values replaced by any YAML value, keys dropped or added anywhere in the document: a rule set
    that every real event can be matched against, or a located RulesError."""
    load_or_fail_clearly(mutate_structure(seed, ops))


# -- hostile documents -------------------------------------------------------------------------------

BOMB = "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10))
ACTION = "rules:\n  - id: r\n    on: update:job\n    do:\n      - action: notify\n        url: http://x/\n"
NOTIFY_HI = "    do: [{action: notify, url: 'http://x/', text: hi}]\n"
HOSTILE = [
    # (id, document)
    ("alias-bomb-in-text", "version: 1\na0: &a0 [lol]\n" + BOMB + ACTION + "        text: *a9\n"),
    ("alias-bomb-in-headers",
     "version: 1\na0: &a0 {k: v}\n" + BOMB + ACTION + "        text: hi\n        headers: *a9\n"),
    ("alias-bomb-in-condition",
     "version: 1\na0: &a0 [x]\n" + BOMB + ACTION.replace("    do:", "    if: {job.state: {in: *a9}}\n    do:")
     + "        text: hi\n"),
    ("recursive-alias", "version: 1\nrules: &r [*r]\n"),
    ("recursive-alias-in-params", "version: 1\n" + ACTION + "        text: hi\n        headers: &h {x: *h}\n"),
    ("deep-flow-list", "version: 1\nrules: " + "[" * 1000 + "]" * 1000 + "\n"),
    ("deep-block-mapping", "version: 1\nrules:\n" + "".join(" " * i + "a:\n" for i in range(1, 1500))),
    ("deep-but-parseable",
     "version: 1\nrules:\n  - id: r\n    on: update:job\n    if: " + "{not: " * 150 + "{job.id: 1}" + "}" * 150
     + "\n" + NOTIFY_HI),
    ("huge-int", "version: 1\nrules: []\nx: " + "9" * 5000 + "\n"),
    ("bad-timestamp", "version: 1\nrules: []\nwhen: 2001-13-45\n"),
    ("python-tag", "version: 1\nrules: !!python/object/apply:os.system [echo hi]\n"),
    ("binary-garbage", "version: 1\nrules: []\nx: !!binary '%%%'\n"),
    ("unknown-tag", "version: 1\nrules: !custom [1]\n"),
    ("two-documents", "version: 1\nrules: []\n---\nversion: 1\nrules: []\n"),
    ("not-utf8", b"version: 1\nrules: []\n# \xff\xfe\n"),
    ("nul", "version: 1\nrules: []\n\x00\n"),
    ("tabs", "version: 1\nrules:\n\t- id: r\n"),
    ("merge-of-scalar", "version: 1\nrules:\n  - <<: 5\n    id: r\n"),
    ("huge-string-key", "version: 1\n" + "k" * 100_000 + ": 1\nrules: []\n"),
    ("many-rules", "version: 1\nrules:\n" + "".join(f"  - id: r{i}\n    on: ping\n" + NOTIFY_HI for i in range(300))),
]


@pytest.mark.parametrize("document", [h[1] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_documents_are_refused_quickly_or_loaded(document: str | bytes) -> None:
    """Alias bombs, recursive aliases, deep nesting, unsafe tags, unreadable values: a RulesError (or,
    for the merely large, a rule set) within seconds, never another exception or a hang."""
    load_or_fail_clearly(document)


@pytest.mark.parametrize("name", ["alias-bomb-in-text", "recursive-alias", "deep-flow-list", "huge-int"],
                         ids=["alias-bomb", "recursive-alias", "deep-nesting", "huge-int"])
def test_hostile_documents_say_what_is_wrong(name: str) -> None:
    """The refusal of a hostile document is a YAML error naming the file, not a traceback."""
    document = dict(HOSTILE)[name]
    with pytest.raises(RulesError) as caught:
        parse_rules(document, "hostile.yaml")
    assert str(caught.value).startswith("hostile.yaml"), str(caught.value)
    assert "YAML error" in str(caught.value)


def test_anchors_and_merges_of_real_size_still_work() -> None:
    """The alias guard leaves ordinary anchors alone: shared retry and parameters load and render."""
    # Top-level keys other than version/rules are refused, so anchors live on the first use.
    ruleset = parse_rules("""
version: 1
rules:
  - id: a
    on: update:job
    do:
      - &notify {action: notify, url: "http://hooks.example.com/x", format: slack, text: "job {job_id}"}
    retry: &retry {attempts: 2, backoff: [1, 5]}
  - id: b
    on: update:job
    do: [*notify, {<<: *notify, timeout: 5}]
    retry: *retry
""")
    assert [r.id for r in ruleset.rules] == ["a", "b"]
    [event] = [e for e in EVENTS if e.name == "update:job"][:1]
    matches = match(ruleset, event, None, NOW)
    texts = [a.params["text"] for m in matches for a in m.actions]
    assert texts == [f"job {event.ids['job_id']}"] * 3
    assert [a.params.get("timeout") for m in matches for a in m.actions] == [None, None, 5]
    assert all(a.retry.backoff == (1, 5) for m in matches for a in m.actions)
