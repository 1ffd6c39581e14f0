"""Where export results go: a local path, an S3-compatible bucket, or one of CVAT's cloud storages.

A destination is a URL (the export action's ``to``):

- a bare path or ``file://`` URL: relative to the data directory (``CVAT_HOOKS_DATA_DIR``) or absolute.
  It must resolve, after ``..`` and symlinks, inside the data directory or one of
  ``CVAT_HOOKS_STORAGE_ROOTS``: a rule, or a value rendered into it, must not be a way to overwrite
  any file the worker can reach. ``file:///abs/x.zip`` is absolute, ``file://exports/x.zip`` relative.
  A ``file://`` URL is percent-decoded first, and the decoded, resolved path is what is checked.
  Even inside a root, the service's own files are refused (:func:`service_files`: webhook secrets,
  the trial secret, the journal, the embedded Redis files, the staging directory, the rules file);
- ``s3://bucket/key``: any S3-compatible endpoint, through boto3, which reads the usual AWS settings
  itself (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
  ``~/.aws/config``). A key is taken literally, but one with a ``.`` or ``..`` segment (also once
  percent-decoded) or a control character is refused: proxies and S3-compatible servers that
  normalise paths would write it elsewhere;
- ``cvat-cloud://<cloud_storage_id>/path``: CVAT writes the file to one of its own cloud storages;
  nothing passes through the worker, so there is nothing to stage here (see ``CloudDestination``).
  Its path is checked like an S3 key, and may not start with ``/``.

Local and S3 results are downloaded to a staging file first and then committed in one step
(:meth:`Storage.staging`), so nobody ever sees half an export: locally the staging file sits in the
destination's own directory and is renamed over the final name (a rename is atomic only within one
file system); for S3 it sits in ``<data_dir>/tmp`` and is streamed to the bucket by boto3's managed
transfer (multipart above a threshold, read from disk in chunks, never loaded into memory).

boto3 is imported lazily: action modules import this one, and the receiver imports action modules.
"""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import unquote

from core.contract import JOB_TIMEOUT
from core.errors import TRANSIENT_STATUSES, PermanentError, TransientError
from core.settings import WorkerSettings

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

TMP_DIR = "tmp"
"""Staging directory for S3 uploads, under the data directory."""
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
"""Beside each staging file while its run lives: the run holds an ``flock`` on it (see ``_sweep_dead``)."""
STALE_SECONDS = 2 * JOB_TIMEOUT
"""Seconds after which a staging file is an orphan of a killed worker (RQ kills a job after
``JOB_TIMEOUT``) and may be swept."""
VERSION_METADATA = "cvat-hooks-version"
"""S3 object metadata key holding the export's version key (``x-amz-meta-cvat-hooks-version``)."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_MAX_NAME = 180
"""Characters of the final name kept in a staging file's name (file names stop at 255 bytes)."""


@dataclass(frozen=True)
class LocalDestination:
    path: Path
    """Absolute and resolved inside a storage root (as written when parsed for shape only)."""

    @property
    def uri(self) -> str:
        return self.path.as_uri() if self.path.is_absolute() else str(self.path)


@dataclass(frozen=True)
class S3Destination:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class CloudDestination:
    """A file CVAT writes itself (``ExportRequest.cloud_storage_id`` / ``cloud_filename``)."""

    cloud_storage_id: int
    filename: str

    @property
    def uri(self) -> str:
        return f"cvat-cloud://{self.cloud_storage_id}/{self.filename}"


Destination = LocalDestination | S3Destination | CloudDestination


def parse_destination(url: Any, settings: WorkerSettings | None = None) -> Destination:
    """The destination a ``to`` URL names (``PermanentError`` saying why if it names none).

    With ``settings=None`` only the scheme and shape are checked, as the receiver does when
    ``rules.yaml`` loads (placeholders are still in the URL then): a local path is kept as written
    and not checked against the storage roots.
    """
    if not isinstance(url, str) or not url.strip():
        raise PermanentError("destination must be a non-empty string")
    if "\x00" in url:
        raise PermanentError("destination contains a NUL character")
    match = _SCHEME.match(url)
    scheme = match[1].lower() if match else ""
    rest = url[match.end():] if match else url
    if scheme in ("", "file"):
        return _local(unquote(rest) if scheme else rest, url, settings)
    if scheme == "s3":
        return _s3(rest, url, shape_only=settings is None)
    if scheme == "cvat-cloud":
        return _cloud(rest, url)
    raise PermanentError(
        f"destination {url!r}: unsupported scheme {scheme!r} (use a path, file://, s3:// or cvat-cloud://)"
    )


Source = LocalDestination | S3Destination
"""Where an annotation file is read from (``import_annotations``' ``from``): the same URLs as a
destination, and the same checks, since a payload value rendered into it must not make the worker
read, and send to CVAT, a file outside its directory or one of the service's own files."""


def parse_source(url: Any, settings: WorkerSettings | None = None) -> Source:
    """The file a ``from`` URL names: a path, ``file://`` or ``s3://bucket/key``, checked exactly as
    :func:`parse_destination` checks a destination (roots, service files, ``..``, percent-decoding).
    ``cvat-cloud://`` is refused: nothing would pass through the worker to upload."""
    try:
        source = parse_destination(url, settings)
    except PermanentError as exc:
        message = str(exc)
        raise PermanentError("source" + message[len("destination"):] if message.startswith("destination")
                             else message) from None
    if isinstance(source, CloudDestination):
        raise PermanentError(f"source {url!r}: cvat-cloud:// cannot be read by the worker; use a path or s3://")
    return source


SERVICE_FILES = ("webhook-secret", "webhook-secrets", "journal", "redis.rdb", "appendonly", "dump.rdb",
                 "redis.socket", "redis.pid", TMP_DIR)
"""Names of what the service keeps in its data directory (``receiver.settings`` ``SECRET_FILE`` and
``SECRETS_FILE``, ``receiver.journal``, ``operations.serve``'s embedded Redis, our staging directory).
An export never writes an entry of the data directory whose name is one of these or starts with one
followed by ``.``, ``-`` or ``_`` (``redis.rdb.settings``, ``journal-<ns>.draining``,
``appendonly.aof``, ``appendonlydir``), nor anything inside such an entry."""


def service_files(settings: WorkerSettings) -> tuple[Path, ...]:
    """Files outside the data directory the service keeps, resolved (``WorkerSettings.protected_files``):
    they may sit inside a storage root."""
    return tuple(dict.fromkeys(Path(p).expanduser().resolve() for p in settings.protected_files))


def _is_service_name(name: str) -> bool:
    """Whether a data-directory entry is the service's (a leading ``.`` is ignored: temporary files
    such as ``.webhook-secrets.<random>.tmp`` become the real one by a rename)."""
    name = name.lstrip(".")
    if name.startswith(("appendonly", "redis.")):
        return True
    return any(name == own or (name.startswith(own) and name[len(own)] in ".-_") for own in SERVICE_FILES)


def _check_not_service_file(path: Path, url: str, settings: WorkerSettings) -> None:
    """Refuse a resolved destination that is, or is inside, one of the service's own files."""
    data_dir = Path(settings.data_dir).expanduser().resolve()
    own = path in service_files(settings)
    if not own and path.is_relative_to(data_dir) and path != data_dir:
        own = _is_service_name(path.relative_to(data_dir).parts[0])
    if own:
        raise PermanentError(f"destination {url!r} resolves to {path}, one of the service's own files "
                             "(secrets, journal, Redis data, rules): choose another name")


def storage_roots(settings: WorkerSettings) -> tuple[Path, ...]:
    """The resolved directories local destinations may be inside: the data directory first."""
    roots = (settings.data_dir, *settings.storage_roots)
    return tuple(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path != root and path.is_relative_to(root) for root in roots)


def _check_inside(path: Path, url: str, settings: WorkerSettings) -> None:
    roots = storage_roots(settings)
    if not _inside(path, roots):
        raise PermanentError(
            f"destination {url!r} resolves to {path}, outside the storage roots "
            f"({', '.join(str(r) for r in roots)}); write inside one of them, or add a root to "
            "CVAT_HOOKS_STORAGE_ROOTS"
        )


def _local(raw: str, url: str, settings: WorkerSettings | None) -> LocalDestination:
    if not raw:
        raise PermanentError(f"destination {url!r} names no file")
    if raw.endswith(("/", os.sep)) or Path(raw).name in ("", ".", ".."):
        raise PermanentError(f"destination {url!r} names a directory; end it with a file name")
    if settings is None:
        return LocalDestination(Path(raw))
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = settings.data_dir / path
    # resolve() follows every symlink that exists and collapses "..", so a link inside a root
    # that points elsewhere is judged by where it points.
    resolved = path.resolve()
    _check_inside(resolved, url, settings)
    _check_not_service_file(resolved, url, settings)
    if resolved.is_dir():
        raise PermanentError(f"destination {url!r} is an existing directory")
    return LocalDestination(resolved)


def _s3(rest: str, url: str, *, shape_only: bool) -> S3Destination:
    bucket, _, key = rest.partition("/")
    if not bucket or not key or key.endswith("/"):
        raise PermanentError(f"destination {url!r}: expected s3://bucket/key, with a key naming an object")
    if not (shape_only and _PLACEHOLDER.search(bucket)) and not _BUCKET.fullmatch(bucket):
        raise PermanentError(f"destination {url!r}: {bucket!r} is not a valid S3 bucket name")
    _check_object_path(key, url)
    return S3Destination(bucket, key)


def _fully_decoded(text: str) -> str:
    """``text`` percent-decoded until it no longer changes (``%252e`` is ``.`` after two rounds)."""
    for _ in range(10):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def _check_object_path(path: str, url: str) -> None:
    """Refuse an object key or cloud path that a server normalising paths would read elsewhere.

    Checked as written and fully percent-decoded: ``..`` or ``.`` segments (S3 path-style requests
    through a normalising proxy, or MinIO, would climb to another prefix or bucket), backslashes
    (a separator on some servers) and control characters.
    """
    for form in dict.fromkeys((path, _fully_decoded(path))):
        if any(not c.isprintable() for c in form):
            raise PermanentError(f"destination {url!r} contains a control character")
        if any(part in (".", "..") for part in form.replace("\\", "/").split("/")):
            raise PermanentError(f"destination {url!r}: '.' and '..' path segments are not allowed")
        if form.startswith("/") or "\\" in form:
            raise PermanentError(f"destination {url!r}: the path may not start with '/' or hold '\\'")


def _cloud(rest: str, url: str) -> CloudDestination:
    storage_id, _, filename = rest.partition("/")
    if not storage_id.isdigit() or not filename or filename.endswith("/"):
        raise PermanentError(
            f"destination {url!r}: expected cvat-cloud://<cloud storage id>/<path>, the id a number"
        )
    _check_object_path(filename, url)
    return CloudDestination(int(storage_id), filename)


@dataclass
class Staged:
    """A result on its way to a destination: write ``path`` (it does not exist yet), then commit."""

    destination: LocalDestination | S3Destination
    path: Path
    committed: bool = False


def _sweep(directory: Path, pattern: str) -> None:
    """Delete staging files left by killed workers (best effort: a failure here must not fail an export)."""
    cutoff = time.time() - STALE_SECONDS
    for name in glob.glob(os.path.join(glob.escape(str(directory)), pattern)):
        try:
            if os.stat(name).st_mtime < cutoff:
                os.unlink(name)
        except OSError:
            pass


def _sweep_dead(directory: Path, stem: str) -> None:
    """Delete the staging files of runs that died before cleaning up (a SIGKILLed or out-of-memory
    work-horse), so the retry that completes the export leaves one final file and nothing else.

    Each run holds an exclusive ``flock`` on its ``.lock`` file for as long as it stages; the kernel
    releases it when the process dies, whatever killed it. A lock we can take therefore belongs to
    no live run, here or in another container sharing the volume (``flock`` is per open file, not per
    PID). Best effort, like :func:`_sweep`.
    """
    pattern = os.path.join(glob.escape(str(directory)), glob.escape(stem) + "*" + LOCK_SUFFIX)
    for lock in glob.glob(pattern):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            base = lock[: -len(LOCK_SUFFIX)]
            for name in (base + PART_SUFFIX, lock):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
        except OSError:
            pass  # its run is alive (or the file went away): leave it
        finally:
            os.close(fd)


def _hold(lock: Path) -> int:
    """Create ``lock`` and hold an exclusive ``flock`` on it until the returned descriptor is closed."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory's own blocks)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform or file system; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Storage:
    """Stages and commits export files; one per action run.

    Its S3 client is the process's shared one (:func:`shared_s3_client`), taken on first use, unless
    ``s3_client_factory`` is given or the settings were not read from an environment
    (``WorkerSettings.aws_environment`` is ``None``): a client of its own then, closed by :meth:`close`.
    """

    def __init__(self, settings: WorkerSettings, *, transfer_config: TransferConfig | None = None,
                 s3_client_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.transfer_config = transfer_config
        """boto3 ``TransferConfig`` (multipart threshold, part size); :func:`_default_transfer_config`
        when ``None``."""
        self._s3_client_factory = s3_client_factory
        self._s3_client: Any = None
        self._own_client = False

    def parse(self, url: str) -> Destination:
        """:func:`parse_destination` with this worker's roots."""
        return parse_destination(url, self.settings)

    @property
    def s3(self) -> Any:
        """The boto3 S3 client, taken (or made) on first use."""
        if self._s3_client is None:
            aws_environment = self.settings.aws_environment
            if self._s3_client_factory is None and aws_environment is not None:
                self._s3_client = shared_s3_client(aws_environment)
            else:
                self._own_client = True
                self._s3_client = (self._s3_client_factory or _default_s3_client)()
        return self._s3_client

    def close(self) -> None:
        """Close our own S3 client's connections, if we made one; the shared client stays open for
        the next export of this process (its connections are kept alive for it)."""
        client, self._s3_client = self._s3_client, None
        if client is not None and self._own_client and hasattr(client, "close"):
            client.close()

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def staging(self, destination: LocalDestination | S3Destination) -> Iterator[Staged]:
        """A staging path for ``destination``; removed on the way out unless committed."""
        if isinstance(destination, LocalDestination):
            directory = destination.path.parent
            directory.mkdir(parents=True, exist_ok=True)
            # A directory swapped for a symlink since the destination was parsed must not redirect us.
            final = directory.resolve() / destination.path.name
            _check_inside(final, destination.uri, self.settings)
            _check_not_service_file(final.resolve(), destination.uri, self.settings)
            stem = f".{destination.path.name[:_MAX_NAME]}."
        else:
            directory = self.settings.data_dir / TMP_DIR
            directory.mkdir(parents=True, exist_ok=True)
            stem = f"{destination.key.rsplit('/', 1)[-1][:_MAX_NAME]}."
        _sweep(directory, glob.escape(stem) + "*" + PART_SUFFIX)
        _sweep_dead(directory, stem)
        # A name that does not exist yet: cvat-sdk refuses to download over an existing file.
        token = uuid.uuid4().hex[:16]
        staged = Staged(destination, directory / f"{stem}{token}{PART_SUFFIX}")
        lock = directory / f"{stem}{token}{LOCK_SUFFIX}"
        held = _hold(lock)
        try:
            yield staged
        finally:
            if not staged.committed:
                staged.path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            os.close(held)

    def commit(self, staged: Staged, *, version: str | None = None) -> dict[str, Any]:
        """Publish a staged file in one step; the result is ``{"uri", "size"}`` (+ ``"path"`` locally).

        ``version`` is stored in the S3 object's metadata, so a later run can tell the bucket
        already holds this version even if Redis lost its marker.
        """
        if staged.committed:
            raise RuntimeError(f"{staged.destination.uri} already committed")
        try:
            size = staged.path.stat().st_size
        except FileNotFoundError:
            raise PermanentError(f"{staged.destination.uri}: the export produced no file") from None
        dest = staged.destination
        if isinstance(dest, LocalDestination):
            with open(staged.path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(staged.path, dest.path)
            staged.committed = True
            _fsync_dir(dest.path.parent)
            return {"uri": dest.uri, "size": size, "path": str(dest.path)}
        extra = {"Metadata": {VERSION_METADATA: version}} if version else None
        try:
            self.s3.upload_file(str(staged.path), dest.bucket, dest.key, ExtraArgs=extra,
                                Config=self.transfer_config or _default_transfer_config())
        except Exception as exc:
            _raise_s3_error(exc, dest, "upload failed")
        staged.path.unlink(missing_ok=True)
        staged.committed = True
        return {"uri": dest.uri, "size": size}

    def parse_source(self, url: str) -> Source:
        """:func:`parse_source` with this worker's roots."""
        return parse_source(url, self.settings)

    @contextmanager
    def fetched(self, source: Source) -> Iterator[Path]:
        """A local file holding the source's bytes, under the source's own base name (CVAT picks a
        format's reader by extension): a local file is used where it is, after its checks are made
        again (a directory swapped for a symlink since parsing must not redirect the read); an S3
        object is downloaded into a private directory under ``<data_dir>/tmp``, removed afterwards."""
        if isinstance(source, LocalDestination):
            final = source.path.parent.resolve() / source.path.name
            _check_inside(final.resolve(), source.uri, self.settings)
            _check_not_service_file(final.resolve(), source.uri, self.settings)
            if not final.is_file():
                raise PermanentError(f"source {source.uri!r}: no such file")
            yield final.resolve()
            return
        directory = self.settings.data_dir / TMP_DIR
        directory.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix="import-", dir=directory))
        name = source.key.rsplit("/", 1)[-1][-_MAX_NAME:]
        target = private / name
        try:
            try:
                self.s3.download_file(source.bucket, source.key, str(target))
            except Exception as exc:
                _raise_s3_error(exc, source, "download failed")
            yield target
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def existing_version(self, destination: Destination, version: str) -> dict[str, Any] | None:
        """``{"uri", "size"}`` if the destination already holds this version (S3 metadata), else None.

        Only S3 objects carry a version; a local file or a CVAT cloud file is judged by the Redis
        marker alone. A HEAD refused with 403 (no ``s3:ListBucket`` makes a missing key look like
        that) is taken as "not there": the upload will tell whether we may write.
        """
        if not isinstance(destination, S3Destination):
            return None
        try:
            head = self.s3.head_object(Bucket=destination.bucket, Key=destination.key)
        except Exception as exc:
            if _client_error_status(exc) in (403, 404):
                return None
            _raise_s3_error(exc, destination, "cannot check the existing object")
        if (head.get("Metadata") or {}).get(VERSION_METADATA) != version:
            return None
        return {"uri": destination.uri, "size": head.get("ContentLength")}


UPLOAD_CONCURRENCY = 2
"""Parts uploaded at once. Each part is read from the staging file as it is sent, so an upload's
memory is about this many threads (their malloc arenas and connection buffers), whatever the file's
size: the upload step of a 100 MB export grew a work-horse's private memory by 13 MB with 4, 7 MB with
2, 2 MB with 1 (no threads). Two keep one part in flight while the next is read; against moto on two
cores, 200 MB uploaded as fast with 1, 2 or 4."""
PART_SIZE = 8 * 1024 * 1024
"""Bytes per multipart part (boto3's default; S3 allows at most 10,000 parts: 80 GB)."""


def _default_transfer_config() -> TransferConfig:
    """boto3's multipart settings with the memory of one upload bounded (see ``UPLOAD_CONCURRENCY``)."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                            max_concurrency=UPLOAD_CONCURRENCY)
    # Not a constructor argument of boto3's subclass, but an attribute of s3transfer's config; it
    # bounds the parts held in memory should a source ever be a stream rather than our staging file.
    config.max_in_memory_upload_chunks = UPLOAD_CONCURRENCY
    return config


_shared: tuple[tuple[tuple[str, str], ...], Any] | None = None
"""The process's S3 client, and the ``AWS_*`` environment it was made under."""


def shared_s3_client(aws_environment: tuple[tuple[str, str], ...] = ()) -> Any:
    """One boto3 S3 client per process, made again only for other ``AWS_*`` settings
    (``WorkerSettings.aws_environment``, read once at the worker's start; boto3 itself reads them).

    Making a client costs about 0.25 s and 25 MB (botocore parses the S3 model, endpoint rules and
    partitions, and builds a class of 100+ methods); its first request about 13 MB more. Made once per
    process, and by :func:`warm_up` in a forking worker's parent, every work-horse inherits it in
    shared pages instead of paying that per export. boto3 clients are thread-safe. A process that
    forks must not have sent requests with it (the children would share its pooled sockets).
    """
    global _shared
    if _shared is not None and _shared[0] == aws_environment:
        return _shared[1]
    previous, _shared = _shared, None
    if previous is not None:
        previous[1].close()
    client = _default_s3_client()
    _shared = (aws_environment, client)
    return client


def warm_up(aws_environment: tuple[tuple[str, str], ...] = ()) -> None:
    """Make the shared S3 client, and parse the models of the operations an export uses, sending nothing.

    For a forking worker's parent, before it forks (``workers.worker.preload``): the work-horses then
    start with the client in shared pages. bench/export.py, 500 MB to S3: the worker's PSS grew 41 MB
    without, 26 MB with, and the export started 0.3 s sooner; the parent pays about 15 MB and 0.25 s
    once. No S3 connection is opened, so none is inherited. Making a client
    resolves credentials: from the environment that is local; an instance or container role is
    fetched once here, and each work-horse refreshes its copy when it expires.
    Best effort: a failure (no boto3, no region) is logged, and exports make the client then.
    """
    try:
        model = shared_s3_client(aws_environment).meta.service_model
        for name in _WARM_UP_OPERATIONS:
            operation = model.operation_model(name)
            operation.input_shape, operation.output_shape  # noqa: B018 - parsed lazily, on access
    except Exception as exc:  # noqa: BLE001 - a worker must start without S3
        log.info("storage: S3 client not warmed up (%s)", type(exc).__name__)


_WARM_UP_OPERATIONS = ("HeadObject", "PutObject", "CreateMultipartUpload", "UploadPart",
                       "CompleteMultipartUpload", "AbortMultipartUpload")


def _default_s3_client() -> Any:
    """A boto3 S3 client configured the usual AWS way (environment, ``~/.aws``)."""
    import boto3  # type: ignore[import-untyped]  # lazily: see the module docstring

    return boto3.session.Session().client("s3")


def _client_error(exc: BaseException) -> Any:
    """The botocore ``ClientError`` behind an exception (boto3 wraps upload errors in
    ``S3UploadFailedError`` raised inside the ``except`` block, so it is the ``__context__``)."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        if hasattr(current, "response") and isinstance(getattr(current, "response", None), dict):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def _client_error_status(exc: BaseException) -> int | None:
    error = _client_error(exc)
    if error is None:
        return None
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _raise_s3_error(exc: Exception, dest: S3Destination, what: str) -> NoReturn:
    """Raise our error for a boto3 failure: S3's answers classified by status, credentials permanent.

    Anything else (connection errors, timeouts) is re-raised unchanged for ``core.errors.classify``,
    which already knows botocore's names.
    """
    error = _client_error(exc)
    if error is not None:
        status = _client_error_status(exc)
        details = error.response.get("Error", {})
        message = f"{dest.uri}: {what}: {details.get('Code') or 'error'} (HTTP {status})"
        if details.get("Message"):
            message += f": {details['Message']}"
        if status is not None and (status >= 500 or status in TRANSIENT_STATUSES):
            raise TransientError(message) from exc
        raise PermanentError(message) from exc
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        raise PermanentError(f"{dest.uri}: {what}: no usable AWS credentials (set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY, or a profile)") from exc
    raise exc
