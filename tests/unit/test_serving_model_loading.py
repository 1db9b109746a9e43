"""Verification, caching and loading of the model file (no network: cache hits and a local blob stand-in)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib  # type: ignore[import-untyped]
import pytest
import skops.io
from modelapp_serving import download
from modelapp_serving.config import ModelFormat, ModelSpec, ServingConfig
from modelapp_serving.download import (
    DownloadSettings,
    HashingFileWriter,
    ModelFetchError,
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


class ChunkedBlob:
    """Stands in for a BlobClient: hands `content` to the writer in out-of-order chunks, as the SDK's
    parallel download does (seek, then write)."""

    def __init__(self, content: bytes, chunk: int = 7) -> None:
        self.content = content
        self.size = len(content)
        self.chunk = chunk
        self.downloads = 0
        self.last_kwargs: dict[str, Any] = {}

    def download_blob(self, **kwargs: Any) -> ChunkedBlob:
        self.downloads += 1
        self.last_kwargs = kwargs
        return self

    def readinto(self, stream: Any) -> int:
        offsets = list(range(0, len(self.content), self.chunk))
        order = offsets[1::2] + offsets[0::2]  # odd chunks first: every one arrives out of order
        for offset in order:
            stream.seek(offset)
            stream.write(self.content[offset : offset + self.chunk])
        return len(self.content)


def factory_for(blob: ChunkedBlob) -> Callable[[ModelSpec, DownloadSettings], Any]:
    return lambda spec, settings: blob


def refuse_download(spec: ModelSpec, settings: DownloadSettings) -> Any:
    raise AssertionError("must not download")


def test_hashing_writer_hashes_in_order_while_chunks_arrive_out_of_order(tmp_path: Path) -> None:
    content = os.urandom(1000)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    writer = HashingFileWriter(fd)
    ChunkedBlob(content, chunk=64).readinto(writer)
    os.close(fd)
    assert writer.hexdigest() == sha256_hex(content)
    assert (tmp_path / "out").read_bytes() == content


def test_hashing_writer_reports_a_gap(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    writer = HashingFileWriter(fd)
    writer.seek(10)
    writer.write(b"late")
    os.close(fd)
    with pytest.raises(OSError, match="gap at offset 0"):
        writer.hexdigest()


def test_download_verifies_pins_the_etag_and_caches_atomically(tmp_path: Path) -> None:
    content = os.urandom(5000)
    blob = ChunkedBlob(content)
    spec = spec_for(content)
    result = fetch_verified_model(
        spec, tmp_path, DownloadSettings(concurrency=4), blob_client_factory=factory_for(blob)
    )
    assert result.downloaded
    assert result.path == cached_model_path(tmp_path, spec)
    assert result.path.read_bytes() == content
    assert blob.last_kwargs["etag"] == '"0x1"'
    assert blob.last_kwargs["max_concurrency"] == 4
    assert str(blob.last_kwargs["match_condition"]) == "MatchConditions.IfNotModified"
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
