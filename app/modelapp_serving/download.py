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
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
from azure.storage.blob import BlobClient, BlobServiceClient
from modelapp_contract.blob import METADATA_SIGNATURE, ModelFormat, redact_url
from modelapp_contract.signing import SignatureError, decode_bundle, verify_signature
from modelapp_contract.termination import RefusalKind

from modelapp_serving.config import ModelSpec

log = logging.getLogger(__name__)

_HASH_READ_BYTES = 8 << 20
_MAX_REASON_CHARS = 300

SUFFIX_BY_FORMAT = {ModelFormat.ONNX: ".onnx", ModelFormat.SKOPS: ".skops", ModelFormat.PICKLE: ".pkl"}


class ModelFetchError(Exception):
    """The model could not be fetched or verified. `reason` is one line for logs and /readyz; `refusal`
    is the kind of refusal (a `RefusalKind`) when it is not retryable."""

    def __init__(self, reason: str, *, retryable: bool, refusal: str = RefusalKind.CANNOT_FETCH) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.refusal = refusal


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
        raise ModelFetchError(
            f"cannot create the cache dir {cache_dir}: {error}", retryable=False, refusal=RefusalKind.CACHE_UNUSABLE
        ) from None
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
    # Imported only here: azure.identity (msal and its helpers) cost every pod ~70 ms of its start
    # (python -X importtime, on top of azure.storage.blob), also those with a connection string or a SAS.
    from azure.identity import DefaultAzureCredential  # noqa: PLC0415

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
        raise ModelFetchError(
            f"model {shown} is not signed: refusing it", retryable=False, refusal=RefusalKind.SIGNATURE_INVALID
        )
    try:
        signed = verify_signature(decode_bundle(encoded), spec.signature_public_key)
    except SignatureError as error:
        raise ModelFetchError(
            f"model {shown}: {error}: refusing it", retryable=False, refusal=RefusalKind.SIGNATURE_INVALID
        ) from None
    if signed.sha256 != spec.sha256:
        raise ModelFetchError(
            f"model {shown} is signed for sha256 {signed.sha256}, expected {spec.sha256}: refusing it",
            retryable=False,
            refusal=RefusalKind.SIGNATURE_INVALID,
        )


def pinned_conditions(spec: ModelSpec) -> dict[str, Any]:
    """Request conditions for every read of the pinned bytes.

    A version ID is immutable by itself; a blob or a snapshot is also held to the ETag resolved, so a
    blob changed between two ranged reads fails with HTTP 412 instead of mixing two versions.
    """
    if spec.pin.version_id:
        return {}
    return {"etag": spec.etag, "match_condition": MatchConditions.IfNotModified}


class RangedBlobReader:
    """Reads one blob as fixed-size ranged GETs through the SDK, several in flight, yielded in order.

    The first GET (no range) returns the first chunk and the blob's size; the rest are
    `download_blob(offset=, length=)` calls on a thread pool, each one a single GET of one chunk. A chunk
    is handed to `on_arrival(offset, data)` in the thread that fetched it (the verified download writes
    it there with pwrite, outside any lock), then yielded in offset order (where the verified download
    hashes it; sha256 releases the GIL). At most `concurrency + 2` chunks are in flight or waiting, so
    memory stays bounded whatever the blob size and however slowly the consumer hashes.
    """

    def __init__(self, blob_client: Any, *, concurrency: int, chunk_bytes: int, conditions: dict[str, Any]) -> None:
        self._client = blob_client
        self._concurrency = max(1, concurrency)
        self._chunk_bytes = chunk_bytes
        self._conditions = conditions
        first = blob_client.download_blob(**conditions)
        self.size = int(first.size)
        self._first = next(iter(first.chunks()), b"") if self.size else b""

    def chunks(
        self, on_arrival: Callable[[int, bytes], None] | None = None
    ) -> Generator[tuple[int, bytes], None, None]:
        """(offset, data) in order; every running GET has finished when the generator is closed."""
        ranges = deque(
            (offset, min(self._chunk_bytes, self.size - offset))
            for offset in range(len(self._first), self.size, self._chunk_bytes)
        )
        in_flight: deque[Future[bytes]] = deque()
        executor = ThreadPoolExecutor(self._concurrency, thread_name_prefix="modelapp-download")

        def fetch(offset: int, length: int) -> bytes:
            data = self._read_range(offset, length)
            if on_arrival is not None:
                on_arrival(offset, data)
            return data

        def submit_more() -> None:
            while ranges and len(in_flight) < self._concurrency + 2:
                in_flight.append(executor.submit(fetch, *ranges.popleft()))

        try:
            submit_more()
            if self._first:
                if on_arrival is not None:
                    on_arrival(0, self._first)
                yield 0, self._first
            offset = len(self._first)
            self._first = b""
            while in_flight:
                data = in_flight.popleft().result()
                submit_more()
                yield offset, data
                offset += len(data)
        finally:
            for future in in_flight:
                future.cancel()
            executor.shutdown(wait=True, cancel_futures=True)

    def _read_range(self, offset: int, length: int) -> bytes:
        # One GET: the client's max_single_get_size is the chunk size. join() of one piece is no copy.
        data = b"".join(self._client.download_blob(offset=offset, length=length, **self._conditions).chunks())
        if len(data) != length:
            raise OSError(f"short read at offset {offset}: {len(data)} of {length} bytes")
        return data


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _download_verified(blob_client: Any, spec: ModelSpec, target: Path, settings: DownloadSettings) -> int:
    shown_url = redact_url(spec.url)
    partial = target.with_name(f".{spec.sha256}.{os.getpid()}.part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    digest = hashlib.sha256()
    hashed = 0
    try:
        try:
            reader = RangedBlobReader(
                blob_client,
                concurrency=settings.concurrency,
                chunk_bytes=settings.chunk_bytes,
                conditions=pinned_conditions(spec),
            )
            _reserve_space(fd, reader.size)
            with contextlib.closing(reader.chunks(lambda offset, data: _write_at(fd, data, offset))) as chunks:
                for _offset, data in chunks:
                    digest.update(data)  # in order, in this thread, while the pool keeps fetching and writing
                    hashed += len(data)
        except ModelFetchError:
            raise
        except Exception as error:
            raise _describe_storage_error(error, shown_url, spec.etag) from None
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise ModelFetchError(
                f"sha256 of {shown_url} (ETag {spec.etag}) is {actual}, expected {spec.sha256}: refusing it",
                retryable=False,
                refusal=RefusalKind.CHECKSUM_MISMATCH,
            )
        # The file was preallocated: make it exactly the bytes that were hashed (and written).
        os.ftruncate(fd, hashed)
        os.fchmod(fd, 0o444)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    os.close(fd)
    # No fsync: the cache lives on an emptyDir, and a file not stamped by this run is hashed again.
    os.replace(partial, target)
    return hashed


def _reserve_space(fd: int, size: int) -> None:
    """Allocate the whole file first: a full disk fails now, not after most of the download."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise ModelFetchError(
                f"no space for the {size}-byte model in the cache dir: {error.strerror}",
                retryable=False,
                refusal=RefusalKind.CACHE_UNUSABLE,
            ) from None
        # Filesystems without fallocate (EOPNOTSUPP, EINVAL): plain writes still work.


def _describe_storage_error(error: Exception, shown_url: str, etag: str) -> ModelFetchError:
    detail = _first_line(error)
    if isinstance(error, ResourceModifiedError) or getattr(error, "status_code", None) == 412:
        return ModelFetchError(
            f"model blob {shown_url} no longer has ETag {etag} (HTTP 412 precondition failed): refusing it",
            retryable=False,
            refusal=RefusalKind.VERSION_CHANGED,
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
        return ModelFetchError(
            f"cannot write the model cache file: {detail}", retryable=False, refusal=RefusalKind.CACHE_UNUSABLE
        )
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
