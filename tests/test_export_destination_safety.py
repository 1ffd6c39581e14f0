"""Export destinations never leave the storage roots nor replace the service's own files, whatever
the payload renders into them (percent-encoded, ``..`` segments, symlinks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import PermanentError
from core.settings import WorkerSettings
from receiver.rules.templating import render_params
from workers.storage import LocalDestination, Storage, parse_destination

# Task names a payload may carry, each a way to climb out once storage percent-decodes file:// URLs.
HOSTILE_NAMES = [
    ("encoded-slash", "..%2F..%2Fwebhook-secrets"),
    ("encoded-dots", "%2e%2e%2fwebhook-secrets"),
    ("upper-case-escapes", "%2E%2E%2Fwebhook-secrets"),
    ("double-encoded", "..%252F..%252Fwebhook-secrets"),
    ("encoded-backslash", "..%5C..%5Cwebhook-secrets"),
    ("plain-dotdot", "../../webhook-secrets"),
    ("encoded-nul", "x%00/../../webhook-secrets"),
]


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    """Settings with a data directory holding a secrets file, and an extra root ``archive``."""
    monkeypatch.delenv("CVAT_HOOKS_SECRET_FILE", raising=False)
    monkeypatch.delenv("CVAT_HOOKS_RULES", raising=False)
    data = tmp_path / "data"
    (data / "exports" / "a").mkdir(parents=True)
    (data / "webhook-secrets").write_text("s3cret\n")
    (tmp_path / "archive").mkdir()
    return WorkerSettings(data_dir=data, storage_roots=(tmp_path / "archive",))


def _render_to(template: str, name: str) -> str:
    """The ``to`` parameter as the dispatcher renders it (payload values made path-safe)."""
    return render_params({"to": template}, {"task": {"name": name}}, path_params={"to"})["to"]


@pytest.mark.parametrize("template", ["file://exports/a/{task.name}.zip", "exports/a/{task.name}.zip",
                                      "file://{task.name}", "file://exports/{task.name}/x.zip"],
                         ids=["file-url", "bare-path", "file-url-whole-name", "file-url-directory"])
@pytest.mark.parametrize("name", [n for _, n in HOSTILE_NAMES], ids=[i for i, _ in HOSTILE_NAMES])
def test_payload_values_stay_in_their_directory_after_decoding(template: str, name: str,
                                                               cfg: WorkerSettings) -> None:
    """A payload value rendered into a destination cannot climb out of its directory once decoded."""
    dest = parse_destination(_render_to(template, name), cfg)
    assert isinstance(dest, LocalDestination)
    prefix = template.removeprefix("file://").split("{", 1)[0]
    expected_dir = (cfg.data_dir / prefix).resolve() if prefix else cfg.data_dir.resolve()
    assert dest.path.is_relative_to(expected_dir)
    assert dest.path != (cfg.data_dir / "webhook-secrets").resolve()


@pytest.mark.parametrize("url", [
    "file://webhook-secrets", "file://exports/..%2Fwebhook-secrets", "file://exports/%2E%2E/webhook-secrets",
    "webhook-secret", "webhook-secrets", "journal/journal.log", "file://journal%2Fjournal.log",
    "journal-123.draining", "redis.rdb", "redis.rdb.settings", "appendonly.aof",
    "appendonlydir/appendonly.aof.1.incr.aof", "dump.rdb", "tmp/x.zip", ".webhook-secrets.abc.tmp",
], ids=lambda u: u)
def test_the_services_own_files_are_never_a_destination(url: str, cfg: WorkerSettings) -> None:
    """Secrets, journal, embedded Redis and staging files in the data directory are refused by name."""
    with pytest.raises(PermanentError, match="service's own files"):
        parse_destination(url, cfg)


def test_symlink_to_a_service_file_is_refused(cfg: WorkerSettings) -> None:
    """A link inside a root that points at the secrets file is judged by where it points."""
    (cfg.data_dir / "exports" / "link.zip").symlink_to(cfg.data_dir / "webhook-secrets")
    with pytest.raises(PermanentError, match="service's own files"):
        parse_destination("exports/link.zip", cfg)


def test_secret_and_rules_files_named_in_the_environment_are_refused_in_any_root(
        cfg: WorkerSettings, tmp_path: Path) -> None:
    """CVAT_HOOKS_SECRET_FILE and the rules file are protected even inside an extra storage root."""
    env = {"CVAT_HOOKS_DATA_DIR": str(cfg.data_dir), "CVAT_HOOKS_STORAGE_ROOTS": ",".join(map(str, cfg.storage_roots)),
           "CVAT_HOOKS_SECRET_FILE": str(tmp_path / "archive" / "my-secrets"),
           "CVAT_HOOKS_RULES": str(tmp_path / "archive" / "rules.yaml")}
    cfg = WorkerSettings.from_env(env)
    for name in ("my-secrets", "rules.yaml"):
        with pytest.raises(PermanentError, match="service's own files"):
            parse_destination((tmp_path / "archive" / name).as_uri(), cfg)
    assert parse_destination((tmp_path / "archive" / "ok.zip").as_uri(), cfg)


def test_staging_rechecks_a_directory_swapped_for_a_link_to_the_data_dir(cfg: WorkerSettings) -> None:
    """A directory replaced after parsing by a link into the service's files is refused at staging."""
    dest = parse_destination("exports/b/webhook-secrets", cfg)
    assert isinstance(dest, LocalDestination)
    (cfg.data_dir / "exports" / "b").symlink_to(cfg.data_dir)
    with pytest.raises(PermanentError, match="service's own files"), Storage(cfg).staging(dest):
        pass


@pytest.mark.parametrize("url", [
    "s3://bucket/exports/../other/x.zip", "s3://bucket/exports/%2e%2e/x.zip", "s3://bucket/../bucket2/x",
    "s3://bucket/a/./x.zip", "s3://bucket/a/%252e%252e/x.zip", "s3://bucket/a/%2E%2E%2Fx.zip",
    "s3://bucket/a\\..\\x.zip", "s3://bucket/a/%0ax.zip",
    "cvat-cloud://3/../x.zip", "cvat-cloud://3/a/%2e%2e/x.zip", "cvat-cloud://3//etc/x.zip",
    "cvat-cloud://3/%2Fetc/x.zip",
], ids=lambda u: u)
def test_object_keys_are_checked_after_decoding(url: str, cfg: WorkerSettings) -> None:
    """S3 keys and CVAT cloud paths with (encoded) dot segments, separators or controls are refused."""
    with pytest.raises(PermanentError):
        parse_destination(url, cfg)


@pytest.mark.parametrize("template", ["s3://bucket/exports/{task.name}.zip",
                                      "cvat-cloud://3/exports/{task.name}.zip"], ids=["s3", "cvat-cloud"])
@pytest.mark.parametrize("name", ["..", "%2e%2e", "..%2F..%2Fx", "a/../../b"],
                         ids=["dots", "enc", "enc-slash", "slash"])
def test_payload_values_in_object_keys_stay_one_segment(template: str, name: str, cfg: WorkerSettings) -> None:
    """A payload value rendered into an S3 key or cloud path stays one harmless segment."""
    dest = parse_destination(_render_to(template, name), cfg)
    assert "/" not in dest.uri.rsplit("/exports/", 1)[1]
