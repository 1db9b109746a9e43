"""The serving app and the publisher against a real Azurite: download, verification, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from flask import Flask
from modelapp_localstack import Azurite
from modelapp_localstack.procs import free_port
from modelapp_serving.config import ModelFormat, ModelSpec, ServingConfig
from modelapp_serving.download import cached_model_path
from modelapp_serving.model_blob import parse_blob_url
from modelapp_serving.publish import PublishedModel, PublishError, publish_model
from modelapp_serving.sample_model import write_sample_models
from modelapp_serving.web import create_app, get_serving

pytestmark = pytest.mark.integration

SETOSA = [5.1, 3.5, 1.4, 0.2]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sample")
    write_sample_models(directory)
    return directory


@pytest.fixture
def blob_url(azurite: Azurite) -> str:
    """A fresh blob name in a fresh container (publish creates the container)."""
    return f"{azurite.blob_endpoint}/models-{uuid.uuid4().hex[:12]}/iris.onnx"


def serving_config(
    azurite: Azurite, published: PublishedModel, cache_dir: Path, etag: str | None = None
) -> ServingConfig:
    spec = ModelSpec(
        url=published.url, etag=etag or published.etag, sha256=published.sha256, format=ModelFormat(published.format)
    )
    return ServingConfig(model=spec, connection_string=azurite.connection_string, cache_dir=cache_dir)


def wait_until_settled(app: Flask, timeout: float = 60) -> dict[str, Any]:
    """Poll /readyz until ready or failed (a refusal is final); return its JSON."""
    client = app.test_client()
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get("/readyz").get_json()
        if body["ready"] or body.get("failed") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def overwrite_blob(azurite: Azurite, url: str, data: bytes, metadata: dict[str, str]) -> str:
    """Replace the blob's content behind the publisher's back; return the new ETag."""
    location = parse_blob_url(url)
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    result = service.get_blob_client(location.container, location.blob).upload_blob(
        data, overwrite=True, metadata=metadata
    )
    return str(result["etag"])


def test_published_model_downloads_verifies_and_serves(
    azurite: Azurite, blob_url: str, sample_dir: Path, tmp_path: Path
) -> None:
    model_file = sample_dir / "iris.onnx"
    published = publish_model(model_file, blob_url, connection_string=azurite.connection_string, progress=False)
    assert published.uploaded
    assert published.size == model_file.stat().st_size
    assert published.format == "onnx"

    location = parse_blob_url(blob_url)
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    properties = service.get_blob_client(location.container, location.blob).get_blob_properties()
    assert properties.etag == published.etag
    assert properties.metadata == {"sha256": published.sha256, "format": "onnx"}

    app = create_app(serving_config(azurite, published, tmp_path))
    assert wait_until_settled(app) == {"ready": True}
    client = app.test_client()
    assert client.post("/predict", json={"instances": [SETOSA]}).get_json() == {"predictions": [0]}
    version = client.get("/version").get_json()
    assert version["model"] == {"url": blob_url, "etag": published.etag, "sha256": published.sha256, "format": "onnx"}
    spec = get_serving(app).config.model
    assert spec is not None
    assert cached_model_path(tmp_path, spec).read_bytes() == model_file.read_bytes()
    assert not list(tmp_path.glob("*.part"))


def test_publishing_the_same_content_again_is_a_no_op(azurite: Azurite, blob_url: str, sample_dir: Path) -> None:
    first = publish_model(sample_dir / "iris.onnx", blob_url, connection_string=azurite.connection_string)
    again = publish_model(sample_dir / "iris.onnx", blob_url, connection_string=azurite.connection_string)
    assert not again.uploaded
    assert again.etag == first.etag


def test_publish_refuses_to_overwrite_a_different_model(azurite: Azurite, blob_url: str, sample_dir: Path) -> None:
    first = publish_model(sample_dir / "iris.onnx", blob_url, connection_string=azurite.connection_string)
    with pytest.raises(PublishError, match="already holds a different model"):
        publish_model(sample_dir / "iris.skops", blob_url, connection_string=azurite.connection_string, format="skops")
    replaced = publish_model(
        sample_dir / "iris.skops", blob_url, connection_string=azurite.connection_string, format="skops", overwrite=True
    )
    assert replaced.uploaded
    assert replaced.etag != first.etag
    assert replaced.format == "skops"


def test_tampered_blob_never_becomes_ready_and_is_never_loaded(
    azurite: Azurite, blob_url: str, sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = publish_model(sample_dir / "iris.onnx", blob_url, connection_string=azurite.connection_string)
    # Content changed, metadata kept: the ETag matches what is pinned, the sha256 does not.
    tampered_etag = overwrite_blob(
        azurite,
        blob_url,
        (sample_dir / "iris.onnx").read_bytes() + b"\0",
        {"sha256": published.sha256, "format": "onnx"},
    )
    loaded: list[Path] = []
    monkeypatch.setattr("modelapp_serving.state.load_model_file", lambda path, *a, **k: loaded.append(path))

    app = create_app(serving_config(azurite, published, tmp_path, etag=tampered_etag))
    body = wait_until_settled(app)
    assert body["ready"] is False
    assert body["failed"] is True
    assert f"expected {published.sha256}" in body["reason"]
    assert loaded == []
    assert [p for p in tmp_path.iterdir() if p.suffix in (".onnx", ".part")] == []
    assert app.test_client().post("/predict", json={"instance": SETOSA}).status_code == 503


def test_blob_changed_under_a_stale_etag_is_refused_with_412(
    azurite: Azurite, blob_url: str, sample_dir: Path, tmp_path: Path
) -> None:
    published = publish_model(sample_dir / "iris.onnx", blob_url, connection_string=azurite.connection_string)
    overwrite_blob(azurite, blob_url, (sample_dir / "iris.skops").read_bytes(), {})

    app = create_app(serving_config(azurite, published, tmp_path))
    body = wait_until_settled(app)
    assert body["ready"] is False
    assert body["failed"] is True
    assert "412" in body["reason"]
    assert published.etag in body["reason"]
    assert not list(tmp_path.glob("*.onnx"))


def test_publish_cli_prints_what_to_pin(azurite: Azurite, blob_url: str, sample_dir: Path) -> None:
    env = {
        **os.environ,
        "MODELAPP_MODEL_CONNECTION_STRING": azurite.connection_string,
        "PYTHONPATH": str(REPO_ROOT / "app"),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "modelapp_serving.publish", str(sample_dir / "iris.onnx"), blob_url, "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    printed = json.loads(completed.stdout)
    assert printed["uploaded"] is True
    assert printed["etag"].startswith('"')
    assert len(printed["sha256"]) == 64


@pytest.fixture
def gunicorn_server(azurite: Azurite, blob_url: str, sample_dir: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    published = publish_model(sample_dir / "iris.onnx", blob_url, connection_string=azurite.connection_string)
    port = free_port()
    log_path = tmp_path / "serve.log"
    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT / "app"),
        "MODELAPP_MODEL_URL": published.url,
        "MODELAPP_MODEL_ETAG": published.etag,
        "MODELAPP_MODEL_SHA256": published.sha256,
        "MODELAPP_MODEL_FORMAT": "onnx",
        "MODELAPP_MODEL_CONNECTION_STRING": azurite.connection_string,
        "MODELAPP_MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "MODELAPP_PORT": str(port),
        "MODELAPP_WORKERS": "3",
        "PROMETHEUS_MULTIPROC_DIR": str(prometheus_dir),
    }
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "modelapp_serving", "--", "--bind", f"127.0.0.1:{port}"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def test_gunicorn_workers_share_one_verified_download(gunicorn_server: tuple[str, Path]) -> None:
    base_url, log_path = gunicorn_server
    deadline = time.monotonic() + 90
    while log_path.read_text().count("model ready:") < 3:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)
    assert http_get(f"{base_url}/readyz") == (200, '{"ready":true}')
    request = urllib.request.Request(
        f"{base_url}/predict",
        data=json.dumps({"instances": [SETOSA]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.loads(response.read()) == {"predictions": [0]}
    log_text = log_path.read_text()
    assert log_text.count("model ready: downloaded") == 1, log_text
    assert log_text.count("model ready: reused cached") == 2, log_text
    status, metrics = http_get(f"{base_url}/metrics")
    assert status == 200
    assert 'modelapp_http_requests_total{endpoint="/predict",method="POST",status="200"} 1.0' in metrics
    assert "modelapp_model_ready 1.0" in metrics
