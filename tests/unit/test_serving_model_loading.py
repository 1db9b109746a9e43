"""Verification, caching and loading of the model file (no network: cache hits and a local blob stand-in)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib  # type: ignore[import-untyped]
import pytest
import skops.io
from azure.core.exceptions import ResourceModifiedError
from modelapp_serving import download
from modelapp_serving.config import ModelFormat, ModelSpec, ServingConfig
from modelapp_serving.download import (
    DownloadSettings,
    ModelFetchError,
    RangedBlobReader,
    cached_model_path,
    fetch_verified_model,
)
from modelapp_serving.model import ModelLoadError, load_model_file
from modelapp_serving.model_blob import PinnedVersion
from modelapp_serving.sample_model import train_iris_classifier, write_sample_models
from modelapp_serving.state import ModelState, load_until_ready, model_info_from_config

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sample")
    write_sample_models(directory)
    return directory


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_for(data: bytes, model_format: ModelFormat = ModelFormat.ONNX) -> ModelSpec:
    return ModelSpec(
        url="http://127.0.0.1:9/devstoreaccount1/models/m.onnx",
        etag='"0x1"',
        sha256=sha256_hex(data),
        format=model_format,
    )


class _Range:
    """What download_blob returns, as far as the reader uses it: the size and the bytes in chunks."""

    def __init__(self, data: bytes, size: int) -> None:
        self.size = size
        self._data = data

    def chunks(self) -> Any:
        return iter([self._data] if self._data else [])


class ChunkedBlob:
    """Stands in for a BlobClient with max_single_get_size = `chunk`: the first download_blob() returns the
    first chunk and the blob's size, ranged ones return their range, called from the reader's threads.
    Ranges finish out of order (later ones sooner); `fail_at` answers one range with HTTP 412."""

    def __init__(self, content: bytes, chunk: int = 7, fail_at: int | None = None) -> None:
        self.content = content
        self.chunk = chunk
        self.fail_at = fail_at
        self.downloads = 0
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @property
    def last_kwargs(self) -> dict[str, Any]:
        return self.calls[-1]

    def download_blob(self, offset: int | None = None, length: int | None = None, **kwargs: Any) -> _Range:
        with self._lock:
            self.calls.append({"offset": offset, "length": length, **kwargs})
        if offset is None:
            self.downloads += 1
            return _Range(self.content[: self.chunk], len(self.content))
        assert length is not None
        time.sleep(0.001 * (3 - (offset // self.chunk) % 4))  # out of order
        if offset == self.fail_at:
            raise ResourceModifiedError("The condition specified using HTTP conditional header(s) is not met.")
        return _Range(self.content[offset : offset + length], length)


def factory_for(blob: ChunkedBlob) -> Callable[[ModelSpec, DownloadSettings], Any]:
    return lambda spec, settings: blob


def refuse_download(spec: ModelSpec, settings: DownloadSettings) -> Any:
    raise AssertionError("must not download")


def test_ranged_reader_yields_in_order_while_ranges_finish_out_of_order() -> None:
    content = os.urandom(1000)
    blob = ChunkedBlob(content, chunk=64)
    reader = RangedBlobReader(blob, concurrency=4, chunk_bytes=64, conditions={"etag": '"0x1"'})
    arrived: dict[int, bytes] = {}
    offsets = []
    received = b""
    for offset, data in reader.chunks(arrived.__setitem__):
        offsets.append(offset)
        received += data
    assert received == content
    assert offsets == list(range(0, 1000, 64))
    assert b"".join(arrived[offset] for offset in sorted(arrived)) == content
    assert all(call["etag"] == '"0x1"' for call in blob.calls)
    assert all(call["length"] <= 64 for call in blob.calls if call["offset"] is not None)


def test_ranged_reader_keeps_at_most_concurrency_plus_two_chunks_in_flight() -> None:
    blob = ChunkedBlob(os.urandom(64 * 40), chunk=64)
    reader = RangedBlobReader(blob, concurrency=3, chunk_bytes=64, conditions={})
    chunks = reader.chunks()
    next(chunks)
    time.sleep(0.1)  # the pool has fetched all it may; nothing more until the consumer takes a chunk
    assert len(blob.calls) == 1 + 3 + 2
    chunks.close()


def test_ranged_reader_reports_a_short_read() -> None:
    class ShortBlob(ChunkedBlob):
        def download_blob(self, offset: int | None = None, length: int | None = None, **kwargs: Any) -> _Range:
            answer = super().download_blob(offset, length, **kwargs)
            if offset is None:
                return answer
            return _Range(b"".join(answer.chunks())[:-1], answer.size)  # one byte short

    reader = RangedBlobReader(ShortBlob(os.urandom(200), chunk=64), concurrency=2, chunk_bytes=64, conditions={})
    with pytest.raises(OSError, match="short read at offset 64"):
        list(reader.chunks())


def test_blob_changed_mid_download_fails_cleanly(tmp_path: Path) -> None:
    content = os.urandom(5000)
    spec = spec_for(content)
    blob = ChunkedBlob(content, chunk=100, fail_at=2500)
    with pytest.raises(ModelFetchError, match="412") as raised:
        fetch_verified_model(spec, tmp_path, DownloadSettings(chunk_bytes=100), blob_client_factory=factory_for(blob))
    assert not raised.value.retryable
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_version_id_pin_needs_no_etag_condition(tmp_path: Path) -> None:
    content = os.urandom(500)
    spec = dataclasses.replace(spec_for(content), pin=PinnedVersion(version_id="2026-01-01T00:00:00.0000000Z"))
    blob = ChunkedBlob(content, chunk=100)
    fetch_verified_model(spec, tmp_path, DownloadSettings(chunk_bytes=100), blob_client_factory=factory_for(blob))
    assert all("etag" not in call and "match_condition" not in call for call in blob.calls)


def test_empty_blob_is_verified_and_cached(tmp_path: Path) -> None:
    spec = spec_for(b"")
    result = fetch_verified_model(spec, tmp_path, DownloadSettings(), blob_client_factory=factory_for(ChunkedBlob(b"")))
    assert result.path.read_bytes() == b""
    assert result.size == 0


def test_download_verifies_pins_the_etag_and_caches_atomically(tmp_path: Path) -> None:
    content = os.urandom(5000)
    blob = ChunkedBlob(content)
    spec = spec_for(content)
    result = fetch_verified_model(
        spec, tmp_path, DownloadSettings(concurrency=4, chunk_bytes=7), blob_client_factory=factory_for(blob)
    )
    assert result.downloaded
    assert result.path == cached_model_path(tmp_path, spec)
    assert result.path.read_bytes() == content
    assert len(blob.calls) == 715  # the first GET, then one ranged GET per 7-byte chunk
    for call in blob.calls:  # If-Match on the resolved ETag: every range comes from the same blob
        assert call["etag"] == '"0x1"'
        assert str(call["match_condition"]) == "MatchConditions.IfNotModified"
    assert not list(tmp_path.glob("*.part"))

    again = fetch_verified_model(spec, tmp_path, DownloadSettings(), blob_client_factory=refuse_download)
    assert not again.downloaded
    assert again.path == result.path


def test_sha256_mismatch_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    content = os.urandom(3000)
    spec = spec_for(b"the content that was published")
    with pytest.raises(ModelFetchError, match="expected") as raised:
        fetch_verified_model(spec, tmp_path, DownloadSettings(), blob_client_factory=factory_for(ChunkedBlob(content)))
    assert not raised.value.retryable
    assert sha256_hex(content) in raised.value.reason
    assert not cached_model_path(tmp_path, spec).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_tampered_cache_file_is_downloaded_again(tmp_path: Path) -> None:
    content = os.urandom(3000)
    spec = spec_for(content)
    cached_model_path(tmp_path, spec).write_bytes(b"tampered")
    blob = ChunkedBlob(content)
    result = fetch_verified_model(spec, tmp_path, DownloadSettings(), blob_client_factory=factory_for(blob))
    assert result.downloaded
    assert blob.downloads == 1
    assert result.path.read_bytes() == content


def test_stamp_of_the_same_run_skips_rehashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content = os.urandom(3000)
    spec = spec_for(content)
    settings = DownloadSettings(run_id="run-1")
    fetch_verified_model(spec, tmp_path, settings, blob_client_factory=factory_for(ChunkedBlob(content)))

    def no_hashing(path: Path) -> str:
        raise AssertionError("must not hash again")

    monkeypatch.setattr(download, "file_sha256", no_hashing)
    assert not fetch_verified_model(spec, tmp_path, settings, blob_client_factory=refuse_download).downloaded
    with pytest.raises(AssertionError, match="must not hash again"):
        fetch_verified_model(spec, tmp_path, DownloadSettings(run_id="run-2"), blob_client_factory=refuse_download)


def test_stale_partial_files_are_removed(tmp_path: Path) -> None:
    content = os.urandom(100)
    spec = spec_for(content)
    stale = tmp_path / f".{spec.sha256}.12345.part"
    stale.write_bytes(b"half")
    fetch_verified_model(spec, tmp_path, DownloadSettings(), blob_client_factory=factory_for(ChunkedBlob(content)))
    assert not stale.exists()


def config_for(spec: ModelSpec, cache_dir: Path, **changes: Any) -> ServingConfig:
    return ServingConfig(model=spec, cache_dir=cache_dir, **changes)


def test_background_load_of_a_cached_verified_file_becomes_ready(sample_dir: Path, tmp_path: Path) -> None:
    content = (sample_dir / "iris.onnx").read_bytes()
    spec = spec_for(content)
    cached_model_path(tmp_path, spec).write_bytes(content)
    config = config_for(spec, tmp_path)
    state = ModelState(model_info_from_config(config))
    load_until_ready(state, config, blob_client_factory=refuse_download)
    assert state.ready
    assert state.model is not None
    assert state.model.n_features == 4


def test_mismatch_stays_not_ready_with_one_log_line_and_never_loads(
    sample_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = (sample_dir / "iris.onnx").read_bytes()
    tampered = published + b"\0"
    spec = spec_for(published)
    loaded: list[Path] = []
    monkeypatch.setattr("modelapp_serving.state.load_model_file", lambda path, *a, **k: loaded.append(path))
    config = config_for(spec, tmp_path)
    state = ModelState(None)
    with caplog.at_level(logging.INFO, logger="modelapp_serving"):
        load_until_ready(state, config, blob_client_factory=factory_for(ChunkedBlob(tampered)))
    assert not state.ready
    assert state.failed
    assert "sha256" in state.reason
    assert loaded == []
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.ERROR
    assert "\n" not in caplog.records[0].getMessage()


def test_transient_failures_are_retried_with_backoff(sample_dir: Path, tmp_path: Path) -> None:
    content = (sample_dir / "iris.onnx").read_bytes()
    spec = spec_for(content)
    attempts: list[int] = []
    sleeps: list[float] = []

    def flaky_factory(spec: ModelSpec, settings: DownloadSettings) -> Any:
        attempts.append(1)
        if len(attempts) < 3:
            raise ModelFetchError("cannot reach the blob", retryable=True)
        return ChunkedBlob(content)

    state = ModelState(None)
    load_until_ready(state, config_for(spec, tmp_path), sleep=sleeps.append, blob_client_factory=flaky_factory)
    assert state.ready
    assert sleeps == [2.0, 4.0]


def test_pickle_needs_the_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "model.joblib"
    joblib.dump(train_iris_classifier(), path)
    with pytest.raises(ModelLoadError, match="MODELAPP_ALLOW_PICKLE"):
        load_model_file(path, ModelFormat.PICKLE, allow_pickle=False)
    model = load_model_file(path, ModelFormat.PICKLE, allow_pickle=True)
    assert model.n_features == 4


class NotAnEstimator:
    def __init__(self) -> None:
        self.payload = "anything"


def test_skops_file_with_types_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.skops"
    skops.io.dump(NotAnEstimator(), path)
    with pytest.raises(ModelLoadError, match=r"outside the allow-list: .*NotAnEstimator"):
        load_model_file(path, ModelFormat.SKOPS, allow_pickle=False)


def test_garbage_onnx_is_a_load_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot load the onnx model"):
        load_model_file(path, ModelFormat.ONNX, allow_pickle=False)


def test_version_names_the_pinned_snapshot_it_downloaded(tmp_path: Path) -> None:
    spec = dataclasses.replace(spec_for(b"model"), pin=PinnedVersion(snapshot="2026-01-01T00:00:00.1234567Z"))
    info = model_info_from_config(config_for(spec, tmp_path))
    assert info is not None and info.as_json()["pin"] == "snapshot=2026-01-01T00%3A00%3A00.1234567Z"
    unpinned = model_info_from_config(config_for(spec_for(b"model"), tmp_path))
    assert unpinned is not None and "pin" not in unpinned.as_json()
