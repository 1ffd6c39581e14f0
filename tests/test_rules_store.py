"""Hot reload: new rules replace old ones only when they are valid; a bad start fails loudly."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from receiver.rules import RulesError, RuleStore, load_rules
from tests.procs import wait_for


def fake_validate(name: str, params: Mapping[str, Any]) -> list[str]:
    """Knows the four actions (their modules belong to the workers)."""
    return [] if name in ("export", "check_labels", "notify", "update_job") else [f"unknown action {name!r}"]


def rules_text(*ids: str) -> str:
    """A valid rules file with one notify rule per id."""
    body = "".join(f"  - id: {i}\n    on: update:job\n    do:\n      - action: notify\n        url: http://x\n"
                   for i in ids)
    return f"version: 1\nrules:\n{body}"


BAD = "version: 1\nrules:\n  - id: broken\n    on: update:job\n    do: []\n"


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str, *, tick: int) -> None:
    """Write the file and give it a distinct mtime (filesystems may not tick between two writes)."""
    path.write_text(text)
    stamp = 1_700_000_000_000_000_000 + tick * 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def make_store(path: Path, clock: Clock | None = None) -> RuleStore:
    """A store over ``path`` with the fake action validator."""
    loader = functools.partial(load_rules, validate_action=fake_validate)
    return RuleStore(path, loader=loader, clock=clock or Clock())


@pytest.mark.parametrize("content", [BAD, None, "version: [\n"],
                         ids=["invalid", "missing-file", "yaml-error"])
def test_initial_load_fails_loudly(tmp_path: Path, content: str | None) -> None:
    """A store cannot start on rules that do not load."""
    path = tmp_path / "rules.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(RulesError):
        make_store(path)


@pytest.mark.parametrize(("new", "reloaded", "ids"), [
    (rules_text("a", "b"), True, ["a", "b"]),
    (BAD, False, ["a"]),
    ("version: 1\nrules: [\n", False, ["a"]),
    (None, False, ["a"]),
], ids=["valid-replaces", "invalid-keeps", "yaml-error-keeps", "deleted-keeps"])
def test_reload(tmp_path: Path, new: str | None, reloaded: bool, ids: list[str]) -> None:
    """``reload`` installs valid rules and keeps the previous ones when the new file is unusable."""
    path = tmp_path / "rules.yaml"
    write(path, rules_text("a"), tick=0)
    store = make_store(path)
    if new is None:
        path.unlink()
    else:
        write(path, new, tick=1)
    assert store.check() is reloaded
    assert [r.id for r in store.current.rules] == ids


def test_failed_reload_is_logged_with_the_problems(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A failed reload logs, under the store's logger, that the previous rules are kept and why."""
    path = tmp_path / "rules.yaml"
    write(path, rules_text("a"), tick=0)
    store = make_store(path)
    write(path, BAD, tick=1)
    with caplog.at_level(logging.ERROR, logger="receiver.rules.store"):
        store.check()
    [record] = [r for r in caplog.records if r.name == "receiver.rules.store" and r.levelno >= logging.ERROR]
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith(f"rules {path}: reload failed, keeping 1 previous rule(s) (version ")
    assert "'do' must be a non-empty list" in record.getMessage()


def test_maybe_reload_checks_at_most_once_a_second(tmp_path: Path) -> None:
    """A change is noticed on the first check after the interval, not before, and only once."""
    path = tmp_path / "rules.yaml"
    write(path, rules_text("a"), tick=0)
    clock = Clock()
    store = make_store(path, clock)
    write(path, rules_text("b"), tick=1)
    clock.now += 0.5
    assert store.maybe_reload() is False
    assert [r.id for r in store.current.rules] == ["a"]
    clock.now += 0.6
    assert store.maybe_reload() is True
    assert [r.id for r in store.current.rules] == ["b"]
    clock.now += 5
    assert store.maybe_reload() is False


def test_maybe_reload_tries_a_bad_file_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An unchanged bad file is not re-read every second (one log line per bad version)."""
    path = tmp_path / "rules.yaml"
    write(path, rules_text("a"), tick=0)
    clock = Clock()
    store = make_store(path, clock)
    write(path, BAD, tick=1)
    with caplog.at_level(logging.ERROR, logger="receiver.rules.store"):
        for _ in range(3):
            clock.now += 2
            assert store.maybe_reload() is False
    assert len([r for r in caplog.records if "reload failed" in r.getMessage()]) == 1
    write(path, rules_text("c"), tick=2)
    clock.now += 2
    assert store.maybe_reload() is True
    assert [r.id for r in store.current.rules] == ["c"]


def kept_store(path: Path, directory: Path, redis: Any = None) -> RuleStore:
    """A store that keeps its last good rules in ``directory`` (and Redis), as the receiver's does."""
    from receiver.rules.store import LastGoodRules

    loader = functools.partial(load_rules, validate_action=fake_validate)
    return RuleStore(path, loader=loader, clock=Clock(), last_good=LastGoodRules(directory, redis))


@pytest.mark.parametrize("broken", [BAD, None, "version: [\n", "\xff\xfe"],
                         ids=["invalid", "deleted", "yaml-error", "not-utf8"])
def test_a_store_started_on_a_bad_file_uses_the_last_good_rules(tmp_path: Path, broken: str | None) -> None:
    """A new store (a restarted worker) on a refused file starts with the last rules that loaded, and says so."""
    path = tmp_path / "rules.yaml"
    write(path, rules_text("a", "b"), tick=0)
    kept_store(path, tmp_path / "data")
    if broken is None:
        path.unlink()
    else:
        write(path, broken, tick=1)
    store = kept_store(path, tmp_path / "data")
    assert [r.id for r in store.current.rules] == ["a", "b"]
    assert store.usable and store.problem and "last good" in store.problem


def test_the_last_good_rules_follow_successful_reloads_only(tmp_path: Path) -> None:
    """A reload that succeeds updates the kept copy; one that fails does not."""
    path = tmp_path / "rules.yaml"
    write(path, rules_text("a"), tick=0)
    store = kept_store(path, tmp_path / "data")
    write(path, rules_text("c"), tick=1)
    assert store.check() and store.problem is None
    write(path, BAD, tick=2)
    assert not store.check() and store.problem
    assert [r.id for r in kept_store(path, tmp_path / "data").current.rules] == ["c"]


def test_a_new_pod_takes_the_last_good_rules_from_redis(tmp_path: Path, redis: Any) -> None:
    """With an empty data volume (a new pod), the copy kept in Redis is used."""
    path = tmp_path / "rules.yaml"
    write(path, rules_text("r"), tick=0)
    kept_store(path, tmp_path / "pod-1", redis)
    write(path, BAD, tick=1)
    store = kept_store(path, tmp_path / "pod-2", redis)
    assert [r.id for r in store.current.rules] == ["r"] and store.usable


def test_no_good_rules_at_all_starts_empty_and_not_usable(tmp_path: Path) -> None:
    """Never any good rules: the store starts (a worker must boot) with none, unusable, saying why."""
    path = tmp_path / "rules.yaml"
    write(path, BAD, tick=0)
    store = kept_store(path, tmp_path / "data")
    assert store.current.rules == () and not store.usable
    assert store.problem and "no last good rules" in store.problem
    write(path, rules_text("fixed"), tick=1)
    assert store.check() and store.usable and store.problem is None


def test_readyz_says_why_rules_are_missing_or_stale(settings: Any, rules_file: Path) -> None:
    """/readyz: 503 with the reason without good rules; 200 naming the refused file with last good ones."""
    from dataclasses import replace

    from receiver.app import create_app

    good = rules_file.read_text()
    rules_file.write_text(BAD)
    fresh = replace(settings, workers=replace(settings.workers, data_dir=settings.data_dir / "fresh"))
    answer = create_app(fresh).test_client().get("/readyz")
    assert answer.status_code == 503 and "no last good rules" in answer.json["checks"]["rules"]
    rules_file.write_text(good)
    create_app(settings)  # loads them: kept
    rules_file.write_text(BAD)
    answer = create_app(settings).test_client().get("/readyz")
    assert answer.status_code == 200 and "refused" in answer.json["checks"]["rules"]


# -- noticed when it happens, logged once, shown everywhere (issue 18, item 7) --------------------------


def test_the_watcher_applies_and_refuses_edits_without_any_request(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The watcher thread refuses a bad edit at once (ERROR with file:line) and logs a good one (version, count)."""
    path = tmp_path / "rules.yaml"
    write(path, rules_text("a"), tick=0)
    store = make_store(path)
    store.watch(interval=0.05)
    try:
        with caplog.at_level(logging.INFO, logger="receiver.rules.store"):
            write(path, BAD, tick=1)
            assert wait_for(lambda: store.last_error is not None)
            [refused] = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert f"{path}:5: rule 'broken'" in refused.getMessage()
            status = store.status()
            assert status["reload_failed"] and status["rule_count"] == 1
            assert status["last_reload_error"]["message"].startswith(f"{path}:5:")
            write(path, rules_text("a", "b"), tick=2)
            assert wait_for(lambda: store.last_error is None)
        [good] = [r for r in caplog.records if "reloaded" in r.getMessage()]
        assert good.levelno == logging.INFO
        assert f"version {store.current.digest[:12]}, 2 rule(s)" in good.getMessage()
        assert store.status()["version"] == store.current.digest[:12] and not store.status()["reload_failed"]
    finally:
        store.stop_watching()


def test_one_process_logs_a_reload_at_its_level_the_others_at_debug(tmp_path: Path, redis: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Stores sharing a Redis (gunicorn workers) all reload, but one ERROR and one INFO line are logged in all."""
    path = tmp_path / "rules.yaml"
    write(path, rules_text("a"), tick=0)
    stores = [kept_store(path, tmp_path / "data", redis) for _ in range(3)]
    with caplog.at_level(logging.DEBUG, logger="receiver.rules.store"):
        write(path, BAD, tick=1)
        assert [s.check() for s in stores] == [False] * 3
        write(path, rules_text("a", "c"), tick=2)
        assert [s.check() for s in stores] == [True] * 3
    refused = [r for r in caplog.records if "reload failed" in r.getMessage()]
    loaded = [r for r in caplog.records if "reloaded" in r.getMessage()]
    assert sorted(r.levelno for r in refused) == [logging.DEBUG, logging.DEBUG, logging.ERROR]
    assert sorted(r.levelno for r in loaded) == [logging.DEBUG, logging.DEBUG, logging.INFO]
    assert all(s.status()["rule_count"] == 2 for s in stores)


def test_a_refused_edit_shows_in_readyz_api_and_metrics_before_any_delivery(settings: Any,
                                                                           rules_file: Path) -> None:
    """/readyz stays 200 (last good rules serve) with a failing rules check; /api/rules and /metrics say so too."""
    from receiver.app import create_app
    from tests.conftest import with_settings

    token = "rules-status-admin-token-0123456789abcdef"
    client = create_app(with_settings(settings, admin_token=token)).test_client()
    ready = client.get("/readyz").json
    assert ready["failing"] == [] and ready["rules"]["reload_failed"] is False
    good = rules_file.read_text()
    rules_file.write_text(good + "  - id: broken\n    on: update:job\n    do: []\n")
    assert wait_for(lambda: client.get("/readyz").json["failing"] == ["rules"], timeout=5)
    answer = client.get("/readyz")
    assert answer.status_code == 200 and answer.json["status"] == "ready"
    assert answer.json["checks"]["rules"].startswith("failing: ")
    error = answer.json["rules"]["last_reload_error"]
    assert f"{rules_file}:" in error["message"] and "broken" in error["message"]
    api = client.get("/api/rules", headers={"Authorization": f"Bearer {token}"}).json
    assert api["status"]["reload_failed"] and api["status"]["version"] == answer.json["rules"]["version"]
    text = client.get("/metrics").get_data(as_text=True)
    assert "cvat_hooks_rules_reload_failed 1.0" in text
    assert f'cvat_hooks_rules_info{{source="{rules_file}",version="{api["status"]["version"]}"}} 1.0' in text
    rules_file.write_text(good + "\n")
    assert wait_for(lambda: client.get("/readyz").json["failing"] == [], timeout=5)
    assert "cvat_hooks_rules_reload_failed 0.0" in client.get("/metrics").get_data(as_text=True)
