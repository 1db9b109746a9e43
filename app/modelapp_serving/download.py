"""Download the pinned model blob once, verify its sha256 while streaming, and cache it atomically.

The cache file is named after the expected sha256, so a verified file is reused without a download.
Concurrent processes (gunicorn workers) serialise on an flock in the cache dir: the first one downloads,
the others wait and then reuse the verified file. A stamp file records which run verified the file, so
workers of the same gunicorn run (same MODELAPP_VERIFY_RUN_ID) do not hash it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity import DefaultAzureCredential
from azure.storage.blob import BlobClient, BlobServiceClient

from modelapp_serving.config import ModelSpec
from modelapp_serving.model_blob import METADATA_SIGNATURE, ModelFormat, redact_url
from modelapp_serving.signing import SignatureError, decode_bundle, verify_signature

log = logging.getLogger(__name__)

RUN_ID_ENV = "MODELAPP_VERIFY_RUN_ID"
"""Set by the gunicorn master; a stamp written under the same run id lets other workers skip re-hashing."""

_HASH_READ_BYTES = 8 << 20
_MAX_REASON_CHARS = 300

SUFFIX_BY_FORMAT = {ModelFormat.ONNX: ".onnx", ModelFormat.SKOPS: ".skops", ModelFormat.PICKLE: ".pkl"}


class ModelFetchError(Exception):
    """The model could not be fetched or verified. `reason` is one line for logs and /readyz."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class DownloadSettings:
    connection_string: str | None = None
    concurrency: int = 8
    chunk_bytes: int = 8 << 20
    run_id: str | None = None
    """Stamps from this run id are trusted; None re-hashes any cached file."""


@dataclass(frozen=True)
class FetchResult:
    path: Path
    downloaded: bool
    """False when a cached, verified file was reused."""
    seconds: float
    size: int


def cached_model_path(cache_dir: Path, spec: ModelSpec) -> Path:
    return cache_dir / f"{spec.sha256}{SUFFIX_BY_FORMAT[spec.format]}"


def fetch_verified_model(
    spec: ModelSpec,
    cache_dir: Path,
    settings: DownloadSettings,
    *,
    blob_client_factory: Callable[[ModelSpec, DownloadSettings], Any] | None = None,
) -> FetchResult:
    """Return the path of a file whose sha256 is `spec.sha256`, downloading it if needed.

    Raises ModelFetchError with a one-line reason; never leaves a partial or unverified file at the path.
    """
    started = time.perf_counter()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ModelFetchError(f"cannot create the cache dir {cache_dir}: {error}", retryable=False) from None
    target = cached_model_path(cache_dir, spec)
    factory = blob_client_factory or make_blob_client
    if spec.signature_public_key is not None:
        # Before any byte is used (a cached file too): the pinned version's signature names spec.sha256.
        _check_signature(factory(spec, settings), spec)
    with _exclusive_lock(cache_dir / f".{spec.sha256}.lock"):
        _remove_stale_partials(cache_dir, spec.sha256)
        if target.exists():
            if _stamp_matches(cache_dir, target, spec.sha256, settings.run_id):
                return FetchResult(target, False, time.perf_counter() - started, target.stat().st_size)
            actual = file_sha256(target)
            if actual == spec.sha256:
                _write_stamp(cache_dir, target, spec.sha256, settings.run_id)
                return FetchResult(target, False, time.perf_counter() - started, target.stat().st_size)
            log.warning("cached model %s has sha256 %s, expected %s: downloading again", target, actual, spec.sha256)
            target.unlink()
        size = _download_verified(factory(spec, settings), spec, target, settings)
        _write_stamp(cache_dir, target, spec.sha256, settings.run_id)
    return FetchResult(target, True, time.perf_counter() - started, size)


def make_blob_client(spec: ModelSpec, settings: DownloadSettings) -> Any:
    """A sync BlobClient: connection string, else a SAS in the URL, else DefaultAzureCredential."""
    tuning: dict[str, Any] = {
        "max_single_get_size": settings.chunk_bytes,
        "max_chunk_get_size": settings.chunk_bytes,
        "retry_total": 3,
        "connection_timeout": 10,
        "read_timeout": 60,
    }
    location = spec.location
    # The pinned snapshot or version: bytes that never change, whatever happens to the blob since.
    pinned: dict[str, Any] = {"snapshot": spec.pin.snapshot, "version_id": spec.pin.version_id}
    if settings.connection_string:
        service = BlobServiceClient.from_connection_string(settings.connection_string, **tuning)
        return service.get_blob_client(location.container, location.blob, **pinned)
    if "?" in spec.url:
        # The URL carries a SAS token: it is the credential.
        return BlobClient.from_blob_url(spec.url, **pinned, **tuning)
    return BlobClient(
        location.account_url,
        location.container,
        location.blob,
        credential=DefaultAzureCredential(),
        **pinned,
        **tuning,
    )


def _check_signature(blob_client: Any, spec: ModelSpec) -> None:
    """Refuse unless the version's signature verifies with the key and names spec.sha256."""
    shown = f"{redact_url(spec.url)} ({spec.pin.describe() or f'ETag {spec.etag}'})"
    assert spec.signature_public_key is not None
    try:
        properties = blob_client.get_blob_properties()
    except Exception as error:
        raise _describe_storage_error(error, shown, spec.etag) from None
    encoded = {k.lower(): v for k, v in (properties.metadata or {}).items()}.get(METADATA_SIGNATURE)
    if not encoded:
        raise ModelFetchError(f"model {shown} is not signed: refusing it", retryable=False)
    try:
        signed = verify_signature(decode_bundle(encoded), spec.signature_public_key)
    except SignatureError as error:
        raise ModelFetchError(f"model {shown}: {error}: refusing it", retryable=False) from None
    if signed.sha256 != spec.sha256:
        raise ModelFetchError(
            f"model {shown} is signed for sha256 {signed.sha256}, expected {spec.sha256}: refusing it",
            retryable=False,
        )


class HashingFileWriter:
    """A seekable write target for the SDK's parallel download, hashing in order while it streams.

    Chunks arrive out of order (the SDK seeks before each write, under its own lock); each is written
    at its offset with pwrite, and handed to a hashing thread as soon as every byte before it has been
    handed over. Hashing outside the SDK's lock keeps the download threads fetching while sha256 runs
    (inline hashing made them queue behind it: slower than downloading first and hashing after).
    The queue is bounded, so a slow hash holds back the download instead of filling memory.
    """

    def __init__(self, fd: int, *, max_queued_chunks: int = 8) -> None:
        self._fd = fd
        self._position = 0
        self._handed_over = 0
        self._pending: dict[int, bytes] = {}
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=max_queued_chunks)
        self._hasher = threading.Thread(target=self._hash_chunks, name="modelapp-sha256", daemon=True)
        self._hasher.start()
        self._closed = False
        self.bytes_written = 0

    def _hash_chunks(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._digest.update(chunk)

    # The SDK checks these before a parallel download.
    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise OSError("HashingFileWriter only seeks from the start")
        self._position = offset
        return offset

    def write(self, data: bytes | bytearray | memoryview) -> int:
        chunk = bytes(data) if not isinstance(data, bytes) else data
        offset = self._position
        written = 0
        while written < len(chunk):
            written += os.pwrite(self._fd, memoryview(chunk)[written:], offset + written)
        self._position = offset + written
        self.bytes_written += written
        if offset == self._handed_over:
            self._queue.put(chunk)
            self._handed_over += written
            while self._handed_over in self._pending:
                next_chunk = self._pending.pop(self._handed_over)
                self._queue.put(next_chunk)
                self._handed_over += len(next_chunk)
        elif offset > self._handed_over:
            self._pending[offset] = chunk
        else:
            raise OSError(f"overlapping write at offset {offset}")
        return written

    def close(self) -> None:
        """Stop the hashing thread (idempotent); call it even when the download failed."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._hasher.join()

    def hexdigest(self) -> str:
        self.close()
        if self._pending:
            raise OSError(f"download has a gap at offset {self._handed_over}")
        return self._digest.hexdigest()


def _download_verified(blob_client: Any, spec: ModelSpec, target: Path, settings: DownloadSettings) -> int:
    shown_url = redact_url(spec.url)
    partial = target.with_name(f".{spec.sha256}.{os.getpid()}.part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    writer = HashingFileWriter(fd)
    try:
        try:
            # A version ID is immutable by itself; a blob or a snapshot is also held to the ETag resolved.
            condition = (
                {} if spec.pin.version_id else {"etag": spec.etag, "match_condition": MatchConditions.IfNotModified}
            )
            downloader = blob_client.download_blob(max_concurrency=settings.concurrency, **condition)
            _reserve_space(fd, int(downloader.size))
            downloader.readinto(writer)
        except ModelFetchError:
            raise
        except Exception as error:
            raise _describe_storage_error(error, shown_url, spec.etag) from None
        actual = writer.hexdigest()
        if actual != spec.sha256:
            raise ModelFetchError(
                f"sha256 of {shown_url} (ETag {spec.etag}) is {actual}, expected {spec.sha256}: refusing it",
                retryable=False,
            )
        # The file was preallocated: make it exactly the bytes that were hashed.
        os.ftruncate(fd, writer.bytes_written)
        os.fchmod(fd, 0o444)
    except BaseException:
        writer.close()
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    os.close(fd)
    # No fsync: the cache lives on an emptyDir, and a file not stamped by this run is hashed again.
    os.replace(partial, target)
    return writer.bytes_written


def _reserve_space(fd: int, size: int) -> None:
    """Allocate the whole file first: a full disk fails now, not after most of the download."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise ModelFetchError(
                f"no space for the {size}-byte model in the cache dir: {error.strerror}", retryable=False
            ) from None
        # Filesystems without fallocate (EOPNOTSUPP, EINVAL): plain writes still work.


def _describe_storage_error(error: Exception, shown_url: str, etag: str) -> ModelFetchError:
    detail = _first_line(error)
    if isinstance(error, ResourceModifiedError) or getattr(error, "status_code", None) == 412:
        return ModelFetchError(
            f"model blob {shown_url} no longer has ETag {etag} (HTTP 412 precondition failed): refusing it",
            retryable=False,
        )
    if isinstance(error, ResourceNotFoundError):
        return ModelFetchError(f"model blob {shown_url} not found (HTTP 404)", retryable=True)
    if isinstance(error, ClientAuthenticationError):
        return ModelFetchError(f"cannot authenticate to read {shown_url}: {detail}", retryable=True)
    if isinstance(error, HttpResponseError) and error.status_code is not None:
        retryable = error.status_code >= 500 or error.status_code == 429
        return ModelFetchError(
            f"reading {shown_url} failed with HTTP {error.status_code}: {detail}", retryable=retryable
        )
    if isinstance(error, ServiceRequestError | ServiceResponseError | ConnectionError | TimeoutError):
        return ModelFetchError(f"cannot reach {shown_url}: {detail}", retryable=True)
    if isinstance(error, OSError):
        return ModelFetchError(f"cannot write the model cache file: {detail}", retryable=False)
    return ModelFetchError(f"downloading {shown_url} failed: {type(error).__name__}: {detail}", retryable=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= _MAX_REASON_CHARS else line[: _MAX_REASON_CHARS - 1] + "…"


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _remove_stale_partials(cache_dir: Path, sha256: str) -> None:
    # We hold the lock for this sha256, so any partial file for it belongs to a process that died.
    for stale in cache_dir.glob(f".{sha256}.*.part"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def file_sha256(path: Path) -> str:
    """sha256 of a file on disk, read in large unbuffered chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_READ_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _stamp_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / f".{sha256}.verified"


def _file_identity(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _write_stamp(cache_dir: Path, target: Path, sha256: str, run_id: str | None) -> None:
    if not run_id:
        return
    stamp = {"run_id": run_id, **_file_identity(target)}
    partial = _stamp_path(cache_dir, sha256).with_suffix(".tmp")
    partial.write_text(json.dumps(stamp))
    os.replace(partial, _stamp_path(cache_dir, sha256))


def _stamp_matches(cache_dir: Path, target: Path, sha256: str, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        stamp = json.loads(_stamp_path(cache_dir, sha256).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp == {"run_id": run_id, **_file_identity(target)}
