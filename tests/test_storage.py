"""Storage: destination parsing and containment, atomic local writes, S3 uploads against moto's server."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

from core.errors import ErrorKind, PermanentError, classify
from core.settings import WorkerSettings
from tests.conftest import free_port
from tests.moto_s3 import bucket, s3_endpoint, use_endpoint
from workers.storage import (
    STALE_SECONDS,
    TMP_DIR,
    VERSION_METADATA,
    CloudDestination,
    LocalDestination,
    S3Destination,
    Storage,
    parse_destination,
    shared_s3_client,
    warm_up,
)

MB = 1024 * 1024


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def cfg(data_dir: Path, tmp_path: Path) -> WorkerSettings:
    """Worker settings whose storage roots are ``data`` and the extra root ``archive``."""
    extra = tmp_path / "archive"
    extra.mkdir()
    return WorkerSettings(data_dir=data_dir, storage_roots=(extra,))


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with s3_endpoint() as url:
        yield url


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, tmp_path: Path) -> str:
    use_endpoint(monkeypatch, moto_endpoint, tmp_path)
    return moto_endpoint


# -- parsing -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "expected"), [
    ("exports/a.zip", "data/exports/a.zip"),  # bare relative: under the data directory
    ("file://exports/a.zip", "data/exports/a.zip"),  # file:// without a third slash: relative too
    ("exports/x/../a.zip", "data/exports/a.zip"),  # ".." that stays inside is fine
    ("ABS/data/deep/a.zip", "data/deep/a.zip"),  # absolute, inside the data directory
    ("file://ABS/archive/a%20b.zip", "archive/a b.zip"),  # file:///abs, percent-decoded, extra root
], ids=["relative", "file-relative", "dotdot-inside", "absolute", "file-absolute-extra-root"])
def test_local_destinations_resolve_inside_roots(url: str, expected: str, cfg: WorkerSettings,
                                                 tmp_path: Path) -> None:
    """Bare paths and file:// URLs resolve against the data directory or an extra root."""
    dest = parse_destination(url.replace("ABS", str(tmp_path)), cfg)
    assert isinstance(dest, LocalDestination)
    assert dest.path == (tmp_path / expected).resolve()
    assert dest.uri == dest.path.as_uri()


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://my-bucket/exports/task 2.zip", S3Destination("my-bucket", "exports/task 2.zip")),
    ("S3://b.example/k", S3Destination("b.example", "k")),  # the scheme is case-insensitive
    ("cvat-cloud://3/exports/a.zip", CloudDestination(3, "exports/a.zip")),
], ids=["s3", "s3-uppercase-scheme", "cvat-cloud"])
def test_remote_destinations(url: str, expected: object, cfg: WorkerSettings) -> None:
    """s3:// and cvat-cloud:// URLs become their destination values."""
    assert parse_destination(url, cfg) == expected


@pytest.mark.parametrize(("url", "message"), [
    ("", "non-empty"),
    ("exports/", "names a directory"),
    ("exports/..", "names a directory"),
    ("http://example.com/a.zip", "unsupported scheme 'http'"),
    ("s3://bucket-only", "expected s3://bucket/key"),
    ("s3://bucket/dir/", "expected s3://bucket/key"),
    ("s3://Bad_Bucket/k", "not a valid S3 bucket name"),
    ("cvat-cloud://one/a.zip", "the id a number"),
    ("cvat-cloud://3", "expected cvat-cloud://"),
    ("a\x00b", "NUL"),
], ids=["empty", "trailing-slash", "dotdot-name", "http", "s3-no-key", "s3-prefix", "s3-bad-bucket",
        "cloud-id-not-number", "cloud-no-path", "nul"])
def test_malformed_destinations_are_refused(url: str, message: str) -> None:
    """Shapes that name no file, or an unknown scheme, fail with a message saying what is wrong."""
    with pytest.raises(PermanentError, match=message):
        parse_destination(url)


@pytest.mark.parametrize("url", [
    "../outside.zip",
    "exports/../../outside.zip",
    "ABS/elsewhere/a.zip",
    "file://ABS/elsewhere/a.zip",
    "ABS/data",  # the root itself is not a file inside it
], ids=["dotdot", "nested-dotdot", "absolute-outside", "file-absolute-outside", "root-itself"])
def test_escapes_are_refused_naming_the_roots(url: str, cfg: WorkerSettings, tmp_path: Path) -> None:
    """A path resolving outside every root fails permanently, and the message names the roots."""
    with pytest.raises(PermanentError, match="outside the storage roots") as caught:
        parse_destination(url.replace("ABS", str(tmp_path)), cfg)
    assert str(cfg.data_dir.resolve()) in str(caught.value)
    assert str((tmp_path / "archive").resolve()) in str(caught.value)


def test_symlink_escape_is_refused(cfg: WorkerSettings, data_dir: Path, tmp_path: Path) -> None:
    """A symlink inside the data directory pointing outside it does not let a write out."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (data_dir / "link").symlink_to(outside)
    with pytest.raises(PermanentError, match="outside the storage roots"):
        parse_destination("link/a.zip", cfg)


def test_symlink_inside_roots_is_followed(cfg: WorkerSettings, data_dir: Path, tmp_path: Path) -> None:
    """A symlink from the data directory into an extra root is judged by its target, and allowed."""
    (data_dir / "to-archive").symlink_to(tmp_path / "archive")
    dest = parse_destination("to-archive/a.zip", cfg)
    assert dest == LocalDestination((tmp_path / "archive" / "a.zip").resolve())


def test_shape_only_parsing_skips_the_roots() -> None:
    """Without cfg (rules load time) a local path is only checked for shape, as written."""
    assert parse_destination("/anywhere/{task_id}.zip") == LocalDestination(Path("/anywhere/{task_id}.zip"))
    assert parse_destination("s3://{bucket}/k") == S3Destination("{bucket}", "k")


# -- local writes ------------------------------------------------------------------------------

def test_local_commit_is_atomic(cfg: WorkerSettings, data_dir: Path) -> None:
    """The file is written under another name in the same directory and appears whole at commit."""
    storage = Storage(cfg)
    dest = storage.parse("exports/2026/task-2.zip")
    assert isinstance(dest, LocalDestination)
    with storage.staging(dest) as staged:
        assert staged.path.parent == dest.path.parent  # same directory: the rename is atomic
        assert staged.path.parent.is_dir()  # parents were created
        assert staged.path != dest.path and not staged.path.exists()
        staged.path.write_bytes(b"half")
        assert not dest.path.exists()  # a reader sees nothing yet
        with staged.path.open("ab") as f:
            f.write(b" and the rest")
        assert not dest.path.exists()
        result = storage.commit(staged)
    assert dest.path.read_bytes() == b"half and the rest"
    assert result == {"uri": dest.path.as_uri(), "size": 17, "path": str(dest.path)}
    assert os.listdir(dest.path.parent) == ["task-2.zip"]  # no staging file left


def test_local_commit_replaces_an_older_file_in_one_step(cfg: WorkerSettings, data_dir: Path) -> None:
    """Until the commit, readers keep seeing the previous version, never a mix."""
    storage = Storage(cfg)
    dest = storage.parse("a.zip")
    assert isinstance(dest, LocalDestination)
    dest.path.write_bytes(b"old version")
    with storage.staging(dest) as staged:
        staged.path.write_bytes(b"new")
        assert dest.path.read_bytes() == b"old version"
        storage.commit(staged)
    assert dest.path.read_bytes() == b"new"


def test_failed_download_leaves_nothing_behind(cfg: WorkerSettings, data_dir: Path) -> None:
    """An error before the commit removes the staging file and never creates the final one."""
    storage = Storage(cfg)
    dest = storage.parse("exports/a.zip")
    assert isinstance(dest, LocalDestination)
    with pytest.raises(RuntimeError, match="download broke"), storage.staging(dest) as staged:
        staged.path.write_bytes(b"partial")
        raise RuntimeError("download broke")
    assert not dest.path.exists()
    assert os.listdir(dest.path.parent) == []


def test_commit_without_a_file_fails_permanently(cfg: WorkerSettings) -> None:
    """A gateway that wrote nothing is an error, not an empty export."""
    storage = Storage(cfg)
    dest = storage.parse("a.zip")
    assert isinstance(dest, LocalDestination)
    with pytest.raises(PermanentError, match="produced no file"), storage.staging(dest) as staged:
        storage.commit(staged)


def test_stale_staging_files_are_swept(cfg: WorkerSettings, data_dir: Path) -> None:
    """Orphans of killed workers older than STALE_SECONDS go; a fresh one (maybe in use) stays."""
    storage = Storage(cfg)
    dest = storage.parse("a.zip")
    assert isinstance(dest, LocalDestination)
    old, fresh = data_dir / ".a.zip.0123456789abcdef.part", data_dir / ".a.zip.fedcba9876543210.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    stale = time.time() - STALE_SECONDS - 60
    os.utime(old, (stale, stale))
    with storage.staging(dest):
        pass
    assert not old.exists() and fresh.exists()


def test_directory_swapped_for_symlink_after_parsing_is_refused(cfg: WorkerSettings, data_dir: Path,
                                                                  tmp_path: Path) -> None:
    """Containment is checked again when staging, so a swap after parsing cannot redirect the write."""
    storage = Storage(cfg)
    dest = storage.parse("exports/a.zip")
    assert isinstance(dest, LocalDestination)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (data_dir / "exports").symlink_to(outside)
    with pytest.raises(PermanentError, match="outside the storage roots"), storage.staging(dest):
        pass
    assert os.listdir(outside) == []


# -- S3 ----------------------------------------------------------------------------------------

@pytest.fixture
def s3_storage(s3_env: str, cfg: WorkerSettings) -> Iterator[Storage]:
    """A Storage whose multipart threshold is 5 MB (S3's smallest part), closed after the test."""
    with Storage(cfg, transfer_config=TransferConfig(multipart_threshold=5 * MB,
                                                     multipart_chunksize=5 * MB)) as storage:
        yield storage


def upload(storage: Storage, url: str, content: bytes, version: str | None = None) -> dict[str, object]:
    """Stage ``content`` for an S3 URL and commit it."""
    dest = storage.parse(url)
    assert isinstance(dest, S3Destination)
    with storage.staging(dest) as staged:
        staged.path.write_bytes(content)
        return storage.commit(staged, version=version)


def test_s3_multipart_upload_streams_from_disk(s3_storage: Storage, data_dir: Path) -> None:
    """A file above the multipart threshold is uploaded in parts, with its version in the metadata."""
    content = os.urandom(256) * (12 * MB // 256)
    with bucket("exports-multipart") as client:
        dest = s3_storage.parse("s3://exports-multipart/tasks/2/annotations.zip")
        assert isinstance(dest, S3Destination)
        with s3_storage.staging(dest) as staged:
            assert staged.path.parent == data_dir / TMP_DIR
            staged.path.write_bytes(content)
            result = s3_storage.commit(staged, version="v1")
        obj = client.get_object(Bucket="exports-multipart", Key="tasks/2/annotations.zip")
        body = obj["Body"].read()
    assert result == {"uri": "s3://exports-multipart/tasks/2/annotations.zip", "size": len(content)}
    assert os.listdir(data_dir / TMP_DIR) == []
    assert body == content
    assert obj["Metadata"] == {VERSION_METADATA: "v1"}
    assert obj["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MB: a multipart upload's ETag


def test_s3_existing_version_reads_the_object_metadata(s3_storage: Storage) -> None:
    """The bucket answers whether it already holds a version: same version yes, other or absent no."""
    with bucket("exports-version"):
        dest = s3_storage.parse("s3://exports-version/a.zip")
        assert s3_storage.existing_version(dest, "v1") is None
        upload(s3_storage, "s3://exports-version/a.zip", b"12345", version="v1")
        assert s3_storage.existing_version(dest, "v1") == {"uri": "s3://exports-version/a.zip", "size": 5}
        assert s3_storage.existing_version(dest, "v2") is None


def test_s3_missing_bucket_fails_permanently(s3_storage: Storage) -> None:
    """S3 refusing the upload (no such bucket) is permanent, named by its code and status."""
    expected = r"s3://no-such-bucket/a.zip: upload failed: NoSuchBucket \(HTTP 404\)"
    with pytest.raises(PermanentError, match=expected):
        upload(s3_storage, "s3://no-such-bucket/a.zip", b"x", version="v1")


def test_s3_without_credentials_fails_permanently(s3_storage: Storage,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS credentials at all is a configuration problem, reported as such."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(PermanentError, match="no usable AWS credentials"):
        upload(s3_storage, "s3://exports/a.zip", b"x")


def test_s3_unreachable_endpoint_is_transient(cfg: WorkerSettings, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """A connection refused by the endpoint is worth a retry."""
    port = free_port()  # nobody listens on it once its socket is closed
    use_endpoint(monkeypatch, f"http://127.0.0.1:{port}", tmp_path)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with Storage(cfg) as storage, pytest.raises(Exception) as caught:  # noqa: B017 - classify decides
        upload(storage, "s3://exports/a.zip", b"x")
    assert classify(caught.value) is ErrorKind.TRANSIENT


# -- the shared S3 client ------------------------------------------------------------------------

def aws_now() -> tuple[tuple[str, str], ...]:
    """The ``AWS_*`` variables of the environment now, as a worker's start reads them."""
    aws = WorkerSettings.from_env(os.environ).aws_environment
    assert aws is not None
    return aws


def as_read_at_start(cfg: WorkerSettings) -> WorkerSettings:
    """``cfg`` as a worker's start reads it: with the ``AWS_*`` variables of the environment now."""
    return replace(cfg, aws_environment=aws_now())


def test_s3_client_is_shared_by_the_process_and_kept_open(s3_env: str, cfg: WorkerSettings) -> None:
    """Every Storage of a process uses one S3 client (made once, not per export), and closing a
    Storage leaves it usable for the next export."""
    cfg = as_read_at_start(cfg)
    with Storage(cfg) as first:
        client = first.s3
    with bucket("exports-shared"), Storage(cfg) as second:
        assert second.s3 is client
        upload(second, "s3://exports-shared/a.zip", b"12345")
    assert shared_s3_client(aws_now()) is client


def test_s3_client_is_made_again_for_other_aws_settings(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client made under other credentials or another endpoint is not reused."""
    before = shared_s3_client(aws_now())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    rotated = aws_now()
    assert shared_s3_client(rotated) is not before
    assert shared_s3_client(rotated) is shared_s3_client(rotated)


def test_settings_not_read_from_an_environment_get_a_client_of_their_own(s3_env: str, cfg: WorkerSettings) -> None:
    """Hand-made settings say nothing of the AWS environment they would be used under, so each
    Storage of theirs makes a client of its own rather than take a shared one made under another."""
    shared = shared_s3_client(aws_now())
    with bucket("exports-own"), Storage(cfg) as storage:
        own = storage.s3
        assert own is not shared
        upload(storage, "s3://exports-own/a.zip", b"12345")
    with Storage(cfg) as again:
        assert again.s3 is not own


def test_warm_up_makes_the_shared_client_without_a_request(cfg: WorkerSettings, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """A worker's parent can make the client its children inherit while S3 is unreachable."""
    port = free_port()  # nobody listens on it once its socket is closed
    use_endpoint(monkeypatch, f"http://127.0.0.1:{port}", tmp_path)
    warm_up(aws_now())
    with Storage(as_read_at_start(cfg)) as storage:
        assert storage.s3 is shared_s3_client(aws_now())


def test_warm_up_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker starts even when no S3 client can be made; the export will say why."""
    import workers.storage as storage_module

    def broken() -> None:
        raise RuntimeError("no boto3 here")

    monkeypatch.setattr(storage_module, "_shared", None)
    monkeypatch.setattr(storage_module, "_default_s3_client", broken)
    warm_up()
    assert storage_module._shared is None
