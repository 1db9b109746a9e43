"""The Open Inference Protocol (V2) REST API of the serving app, in memory: names and versions, the models'
signatures, infer's decoding and checks, and the fast paths (WSGI and ASGI) answering exactly as Flask."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelapp_serving.config import ConfigError, ModelFormat, ModelSpec, ServingConfig
from modelapp_serving.model import (
    LoadedModel,
    ModelSignature,
    SklearnModel,
    TensorMetadata,
    load_model_file,
    model_signature,
)
from modelapp_serving.oip import DATATYPES, OipError, ServedModel, datatype_of, served_model_name
from modelapp_serving.state import ModelInfo
from modelapp_serving.web import (
    V2_INFER_ENDPOINT,
    V2_MODEL_METADATA_ENDPOINT,
    V2_MODEL_READY_ENDPOINT,
    create_app,
    create_asgi_app,
    endpoint_label,
    get_serving,
)
from werkzeug.test import EnvironBuilder

from tests.unit.test_serving_app import json_values, onnx_model, sample_dir
from tests.unit.test_serving_asgi import request as asgi_request
from tests.unit.test_serving_fast_path import Answer, ExplodingModel, RecordingFallback, call

__all__ = ["onnx_model", "sample_dir"]  # fixtures of test_serving_app.py, used here too

pytestmark = pytest.mark.unit

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]
LIMIT = 4096
INFO = ModelInfo(
    url="https://acct.blob.core.windows.net/models/iris.onnx", etag='"0x1"', sha256="ab" * 32, format="onnx"
)
INFER = "/v2/models/iris/infer"


@pytest.fixture(scope="module")
def skops_model(sample_dir: Path) -> LoadedModel:
    return load_model_file(sample_dir / "iris.skops", ModelFormat.SKOPS, allow_pickle=False)


def make_app(model: LoadedModel | None, info: ModelInfo | None = INFO) -> Flask:
    return create_app(
        ServingConfig(model=None, max_request_bytes=LIMIT, model_name="iris"), model=model, model_info=info
    )


@pytest.fixture(scope="module")
def client(onnx_model: LoadedModel) -> FlaskClient:
    return make_app(onnx_model).test_client()


def infer_body(data: Any = None, **tensor: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": data or SETOSA, **tensor}]}


def post(client: FlaskClient, body: Any, path: str = INFER) -> tuple[int, Any]:
    response = client.post(path, data=body if isinstance(body, bytes) else json.dumps(body))
    return response.status_code, response.get_json()


# --- names and versions -------------------------------------------------------------------------------------


def spec(url: str) -> ModelSpec:
    return ModelSpec(url=url, etag='"0x1"', sha256="ab" * 32, format=ModelFormat.ONNX)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://acct.blob.core.windows.net/models/iris/model.onnx", "model"),
        ("https://acct.blob.core.windows.net/models/iris.onnx", "iris"),
        ("http://127.0.0.1:10000/devstoreaccount1/models/team/fraud%20v2.skops", "fraud-v2"),
        ("https://acct.blob.core.windows.net/models/a/%C3%A9t%C3%A9.onnx", "t"),
        ("https://acct.blob.core.windows.net/models/a/%C3%A9%C3%A9.onnx", "model"),
        ("https://acct.blob.core.windows.net/models/x/.hidden", "hidden"),
    ],
)
def test_the_model_name_is_the_blobs_file_name_without_its_extension(url: str, name: str) -> None:
    assert served_model_name(ServingConfig(model=spec(url))) == name


def test_modelapp_model_name_names_the_model_and_is_checked() -> None:
    env = {
        "MODELAPP_MODEL_URL": "https://acct.blob.core.windows.net/models/iris/model.onnx",
        "MODELAPP_MODEL_ETAG": '"0x1"',
        "MODELAPP_MODEL_SHA256": "ab" * 32,
        "MODELAPP_MODEL_FORMAT": "onnx",
    }
    assert served_model_name(ServingConfig.from_env(env)) == "model"
    assert served_model_name(ServingConfig.from_env({**env, "MODELAPP_MODEL_NAME": "iris"})) == "iris"
    assert served_model_name(ServingConfig(model=None)) == "model"
    for bad in ("a/b", "-iris", "x" * 254, "iris?"):
        with pytest.raises(ConfigError, match="MODELAPP_MODEL_NAME"):
            ServingConfig.from_env({**env, "MODELAPP_MODEL_NAME": bad})


def test_the_version_is_the_pinned_etag_with_or_without_quotes(client: FlaskClient) -> None:
    assert client.get("/v2/models/iris").get_json()["versions"] == ["0x1"]
    for version in ("0x1", '"0x1"', "%220x1%22"):
        assert client.get(f"/v2/models/iris/versions/{version}/ready").get_json() == {"name": "iris", "ready": True}
        assert post(client, infer_body(), f"/v2/models/iris/versions/{version}/infer")[0] == 200
    for path in ("/v2/models/iris/versions/0x2", "/v2/models/iris/versions/1/ready"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.get_json() == {
            "error": "unknown version '" + path.split("/")[5] + "' of model 'iris': its version is '0x1'"
        }


def test_a_model_without_info_has_no_versions(onnx_model: LoadedModel) -> None:
    test_client = make_app(onnx_model, info=None).test_client()
    assert test_client.get("/v2/models/iris").get_json()["versions"] == []
    status, answer = post(test_client, infer_body())
    assert status == 200
    assert "model_version" not in answer
    assert test_client.get("/v2/models/iris/versions/0x1").status_code == 404


# --- metadata: the model's own signature --------------------------------------------------------------------


def test_server_metadata_and_health(client: FlaskClient) -> None:
    assert client.get("/v2").get_json() == {"name": "modelapp", "version": "0.1.0", "extensions": []}
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    assert client.get("/v2/models/iris/ready").get_json() == {"name": "iris", "ready": True}


@pytest.mark.parametrize(
    ("model_fixture", "platform"), [("onnx_model", "onnxruntime_onnx"), ("skops_model", "scikit-learn")]
)
def test_both_formats_of_the_sample_model_describe_themselves_alike(
    request: pytest.FixtureRequest, model_fixture: str, platform: str
) -> None:
    model: LoadedModel = request.getfixturevalue(model_fixture)
    metadata = make_app(model).test_client().get("/v2/models/iris").get_json()
    assert metadata == {
        "name": "iris",
        "versions": ["0x1"],
        "platform": platform,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
    }


def fitted(estimator: Any, targets: npt.NDArray[Any]) -> SklearnModel:
    features = np.random.default_rng(0).normal(size=(len(targets), 3)).astype(np.float32)
    return SklearnModel(estimator=estimator.fit(features, targets), n_features=3)


def test_scikit_learn_signatures_come_from_the_estimator() -> None:
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.multioutput import MultiOutputClassifier

    labels = np.array(["a", "b", "c", "a", "b", "c"])
    strings = fitted(LogisticRegression(), labels).signature
    assert strings.outputs == (TensorMetadata("label", np.dtype(object), (-1,)),)
    # Fitted on float32 features, LinearRegression answers float32: the signature is what it answers.
    regression = fitted(LinearRegression(), np.arange(6, dtype=np.float64)).signature
    assert regression.outputs == (TensorMetadata("variable", np.dtype(np.float32), (-1,)),)
    two = fitted(LinearRegression(), np.arange(12, dtype=np.float64).reshape(6, 2)).signature
    assert two.outputs[0].shape == (-1, 2)
    multi = fitted(MultiOutputClassifier(LogisticRegression()), np.array([[0, 1], [1, 0], [0, 0], [1, 1]] * 2)[:6])
    assert multi.signature.outputs == (TensorMetadata("label", np.dtype(np.int64), (-1, 2)),)
    assert strings.inputs == (TensorMetadata("input", np.dtype(np.float32), (-1, 3)),)


def test_datatypes_map_to_numpy_and_back() -> None:
    assert datatype_of(np.dtype(np.float32)) == "FP32"
    assert datatype_of(np.dtype(np.int64)) == "INT64"
    assert datatype_of(np.dtype("<U5")) == "BYTES"
    assert datatype_of(np.dtype(object)) == "BYTES"
    assert datatype_of(np.dtype(np.bool_)) == "BOOL"
    assert all(datatype_of(dtype) == name for name, dtype in DATATYPES.items())


class PlainModel:
    """A LoadedModel with no signature (as test doubles are): its output type comes from its answers."""

    n_features = 4
    input_dtype = np.dtype(np.float64)
    fixed_batch_size = 2

    def predict(self, features: npt.NDArray[Any]) -> list[Any]:
        return [[float(row.sum()), 1.5] for row in features]


def test_a_model_without_a_signature_is_described_by_its_predict_interface() -> None:
    assert model_signature(PlainModel()) == ModelSignature(
        platform="", inputs=(TensorMetadata("input", np.dtype(np.float64), (2, 4)),), outputs=()
    )
    test_client = make_app(PlainModel()).test_client()
    assert test_client.get("/v2/models/iris").get_json()["outputs"] == []
    status, answer = post(test_client, infer_body([[1, 2, 3, 4], [0.5, 0.25, 0.25, 1]], shape=[2, 4], datatype="FP64"))
    assert status == 200
    assert answer["outputs"] == [{"name": "output", "datatype": "FP64", "shape": [2, 2], "data": [10.0, 1.5, 2.0, 1.5]}]
    assert post(test_client, infer_body())[1] == {
        "error": "input 'input' takes shape [2, 4] (-1: any size), not [1, 4]"
    }


# --- infer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    [
        {"datatype": "FP32", "data": SETOSA + VIRGINICA},  # flat
        {"datatype": "FP32", "data": [SETOSA, VIRGINICA]},  # nested as the shape
        {"datatype": "FP32", "data": [SETOSA[:2], SETOSA[2:], VIRGINICA[:2], VIRGINICA[2:]]},  # nested otherwise
        {"datatype": "FP64", "data": [SETOSA, VIRGINICA]},
        {"datatype": "FP16", "data": [SETOSA, VIRGINICA]},
        {"datatype": "INT64", "data": [[5, 4, 1, 0], [7, 3, 5, 2]]},
        {"datatype": "UINT8", "data": [[5, 4, 1, 0], [7, 3, 5, 2]]},
    ],
)
def test_infer_takes_flat_or_nested_data_of_any_number_datatype(client: FlaskClient, tensor: dict[str, Any]) -> None:
    status, answer = post(client, {"id": "r-1", "inputs": [{"name": "input", "shape": [2, 4], **tensor}]})
    assert status == 200, answer
    assert answer == {
        "model_name": "iris",
        "model_version": "0x1",
        "id": "r-1",
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 2]}],
    }


def test_infer_answers_as_predict_does(client: FlaskClient) -> None:
    rows = [SETOSA, VIRGINICA, [6.0, 2.9, 4.5, 1.5], [1, 2, 3, 4]]
    _, answer = post(client, infer_body(rows, shape=[4, 4], parameters={"content_type": "np"}))
    predictions = client.post("/predict", json={"instances": rows}).get_json()["predictions"]
    assert answer["outputs"][0]["data"] == predictions
    # Request parameters and kserve's extra model_name are ignored; the one output may be asked for by name.
    extra = {
        **infer_body(),
        "parameters": {"binary_data_output": True},
        "model_name": "x",
        "outputs": [{"name": "label"}],
    }
    assert post(client, extra)[1]["outputs"][0]["data"] == [0]


def test_string_labels_are_bytes_tensors() -> None:
    from sklearn.linear_model import LogisticRegression

    labels = np.array(["setosa", "versicolor", "virginica"] * 2)
    model = fitted(LogisticRegression(), labels)
    test_client = make_app(model).test_client()
    assert test_client.get("/v2/models/iris").get_json()["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]}
    ]
    status, answer = post(test_client, infer_body([1, 2, 3], shape=[1, 3]))
    assert status == 200
    (output,) = answer["outputs"]
    assert output["datatype"] == "BYTES"
    assert output["data"] == model.predict(np.asarray([[1, 2, 3]], dtype=np.float32))


def test_bytes_input_is_only_for_models_that_take_strings(onnx_model: LoadedModel) -> None:
    served = ServedModel.describe(onnx_model, "iris", None)
    with pytest.raises(OipError, match=r"takes FP32 .*, not BYTES"):
        served.infer(json.dumps(infer_body(["a", "b", "c", "d"], datatype="BYTES")).encode())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "the body is not valid JSON"),
        (b"[]", "the body must be a JSON object"),
        (b'{"inputs": {}}', '"inputs" must be a list of one tensor'),
        (json.dumps({"inputs": infer_body()["inputs"] * 2}).encode(), "this model takes one input, 'input'"),
        (json.dumps({**infer_body(), "id": 7}).encode(), '"id" must be a string'),
        (json.dumps({**infer_body(), "outputs": {"name": "label"}}).encode(), '"outputs" must be a list'),
        (json.dumps({**infer_body(), "outputs": [{"name": "proba"}]}).encode(), "unknown output 'proba'"),
        (json.dumps(infer_body(name="x" * 200)).encode(), "unknown input 'xxxxx"),
        (json.dumps(infer_body(datatype="BOOL", data=[True] * 4)).encode(), "not BOOL"),
        (json.dumps(infer_body(datatype=["FP32"])).encode(), "unknown datatype ['FP32']"),
        (json.dumps(infer_body(shape=[1, 4.0])).encode(), "must be a list of non-negative integers"),
        (json.dumps(infer_body(shape=[-1, 4])).encode(), "must be a list of non-negative integers"),
        (json.dumps(infer_body(shape=[4])).encode(), "takes shape [-1, 4] (-1: any size), not [4]"),
        (json.dumps(infer_body(shape=[0, 4], data=[])).encode(), "needs at least one row"),
        (json.dumps(infer_body(data="5.1 3.5")).encode(), "must be a list (flat or nested, row-major)"),
        (json.dumps(infer_body(data=[SETOSA, [1]], shape=[2, 4])).encode(), "is ragged"),
        (json.dumps(infer_body(data=[None, 1, 2, 3])).encode(), "must be JSON numbers"),
        (json.dumps(infer_body(data=[1, 2, 3, True])).encode(), "must not hold booleans"),
        (
            json.dumps(infer_body(data=[1.5, 2, 3, 4], datatype="INT64")).encode(),
            "INT64 data of input 'input' must be integers",
        ),
        (json.dumps(infer_body(data=[300, 2, 3, 4], datatype="INT8")).encode(), "must lie within [-128, 127]"),
        (
            json.dumps(infer_body(data=[-1, 2, 3, 4], datatype="UINT64")).encode(),
            "must lie within [0, 18446744073709551615]",
        ),
        (json.dumps(infer_body(data=[2**64, 2, 3, 4], datatype="UINT64")).encode(), "must be integers"),
        (
            json.dumps(infer_body(data=[1e5, 2, 3, 4], datatype="FP16")).encode(),
            "FP16 data of input 'input' must be finite",
        ),
        (
            json.dumps(infer_body(data=[1e300, 2, 3, 4], datatype="FP64")).encode(),
            "input 'input' (FP32) must be finite",
        ),
        (b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [NaN, 1, 2, 3]}]}', "no NaN"),
        (
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, Infinity]}]}',
            "no NaN",
        ),
        (json.dumps(infer_body(data=[1, 2, 3, 4, 5])).encode(), "holds 4 values; its data has 5"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]}).encode(), "has no JSON data"),
        (json.dumps(infer_body(parameters={"binary_data_size": 16})).encode(), "binary tensor data extension"),
    ],
)
def test_what_the_model_cannot_take_is_a_400_naming_it(client: FlaskClient, body: bytes, message: str) -> None:
    response = client.post(INFER, data=body)
    assert response.status_code == 400
    answer = response.get_json()
    assert list(answer) == ["error"]
    assert message in answer["error"]


def test_unknown_models_routes_methods_and_sizes_are_v2_errors(client: FlaskClient) -> None:
    cases = [
        (client.get("/v2/models/other"), 404, "unknown model 'other': this server serves 'iris'"),
        (client.post("/v2/models/other/infer", json=infer_body()), 404, "unknown model 'other'"),
        (client.get("/v2/models/other/ready"), 404, "unknown model 'other'"),
        (client.get("/v2/repository/index"), 404, "not found"),
        (client.get(INFER), 405, "not allowed"),
        (client.post(INFER, data=b" " * (LIMIT + 1)), 413, f"larger than the limit of {LIMIT} bytes"),
        (
            client.post(INFER, data=b"{}", headers={"Inference-Header-Content-Length": "2"}),
            400,
            "binary tensor data extension is not supported",
        ),
    ]
    for response, status, message in cases:
        assert response.status_code == status
        answer = response.get_json()
        assert list(answer) == ["error"], answer
        assert message in answer["error"]
    assert set(client.get(INFER).headers["Allow"].split(", ")) == {"OPTIONS", "POST"}


def test_an_unexpected_error_is_a_v2_500_without_trace(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(ExplodingModel())
    with caplog.at_level(logging.ERROR, logger="modelapp_serving"):
        fast, flask_only, handed_over = both_paths(app, INFER, json.dumps(infer_body()).encode())
    assert handed_over == 0
    assert fast == flask_only
    assert fast.status == "500 INTERNAL SERVER ERROR"
    assert json.loads(fast.body) == {"error": "internal error"}
    assert caplog.text.count(f"unhandled error on POST {INFER}") == 2
    assert "secret internal detail" in caplog.text


def test_until_ready_v2_readiness_is_503_and_liveness_200() -> None:
    model = ModelSpec(
        url="https://acct.blob.core.windows.net/m/iris.onnx", etag='"0x1"', sha256="ab" * 32, format=ModelFormat.ONNX
    )
    app = create_app(ServingConfig(model=model, max_request_bytes=LIMIT), load_in_background=False)
    test_client = app.test_client()
    assert test_client.get("/v2/health/live").get_json() == {"live": True}
    response = test_client.get("/v2/health/ready")
    assert (response.status_code, response.get_json()) == (
        503,
        {"ready": False, "error": "model not ready: the model is loading"},
    )
    response = test_client.get("/v2/models/iris/versions/0x1/ready")
    assert response.status_code == 503
    assert response.get_json()["ready"] is False
    for response in (test_client.get("/v2/models/iris"), test_client.post(INFER, json=infer_body())):
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert response.get_json() == {"error": "model not ready: the model is loading"}
    assert test_client.get("/v2/models/other").status_code == 404
    assert test_client.get("/v2/models/iris/versions/0x2/ready").status_code == 404


# --- the fast paths -----------------------------------------------------------------------------------------


def environ_for(path: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return EnvironBuilder(path=path, method="POST", data=body, headers=list((headers or {}).items())).get_environ()


def both_paths(app: Flask, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[Answer, Answer, int]:
    """(through the app with the fast path, straight to Flask, requests the fast path handed to Flask)."""
    fast_path = get_serving(app).predict_fast_path
    assert fast_path is not None
    if not isinstance(fast_path.fallback, RecordingFallback):
        fast_path.fallback = RecordingFallback(fast_path.fallback)
    recorder = fast_path.fallback
    before = recorder.calls
    with_fast_path = call(app.wsgi_app, environ_for(path, body, headers))
    handed_over = recorder.calls - before
    flask_only = call(recorder.wrapped, environ_for(path, body, headers))
    return with_fast_path, flask_only, handed_over


@pytest.mark.parametrize("path", [INFER, "/v2/models/iris/versions/0x1/infer", '/v2/models/iris/versions/"0x1"/infer'])
@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain"])
def test_the_wsgi_fast_path_answers_infer_as_flask_does(
    onnx_model: LoadedModel, path: str, content_type: str | None
) -> None:
    app = make_app(onnx_model)
    body = json.dumps(infer_body([SETOSA, VIRGINICA], shape=[2, 4])).encode()
    fast, flask_only, handed_over = both_paths(
        app, path, body, {"Content-Type": content_type} if content_type else None
    )
    assert handed_over == 0
    assert fast == flask_only
    assert fast.status == "200 OK"
    assert json.loads(fast.body)["outputs"][0]["data"] == [0, 2]


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        (INFER, b"{", None),
        (INFER, json.dumps(infer_body(shape=[1, 3])).encode(), None),
        (INFER, json.dumps(infer_body()).encode(), {"Inference-Header-Content-Length": "10"}),
        (INFER, b" " * (LIMIT + 1), None),
        ("/v2/models/other/infer", json.dumps(infer_body()).encode(), None),
        ("/v2/models/iris/versions/0x2/infer", json.dumps(infer_body()).encode(), None),
        ("/v2/models/iris/versions/W/%220x1%22/infer", json.dumps(infer_body()).encode(), None),
    ],
)
def test_what_the_wsgi_fast_path_does_not_answer_gets_flasks_answer(
    onnx_model: LoadedModel, path: str, body: bytes, headers: dict[str, str] | None
) -> None:
    fast, flask_only, handed_over = both_paths(make_app(onnx_model), path, body, headers)
    assert handed_over == 1
    assert fast == flask_only
    assert fast.status[0] == "4"
    assert list(json.loads(fast.body)) == ["error"]


def test_the_asgi_fast_path_answers_infer_as_the_wsgi_app_does(onnx_model: LoadedModel) -> None:
    app = create_asgi_app(ServingConfig(model=None, max_request_bytes=LIMIT, model_name="iris"), model=onnx_model)
    wsgi = make_app(onnx_model, info=None).test_client()
    bodies = [
        json.dumps(infer_body([SETOSA, VIRGINICA], shape=[2, 4], datatype="FP64")).encode(),
        json.dumps(infer_body(shape=[1, 3])).encode(),
        b"not json",
        b" " * (LIMIT + 1),
    ]
    for body in bodies:
        status, headers, answer = asgi_request(app, "POST", INFER, body, chunks=2)
        expected = wsgi.post(INFER, data=body)
        assert (status, json.loads(answer)) == (expected.status_code, expected.get_json())
        assert headers["content-type"] == "application/json"
    octets = [(b"content-type", b"application/octet-stream"), (b"content-length", b"17")]
    status, _, answer = asgi_request(app, "POST", INFER, b'{"inputs": [{}]} ', octets)
    assert status == 400  # no Content-Type rule for infer: the body is read as JSON all the same
    binary = [(b"content-length", b"2"), (b"inference-header-content-length", b"2")]
    status, _, answer = asgi_request(app, "POST", INFER, b"{}", binary)
    assert (status, json.loads(answer)["error"][:33]) == (400, "the binary tensor data extension ")
    status, _, text = asgi_request(app, "GET", "/metrics", headers=[])
    assert b'modelapp_http_requests_total{endpoint="/v2/models/{model}/infer",method="POST",status="200"} 1.0' in text
    assert b'modelapp_http_requests_total{endpoint="/v2/models/{model}/infer",method="POST",status="400"} 4.0' in text


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v2", "/v2"),
        ("/v2/health/ready", "/v2/health/ready"),
        ("/v2/models/iris/infer", V2_INFER_ENDPOINT),
        ("/v2/models/iris/versions/0x1/infer", V2_INFER_ENDPOINT),
        ("/v2/models/iris/ready", V2_MODEL_READY_ENDPOINT),
        ("/v2/models/anything", V2_MODEL_METADATA_ENDPOINT),
        ("/v2/repository/index", "other"),
        ("/predict", "/predict"),
    ],
)
def test_metrics_label_v2_endpoints_by_template(path: str, label: str) -> None:
    assert endpoint_label(path) == label


# --- fuzz ---------------------------------------------------------------------------------------------------

tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "x"]),
        "shape": st.lists(st.integers(min_value=-1, max_value=5), max_size=3) | json_values,
        "datatype": st.sampled_from([*DATATYPES, "FLOAT"]) | json_values,
        "data": st.lists(st.floats() | st.integers() | st.booleans(), max_size=12) | json_values,
    }
)
infer_bodies = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"inputs": st.lists(tensors, max_size=2)}).map(json.dumps),
    st.fixed_dictionaries({"inputs": json_values, "id": json_values, "outputs": json_values}).map(json.dumps),
    st.binary(max_size=300),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=infer_bodies)
def test_fuzzed_infer_bodies_get_a_200_or_a_400_and_the_fast_path_agrees(
    onnx_model: LoadedModel, body: str | bytes
) -> None:
    data = body.encode() if isinstance(body, str) else body
    fast, flask_only, _ = both_paths(fuzz_app(onnx_model), INFER, data)
    assert fast == flask_only
    assert fast.status[:3] in ("200", "400"), fast
    if fast.status[:3] == "200":
        (output,) = json.loads(fast.body)["outputs"]
        assert output["shape"] == [len(output["data"])]
        assert math.prod(output["shape"]) >= 1


_FUZZ_APPS: dict[int, Flask] = {}


def fuzz_app(model: LoadedModel) -> Flask:
    return _FUZZ_APPS.setdefault(id(model), make_app(model))
