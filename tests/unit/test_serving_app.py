"""The Flask app through its test client, with the real sample model loaded in memory."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelapp_serving import __version__
from modelapp_serving.config import ModelFormat, ModelSpec, ServingConfig
from modelapp_serving.model import LoadedModel, load_model_file
from modelapp_serving.sample_model import write_sample_models
from modelapp_serving.state import ModelInfo
from modelapp_serving.web import create_app, get_serving

pytestmark = pytest.mark.unit

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]
INFO = ModelInfo(
    url="https://acct.blob.core.windows.net/models/iris.onnx", etag='"0x1"', sha256="ab" * 32, format="onnx"
)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sample")
    write_sample_models(directory)
    return directory


@pytest.fixture(scope="module")
def onnx_model(sample_dir: Path) -> LoadedModel:
    return load_model_file(sample_dir / "iris.onnx", ModelFormat.ONNX, allow_pickle=False)


@pytest.fixture(scope="module")
def app(onnx_model: LoadedModel) -> Flask:
    return create_app(ServingConfig(model=None, max_request_bytes=4096), model=onnx_model, model_info=INFO)


@pytest.fixture(scope="module")
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as test_client:
        yield test_client


def post_json(client: FlaskClient, payload: Any) -> Any:
    return client.post("/predict", data=json.dumps(payload), content_type="application/json")


def test_single_instance_predicts_one_label(client: FlaskClient) -> None:
    response = post_json(client, {"instance": SETOSA})
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {"predictions": [0]}


def test_batch_predicts_one_label_per_row(client: FlaskClient) -> None:
    response = post_json(client, {"instances": [SETOSA, VIRGINICA, [1, 2, 3, 4]]})
    assert response.status_code == 200
    predictions = response.get_json()["predictions"]
    assert predictions[:2] == [0, 2]
    assert len(predictions) == 3


def test_skops_model_predicts_the_same(sample_dir: Path) -> None:
    model = load_model_file(sample_dir / "iris.skops", ModelFormat.SKOPS, allow_pickle=False)
    skops_app = create_app(ServingConfig(model=None), model=model)
    response = post_json(skops_app.test_client(), {"instances": [SETOSA, VIRGINICA]})
    assert response.get_json() == {"predictions": [0, 2]}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"instance": [1.0, 2.0, 3.0]}, "needs 4 features, got 3"),
        ({"instances": [[1.0, 2.0, 3.0, 4.0, 5.0]]}, "needs 4 features, got 5"),
        ({"instances": [[1, 2, 3, 4], [1, 2, 3]]}, "ragged"),
        ({"instance": ["a", 2, 3, 4]}, "JSON numbers"),
        ({"instance": [None, 2, 3, 4]}, "JSON numbers"),
        ({"instance": [True, 2, 3, 4]}, "booleans"),
        ({"instance": [1, 2, 3, {"x": 1}]}, "JSON numbers"),
        ({"instance": [1e39, 2, 3, 4]}, "float32 range"),
        ({"instances": []}, "non-empty"),
        ({"instances": [1, 2, 3, 4]}, "list of rows"),
        ({"instance": [[1, 2, 3, 4]]}, "flat list"),
        ({"rows": [[1, 2, 3, 4]]}, "unexpected key"),
        ({"instances": [SETOSA], "instance": SETOSA}, "exactly one"),
        ([SETOSA], "JSON object"),
    ],
)
def test_bad_input_is_a_400_naming_the_problem(client: FlaskClient, payload: Any, message: str) -> None:
    response = post_json(client, payload)
    assert response.status_code == 400
    body = response.get_json()
    assert body["status"] == 400
    assert message in body["error"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(client: FlaskClient, literal: str) -> None:
    body = f'{{"instance": [{literal}, 1, 2, 3]}}'
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 400
    assert "finite" in response.get_json()["error"]


def test_invalid_json_is_a_400(client: FlaskClient) -> None:
    response = client.post("/predict", data=b"{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"] == "the body is not valid JSON"


def test_non_json_content_type_is_a_415(client: FlaskClient) -> None:
    response = client.post("/predict", data=json.dumps({"instance": SETOSA}), content_type="text/plain")
    assert response.status_code == 415
    assert response.get_json()["status"] == 415


def test_body_over_the_limit_is_a_413(client: FlaskClient) -> None:
    rows = [SETOSA] * 400  # about 8 KiB, over the 4 KiB limit of this app
    response = post_json(client, {"instances": rows})
    assert response.status_code == 413
    assert "4096 bytes" in response.get_json()["error"]


def test_unknown_route_is_a_json_404(client: FlaskClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.get_json()["status"] == 404


def test_wrong_method_is_a_json_405(client: FlaskClient) -> None:
    response = client.get("/predict")
    assert response.status_code == 405
    assert response.get_json()["status"] == 405
    assert "POST" in response.headers["Allow"]


def test_healthz_answers(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_version_shows_app_and_model(client: FlaskClient) -> None:
    body = client.get("/version").get_json()
    assert body == {"version": __version__, "image": None, "model": INFO.as_json(), "ready": True}


def test_version_names_the_image_the_operator_pinned(onnx_model: LoadedModel) -> None:
    image = "registry.example/team/iris@sha256:" + "ab" * 32
    env = {"MODELAPP_MODEL_URL": INFO.url, "MODELAPP_MODEL_ETAG": INFO.etag, "MODELAPP_MODEL_SHA256": INFO.sha256,
           "MODELAPP_MODEL_FORMAT": "onnx", "MODELAPP_IMAGE": image}
    config = ServingConfig.from_env(env)
    assert config.image == image
    with create_app(config, model=onnx_model, model_info=INFO).test_client() as client:
        assert client.get("/version").get_json()["image"] == image


def test_version_never_shows_a_sas_token(onnx_model: LoadedModel) -> None:
    spec = ModelSpec(
        url="https://acct.blob.core.windows.net/models/iris.onnx?sv=1&sig=SECRET",
        etag='"0x1"',
        sha256="cd" * 32,
        format=ModelFormat.ONNX,
    )
    sas_app = create_app(ServingConfig(model=spec), model=onnx_model)
    body = sas_app.test_client().get("/version").get_data(as_text=True)
    assert "SECRET" not in body
    assert "https://acct.blob.core.windows.net/models/iris.onnx" in body


def test_metrics_count_requests_and_describe_the_model(client: FlaskClient) -> None:
    post_json(client, {"instance": SETOSA})
    post_json(client, {"instance": [1]})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'modelapp_http_requests_total{endpoint="/predict",method="POST",status="200"}' in text
    assert 'modelapp_http_requests_total{endpoint="/predict",method="POST",status="400"}' in text
    assert 'modelapp_http_request_duration_seconds_bucket{endpoint="/predict"' in text
    assert f'modelapp_model_info{{etag="\\"0x1\\"",format="onnx",sha256="{"ab" * 32}"}} 1.0' in text
    assert "modelapp_model_ready 1.0" in text


def test_unknown_paths_share_one_metrics_label(client: FlaskClient) -> None:
    client.get("/random-path-1")
    client.get("/random-path-2")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'endpoint="other"' in text
    assert "random-path" not in text


def test_readiness_is_503_with_reason_until_the_model_is_set(onnx_model: LoadedModel) -> None:
    spec = ModelSpec(
        url="https://acct.blob.core.windows.net/m/iris.onnx", etag='"0x1"', sha256="ab" * 32, format=ModelFormat.ONNX
    )
    not_yet = create_app(ServingConfig(model=spec), load_in_background=False)
    client = not_yet.test_client()
    assert client.get("/healthz").status_code == 200
    readyz = client.get("/readyz")
    assert readyz.status_code == 503
    assert readyz.get_json() == {"ready": False, "reason": "the model is loading", "failed": False}
    predict = post_json(client, {"instance": SETOSA})
    assert predict.status_code == 503
    assert predict.get_json()["error"] == "model not ready: the model is loading"
    assert predict.headers["Retry-After"] == "5"
    assert "modelapp_model_ready 0.0" in client.get("/metrics").get_data(as_text=True)

    get_serving(not_yet).state.set_ready(onnx_model)

    assert client.get("/readyz").status_code == 200
    assert post_json(client, {"instance": SETOSA}).get_json() == {"predictions": [0]}
    assert "modelapp_model_ready 1.0" in client.get("/metrics").get_data(as_text=True)


class ExplodingModel:
    n_features = 4
    input_dtype = np.dtype(np.float32)
    fixed_batch_size = None

    def predict(self, features: npt.NDArray[Any]) -> list[Any]:
        raise RuntimeError("secret internal detail")


def test_unexpected_error_is_a_generic_500_without_trace(caplog: pytest.LogCaptureFixture) -> None:
    exploding = create_app(ServingConfig(model=None), model=ExplodingModel())
    with caplog.at_level(logging.ERROR, logger="modelapp_serving"):
        response = post_json(exploding.test_client(), {"instance": SETOSA})
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error", "status": 500}
    assert "secret" not in response.get_data(as_text=True)
    assert "secret internal detail" in caplog.text


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
bodies = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"instances": json_values}).map(json.dumps),
    st.fixed_dictionaries({"instance": json_values}).map(json.dumps),
    st.fixed_dictionaries(
        {"instances": st.lists(st.lists(st.floats() | st.integers(), min_size=3, max_size=5), max_size=4)}
    ).map(json.dumps),
    st.binary(max_size=300),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=st.sampled_from(["application/json", "text/plain", "application/x+json", ""]))
def test_fuzzed_predict_bodies_never_give_a_5xx(client: FlaskClient, body: str | bytes, content_type: str) -> None:
    response = client.post("/predict", data=body, content_type=content_type)
    assert response.status_code < 500, response.get_data(as_text=True)
    assert response.is_json
