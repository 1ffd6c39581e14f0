"""The Redis key schema (``core.keys``): every key keeps the exact name deployments already store data
under, every module takes its keys from there, and no module spells a ``cvat-hooks:`` key itself."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import core.keys as keys
from core.contract import ActionCall

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "receiver", "workers", "operations")
SCHEMA = ROOT / "core" / "keys.py"

PINNED = {
    # A changed value here orphans data in every existing deployment: add a key, never rename one.
    "PREFIX": "cvat-hooks",
    "DELIVERIES_KEY": "cvat-hooks:deliveries",
    "DELIVERY_KEY": "cvat-hooks:delivery:{}",
    "DELIVERY_TIMELINE_KEY": "cvat-hooks:delivery:{}:timeline",
    "SEEN_KEY": "cvat-hooks:seen:{}",
    "STATE_KEY": "cvat-hooks:state:{resource}:{id}",
    "STATE_SYNC_KEY": "cvat-hooks:state-sync:{resource}",
    "HISTORY_KEY": "cvat-hooks:history:",
    "METRIC_COUNTERS_KEY": "cvat-hooks:metrics:counters",
    "METRIC_HISTOGRAMS_KEY": "cvat-hooks:metrics:buckets",
    "SERVICE_ACCOUNT_KEY": "cvat-hooks:service-account",
    "ADMIN_FAILURES_KEY": "cvat-hooks:admin:failures:",
    "BULK_REPLAY_KEY": "cvat-hooks:bulk-replay:",
    "RULES_ANNOUNCED_KEY": "cvat-hooks:rules:announced:",
    "RULES_LAST_GOOD_KEY": "cvat-hooks:rules:last-good",
    "DEPLOYMENT_KEY": "cvat-hooks:deployment",
    "WEBHOOKS_KEY": "cvat-hooks:webhooks",
    "RECONCILE_RUNS_KEY": "cvat-hooks:reconcile:runs",
    "RECONCILE_TRIES_KEY": "cvat-hooks:reconcile:tries:{}",
    "RECONCILE_WATERMARK_KEY": "cvat-hooks:reconcile:watermark:{}",
    "RECONCILE_LOCK_KEY": "cvat-hooks:reconcile:lock",
    "RECONCILE_SCHEDULE_LOCK_KEY": "cvat-hooks:reconcile:schedule-lock",
    "RECONCILE_JOB_ID": "cvat-hooks-reconcile",
    "LEARN_STATES_JOB_ID": "cvat-hooks-learn-states",
    "ACTION_CALL_KEY": "cvat-hooks:{kind}:{delivery_id}:{rule_id}:{index}:{run}",
    "ROUND_ROBIN_KEY": "cvat-hooks:rr:{rule_id}:{digest}",
    "EXPORT_DONE_KEY": "cvat-hooks:export-done:",
    "ANNOTATE_DONE_KEY": "cvat-hooks:annotate-done:",
    "IMPORT_DONE_KEY": "cvat-hooks:import-done:",
}

JOB_IDS = ("RECONCILE_JOB_ID", "LEARN_STATES_JOB_ID")
"""Fixed RQ job ids: RQ stores them under its own keys, so they are namespaced with ``-``, not ``:``."""


def _schema_names() -> set[str]:
    """The public string constants ``core.keys`` defines."""
    return {name for name, value in vars(keys).items() if name.isupper() and isinstance(value, str)}


def test_every_key_of_the_schema_is_pinned() -> None:
    """A key added to core.keys without a pin here (or a pin left for a key removed) fails."""
    assert _schema_names() == set(PINNED)


@pytest.mark.parametrize(("name", "literal"), PINNED.items(), ids=list(PINNED))
def test_key_keeps_its_name(name: str, literal: str) -> None:
    """Each key's value is byte for byte the name existing deployments store their data under."""
    assert getattr(keys, name) == literal


def test_keys_are_distinct_and_namespaced() -> None:
    """No two keys share a name, and each lives under the cvat-hooks namespace (``:`` keys, ``-`` job ids)."""
    values = [getattr(keys, name) for name in _schema_names() - {"PREFIX"}]
    assert len(values) == len(set(values))
    for name in _schema_names() - {"PREFIX"}:
        separator = "-" if name in JOB_IDS else ":"
        assert getattr(keys, name).startswith(keys.PREFIX + separator), name


def _users() -> list[tuple[str, str, str]]:
    """(module, attribute, schema name): the names the owning modules have always exported."""
    return [
        ("core.delivery_log", "INDEX_KEY", "DELIVERIES_KEY"),
        ("core.receipts", "SEEN_KEY", "SEEN_KEY"),
        ("core.state", "KEY", "STATE_KEY"),
        ("operations.state_sync", "SYNC_KEY", "STATE_SYNC_KEY"),
        ("core.history", "KEY", "HISTORY_KEY"),
        ("core.metrics", "COUNTERS_KEY", "METRIC_COUNTERS_KEY"),
        ("core.metrics", "HISTOGRAMS_KEY", "METRIC_HISTOGRAMS_KEY"),
        ("core.service_account", "KEY", "SERVICE_ACCOUNT_KEY"),
        ("receiver.admin.auth", "FAILURE_KEY", "ADMIN_FAILURES_KEY"),
        ("receiver.bulk_replay", "PROGRESS_KEY", "BULK_REPLAY_KEY"),
        ("receiver.rules.store", "ANNOUNCED_KEY", "RULES_ANNOUNCED_KEY"),
        ("operations.webhook_registry", "DEPLOYMENT_KEY", "DEPLOYMENT_KEY"),
        ("operations.webhook_registry", "WEBHOOKS_KEY", "WEBHOOKS_KEY"),
        ("operations.reconcile", "RUNS_KEY", "RECONCILE_RUNS_KEY"),
        ("operations.reconcile", "TRIES_KEY", "RECONCILE_TRIES_KEY"),
        ("operations.reconcile", "WATERMARK_KEY", "RECONCILE_WATERMARK_KEY"),
        ("operations.reconcile", "LOCK_KEY", "RECONCILE_LOCK_KEY"),
        ("operations.reconcile", "SCHEDULE_LOCK", "RECONCILE_SCHEDULE_LOCK_KEY"),
        ("operations.reconcile", "JOB_ID", "RECONCILE_JOB_ID"),
        ("operations.worker_start", "LEARN_JOB_ID", "LEARN_STATES_JOB_ID"),
        ("workers.actions.export", "MARKER_PREFIX", "EXPORT_DONE_KEY"),
        ("workers.actions.auto_annotate", "MARKER_PREFIX", "ANNOTATE_DONE_KEY"),
        ("workers.actions.import_annotations", "MARKER_PREFIX", "IMPORT_DONE_KEY"),
    ]


@pytest.mark.parametrize(("module", "attribute", "name"), _users(), ids=[f"{m}.{a}" for m, a, _ in _users()])
def test_owner_takes_its_key_from_the_schema(module: str, attribute: str, name: str) -> None:
    """The owning module's old name is the schema's very object, not a copy spelled again."""
    import importlib

    assert getattr(importlib.import_module(module), attribute) is getattr(keys, name)


def test_last_good_rules_key_comes_from_the_schema() -> None:
    """The rules store's class attribute is the schema's key."""
    from receiver.rules.store import LastGoodRules

    assert LastGoodRules.KEY is keys.RULES_LAST_GOOD_KEY


def test_built_keys_keep_their_names() -> None:
    """Keys built per delivery, call and list come out exactly as before the schema moved."""
    from core.delivery_log import record_key, timeline_key
    from workers.actions._params import call_key
    from workers.actions.update_job import round_robin_key

    call = ActionCall("d1", "rule-1", 2, "update_job", {}, {}, run=3)
    assert record_key("d1") == "cvat-hooks:delivery:d1"
    assert timeline_key("d1") == "cvat-hooks:delivery:d1:timeline"
    assert call_key("rr-choice", call) == "cvat-hooks:rr-choice:d1:rule-1:2:3"
    assert round_robin_key("rule-1", ["a", "b"]) == "cvat-hooks:rr:rule-1:3554d2b8a1e34099"


KEY_LITERAL = re.compile(r"cvat-hooks:(?!\s)")
"""A Redis key literal: the namespace and a colon, not followed by a space (``"cvat-hooks: <note>"``
is prose, as are ``cvat-hooks-journal``, the User-Agent and ``cvat-hooks-version`` S3 metadata)."""


def spelled_keys(source: str) -> list[tuple[int, str]]:
    """(line, what) for each Redis key a module spells itself instead of taking it from core.keys."""
    tree = ast.parse(source)
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    job_ids = {getattr(keys, name) for name in JOB_IDS}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in docstrings:
            value = node.value.decode("utf-8", "replace") if isinstance(node.value, bytes) else node.value
            if isinstance(value, str) and (KEY_LITERAL.match(value) or value in job_ids):
                found.append((node.lineno, repr(value)))
        elif isinstance(node, ast.ImportFrom) and node.module == "core.keys":
            found += [(node.lineno, "imports core.keys.PREFIX") for alias in node.names if alias.name == "PREFIX"]
        elif isinstance(node, ast.Attribute) and node.attr == "PREFIX" and \
                isinstance(node.value, ast.Name) and node.value.id == "keys":
            found.append((node.lineno, "uses keys.PREFIX"))
    return found


@pytest.mark.parametrize(("source", "count"), [
    ('KEY = "cvat-hooks:seen:{}"', 1),  # a key template
    ('P = "cvat-hooks:"', 1),  # a bare namespace prefix
    ('k = f"cvat-hooks:rr:{rule}"', 1),  # a key built in an f-string
    ('k = b"cvat-hooks:metrics:counters"', 1),  # a key as bytes
    ('JOB = "cvat-hooks-reconcile"', 1),  # a fixed RQ job id
    ("from core.keys import PREFIX", 1),  # building keys elsewhere from the namespace
    ("from core import keys\nk = keys.PREFIX + ':x'", 1),  # the same, through the module
    ("from core.keys import SEEN_KEY", 0),  # taking a key from the schema
    ('NOTE = "cvat-hooks: this failure is recorded"', 0),  # prose after the name
    ('t = Thread(name="cvat-hooks-journal")', 0),  # a thread name, not a key
    ('s = Serializer(salt="cvat-hooks-ui-flash")', 0),  # the UI flash salt
    ('"""Hashes under cvat-hooks:history:<hour>."""', 0),  # a docstring naming a key
    ('def f():\n    """cvat-hooks:seen:<id> marks it."""', 0),  # a function docstring starting with a key
], ids=["template", "prefix", "fstring", "bytes", "job-id", "prefix-import", "prefix-attribute", "schema-import",
        "prose", "thread-name", "salt", "module-docstring", "function-docstring"])
def test_spelled_keys_finds_key_literals_only(source: str, count: int) -> None:
    """The scan below flags Redis key literals and namespace use, and leaves prose and other names alone."""
    assert len(spelled_keys(source)) == count


def test_no_module_spells_a_key_outside_the_schema() -> None:
    """Every ``cvat-hooks:`` key in core, receiver, workers and operations comes from core.keys."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == SCHEMA:
                continue
            found += [f"{path.relative_to(ROOT)}:{line}: {what}"
                      for line, what in spelled_keys(path.read_text(encoding="utf-8"))]
    assert found == [], "define these in core/keys.py and import them:\n" + "\n".join(found)
