"""An ONNX model that references external data, published to Blob Storage (Azurite) with its sha256, is refused by
the real serving process (gunicorn, its workers, the verified download) with the refusal exit code (the refusal
is ModelCannotLoad: state.py reports every ModelLoadError so), and the file it names is never opened."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from modelapp_localstack import Azurite
from modelapp_serving.publish import publish_model

from tests.integration.test_serving_process_health import serve_until_refused
from tests.unit.test_serving_onnx_external_data import TRAVERSAL, in_initializer, in_subgraph, opened_watch, write

pytestmark = pytest.mark.integration


def refusal_log(azurite: Azurite, tmp_path: Path, model: Path, **overrides: str) -> str:
    """Publish `model`, serve it until the server ends, check it ended refusing the model; its log."""
    url = f"{azurite.blob_endpoint}/models-{uuid.uuid4().hex[:12]}/external.onnx"
    published = publish_model(model, url, connection_string=azurite.connection_string)
    return serve_until_refused(azurite, published, tmp_path, **overrides)


@pytest.mark.parametrize("location", [TRAVERSAL, "secret-beside-the-model"])
def test_a_published_model_with_external_data_is_refused_by_the_server(
    azurite: Azurite, tmp_path: Path, location: str
) -> None:
    model = write(in_initializer(location), tmp_path / "model.onnx")
    cache = tmp_path / "cache"
    cache.mkdir()
    # A file where the reference points, inside the cache folder the model is downloaded into.
    beside = cache / "secret-beside-the-model"
    beside.write_bytes(b"\x00" * 64)
    with opened_watch(beside) as touched:
        log_text = refusal_log(azurite, tmp_path, model, MODELAPP_MODEL_CACHE_DIR=str(cache))
        assert not touched()
    assert f"references external data (tensor 'W' in file {location!r})" in log_text


def test_external_data_in_a_subgraph_is_refused_by_the_server(azurite: Azurite, tmp_path: Path) -> None:
    log_text = refusal_log(azurite, tmp_path, write(in_subgraph(TRAVERSAL), tmp_path / "model.onnx"))
    assert "references external data (tensor 'W' in file" in log_text
