"""Settings are read once per process and handed on: to every command of the CLI, to every job of a
worker, to the receiver gunicorn forks. Each test sets a bad variable in the environment: anything
that read it again would fail on it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from core import settings as core_settings
from operations.cli import main
from receiver import settings as receiver_settings
from receiver.settings import Settings
from receiver.signature import sign
from tests.conftest import ROOT, SECRET, post, signed

PAYLOAD = ROOT / "examples" / "payloads" / "update_job_completed.json"


@pytest.fixture
def bad_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment no settings can be read from."""
    monkeypatch.setenv("CVAT_HOOKS_MAX_BODY", "one megabyte")


@pytest.fixture
def handed_over(settings: Settings) -> Iterator[Settings]:
    """``settings`` handed over as a worker's start does, forgotten afterwards."""
    from workers import jobs

    receiver_settings.use_process_settings(settings)
    jobs.runtime.cache_clear()
    yield settings
    receiver_settings.use_process_settings(None)
    jobs.runtime.cache_clear()


def test_commands_use_the_settings_the_group_read(settings: Settings, bad_environment: None) -> None:
    """`rules test` and `sign` take the rules, service account and secret from the group's settings."""
    ours = replace(settings, workers=replace(settings.workers, cvat=replace(settings.workers.cvat,
                                                                             service_account="hooks-bot")))
    tested = CliRunner().invoke(main, ["rules", "test", str(PAYLOAD), "--json"], obj=ours)
    assert tested.exit_code == 0, tested.output
    assert json.loads(tested.output)["service_account"] == "hooks-bot"
    signature = CliRunner().invoke(main, ["sign", str(PAYLOAD)], obj=ours)
    assert signature.exit_code == 0, signature.output
    assert signature.output.strip().endswith(sign(PAYLOAD.read_bytes(), SECRET))


def test_the_group_reads_the_environment_when_given_nothing(bad_environment: None) -> None:
    """Without settings handed in, the group is where they are read (and refused here)."""
    result = CliRunner().invoke(main, ["rules", "check", str(ROOT / "rules.yaml")])
    assert result.exit_code == 1
    assert "CVAT_HOOKS_MAX_BODY" in result.output


def test_jobs_use_the_settings_of_the_workers_start(handed_over: Settings, bad_environment: None) -> None:
    """A worker's jobs share the settings its start read, not a parse of their own."""
    from workers import jobs

    assert core_settings.process_settings() is handed_over.workers
    assert jobs.runtime().settings is handed_over.workers
    assert jobs.runtime() is jobs.runtime()


def test_forgotten_settings_are_read_from_the_environment(bad_environment: None) -> None:
    """Without a start that handed settings over (a test, a benchmark), the environment is read."""
    with pytest.raises(ValueError, match="CVAT_HOOKS_MAX_BODY"):
        receiver_settings.process_settings()
    assert core_settings.process_settings().retention_days == 30


@pytest.mark.parametrize("job", ["operations.reconcile.scheduled_run", "operations.worker_start.learn_now"])
def test_operations_jobs_use_the_settings_of_the_workers_start(handed_over: Settings, bad_environment: None,
                                                               job: str) -> None:
    """The periodic reconcile and the state-learning job run with the worker's settings (here: no CVAT)."""
    import importlib

    module, name = job.rsplit(".", 1)
    assert not handed_over.workers.cvat.configured
    assert getattr(importlib.import_module(module), name)() == {"skipped": "CVAT is not configured"}


def test_the_receiver_uses_the_settings_gunicorns_logger_read(handed_over: Settings, bad_environment: None) -> None:
    """create_app() with no settings (gunicorn's call) builds on those read at the master's start."""
    from receiver.app import create_app

    client = create_app().test_client()
    body = PAYLOAD.read_bytes()
    answer = post(client, body, signed(body))
    assert answer.status_code == 202, answer.get_data(as_text=True)


def test_aws_variables_are_read_with_the_settings(tmp_path: Path) -> None:
    """The AWS_* variables boto3 reads are kept, sorted, beside the settings; none: an empty tuple."""
    env = {"CVAT_HOOKS_DATA_DIR": str(tmp_path), "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
           "AWS_ACCESS_KEY_ID": "k", "HOME": "/root"}
    assert Settings.from_env(env).workers.aws_environment == (("AWS_ACCESS_KEY_ID", "k"),
                                                               ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"))
    assert core_settings.WorkerSettings.from_env({}).aws_environment == ()
    assert core_settings.WorkerSettings().aws_environment is None
