"""Settings: every bad value is refused with the name of its variable and what it must be."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from core.settings import SettingError, WorkerSettings
from operations.cli import main
from receiver.settings import Settings

# (variable, a bad value): one row per variable a setting is converted or checked from.
BAD_VALUES = [
    ("CVAT_HOOKS_RETENTION_DAYS", "thirty"),  # not a number
    ("CVAT_HOOKS_RETENTION_DAYS", "0"),  # records would expire at once
    ("CVAT_HOOKS_CVAT_VERIFY_TLS", "ture"),  # a typo must not turn TLS checks off
    ("CVAT_HOOKS_CVAT_POLL_SECONDS", "fast"),
    ("CVAT_HOOKS_CVAT_POLL_SECONDS", "nan"),  # float() takes it, no pause can be
    ("CVAT_HOOKS_SERVICE_ACCOUNT", "two words"),
    ("CVAT_HOOKS_NOTIFY_TIMEOUT", "-1"),
    ("CVAT_HOOKS_RUN_DIRS", "relative/bin"),
    ("CVAT_HOOKS_WORKER_MAINTENANCE_SECONDS", "1.5"),  # RQ counts whole seconds
    ("CVAT_HOOKS_WORKER_MAX_RSS_MB", "512MB"),
    ("CVAT_HOOKS_WORKER_MAX_JOBS", "-3"),
    ("CVAT_HOOKS_LIGHT_PROCESSES", "0"),
    ("CVAT_HOOKS_RECONCILE_MINUTES", "abc"),
    ("CVAT_HOOKS_RECONCILE_MINUTES", "-5"),  # 0 turns it off; below that means nothing
    ("CVAT_HOOKS_INSECURE_NO_SIGNATURE", "maybe"),
    ("CVAT_HOOKS_MAX_BODY", "1MB"),
    ("CVAT_HOOKS_BODY_SECONDS", "inf"),
    ("CVAT_HOOKS_DEDUPE_DAYS", "a week"),
    ("CVAT_HOOKS_DEDUPE_DAYS", "0.000001"),  # less than a second: Redis would refuse the expiry
    ("CVAT_HOOKS_STATE_DAYS", "0"),
    ("CVAT_HOOKS_JOURNAL_MAX_BYTES", "256M"),
    ("CVAT_HOOKS_LOG_FORMAT", "yaml"),
    ("CVAT_HOOKS_LOG_LEVEL", "verbose"),
]
WORKER_VARIABLES = {"CVAT_HOOKS_RETENTION_DAYS", "CVAT_HOOKS_CVAT_VERIFY_TLS", "CVAT_HOOKS_CVAT_POLL_SECONDS",
                    "CVAT_HOOKS_SERVICE_ACCOUNT", "CVAT_HOOKS_NOTIFY_TIMEOUT", "CVAT_HOOKS_RUN_DIRS",
                    "CVAT_HOOKS_WORKER_MAINTENANCE_SECONDS", "CVAT_HOOKS_WORKER_MAX_RSS_MB",
                    "CVAT_HOOKS_WORKER_MAX_JOBS", "CVAT_HOOKS_LIGHT_PROCESSES"}


def ids(rows: list[tuple[str, str]]) -> list[str]:
    return [f"{name.removeprefix('CVAT_HOOKS_')}={value}" for name, value in rows]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES, ids=ids(BAD_VALUES))
def test_a_bad_value_names_its_variable(variable: str, value: str, tmp_path: Path) -> None:
    """The receiver's settings refuse the value with an error that starts with the variable's name."""
    with pytest.raises(SettingError) as caught:
        Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path), variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable} must be ")
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize(("variable", "value"), [r for r in BAD_VALUES if r[0] in WORKER_VARIABLES],
                         ids=ids([r for r in BAD_VALUES if r[0] in WORKER_VARIABLES]))
def test_a_bad_worker_value_names_its_variable(variable: str, value: str) -> None:
    """A worker, which reads only its own settings, refuses the value the same way."""
    with pytest.raises(SettingError, match=f"^{variable} must be "):
        WorkerSettings.from_env({variable: value})


def test_every_checked_variable_has_a_bad_value_row() -> None:
    """Each variable the settings modules convert or check is in the table above, so a new one
    cannot be added without its error being tested."""
    root = Path(__file__).resolve().parent.parent
    source = "".join((root / name).read_text() for name in ("core/settings.py", "receiver/settings.py"))
    readers = r"\b(?:whole_number|number|switch|_choice|_positive|_username|_days)"
    checked = set(re.findall(readers + r"\(env, \"([A-Z_]+)\"", source))
    checked |= set(re.findall(r"SettingError\(\"([A-Z_]+)\"", source))
    assert len(checked) > 15
    assert checked == {name for name, _ in BAD_VALUES}


# (variable, a value, what the setting becomes): accepted spellings, the edge of each range.
GOOD_VALUES: list[tuple[str, str, Callable[[Settings], Any], Any]] = [
    ("CVAT_HOOKS_RECONCILE_MINUTES", "0", lambda s: s.reconcile_minutes, 0.0),  # 0 turns it off
    ("CVAT_HOOKS_RECONCILE_MINUTES", " 0.05 ", lambda s: s.reconcile_minutes, 0.05),
    ("CVAT_HOOKS_CVAT_VERIFY_TLS", "Off", lambda s: s.workers.cvat.verify_tls, False),
    ("CVAT_HOOKS_CVAT_VERIFY_TLS", "", lambda s: s.workers.cvat.verify_tls, True),  # empty: the default
    ("CVAT_HOOKS_INSECURE_NO_SIGNATURE", "YES", lambda s: s.insecure_no_signature, True),
    ("CVAT_HOOKS_DEDUPE_DAYS", "0.5", lambda s: s.dedupe_seconds, 43200),
    ("CVAT_HOOKS_WORKER_MAX_JOBS", "0", lambda s: s.workers.recycle.max_jobs, 0),  # 0: never
    ("CVAT_HOOKS_LOG_FORMAT", "JSON", lambda s: s.log_format, "json"),
    ("CVAT_HOOKS_LOG_LEVEL", "Debug", lambda s: s.log_level, "debug"),
    ("CVAT_HOOKS_MAX_BODY", "1000", lambda s: s.max_body, 1000),
]


@pytest.mark.parametrize(("variable", "value", "read", "expected"), GOOD_VALUES,
                         ids=ids([(r[0], r[1]) for r in GOOD_VALUES]))
def test_good_values_are_read(variable: str, value: str, read: Callable[[Settings], Any], expected: Any,
                              tmp_path: Path) -> None:
    """Values at the edge of what a setting accepts are read, in any case and with spaces around."""
    assert read(Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path), variable: value})) == expected


def test_defaults_are_unchanged(tmp_path: Path) -> None:
    """With nothing set, the settings are the documented defaults."""
    settings = Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path)})
    assert (settings.reconcile_minutes, settings.max_body, settings.body_seconds, settings.dedupe_seconds,
            settings.state_seconds, settings.journal_max_bytes, settings.log_format, settings.log_level,
            settings.insecure_no_signature) == (5, 1024 * 1024, 10.0, 7 * 86400, 90 * 86400, 256 * 1024 * 1024,
                                                "text", "info", False)
    workers = settings.workers
    assert (workers.retention_days, workers.cvat.verify_tls, workers.cvat.status_check_period, workers.notify_timeout,
            workers.maintenance_seconds, workers.recycle.max_rss_mb, workers.recycle.max_jobs,
            workers.light_processes) == (30, True, 0.5, 10.0, 30, 512, 0, 2)


def test_a_settings_error_carries_no_secret(tmp_path: Path) -> None:
    """Only the bad value is quoted: the token, password and webhook secret set beside it are not."""
    env = {"CVAT_HOOKS_DATA_DIR": str(tmp_path), "CVAT_ACCESS_TOKEN": "tok-3f9a", "CVAT_PASSWORD": "pw-77c1",
           "CVAT_HOOKS_SECRET": "whs-0b2e", "CVAT_HOOKS_ADMIN_TOKEN": "adm-51d0", "CVAT_HOOKS_MAX_BODY": "big"}
    with pytest.raises(SettingError) as caught:
        Settings.from_env(env)
    assert not [s for s in ("tok-3f9a", "pw-77c1", "whs-0b2e", "adm-51d0") if s in str(caught.value)]


def test_a_long_bad_value_is_cut_short(tmp_path: Path) -> None:
    """A value pasted by mistake (a whole file) is quoted by its start only."""
    with pytest.raises(SettingError) as caught:
        Settings.from_env({"CVAT_HOOKS_DATA_DIR": str(tmp_path), "CVAT_HOOKS_LOG_LEVEL": "x" * 5000})
    assert len(str(caught.value)) < 200


def test_the_command_line_reports_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cvat-hooks` stops with the variable's name and exit status 1, before any command runs."""
    monkeypatch.setenv("CVAT_HOOKS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CVAT_HOOKS_RECONCILE_MINUTES", "abc")
    result = CliRunner().invoke(main, ["actions", "list"])
    assert result.exit_code == 1
    assert "configuration: CVAT_HOOKS_RECONCILE_MINUTES must be a number of minutes" in result.output


@pytest.mark.parametrize(("variable", "value", "command"), [
    ("CVAT_HOOKS_PORT", "eighty", ["serve"]),
    ("CVAT_HOOKS_HTTP_WORKERS", "two", ["serve"]),
    ("CVAT_HOOKS_WORKER_CLASS", "big", ["worker"]),
])
def test_a_bad_option_from_the_environment_names_its_variable(
        variable: str, value: str, command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options that also read a variable (``serve``'s port, ``worker``'s class) name the variable when
    its value is bad, and only the option when the bad value was typed on the command line."""
    monkeypatch.setenv("CVAT_HOOKS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2 and f"{variable}: '{value}'" in result.output, result.output
    monkeypatch.delenv(variable)
    option = {"CVAT_HOOKS_PORT": "--port", "CVAT_HOOKS_HTTP_WORKERS": "--workers",
              "CVAT_HOOKS_WORKER_CLASS": "--class"}[variable]
    typed = CliRunner().invoke(main, [*command, option, value])
    assert typed.exit_code == 2 and variable not in typed.output and f"'{value}'" in typed.output, typed.output
