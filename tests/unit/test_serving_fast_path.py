"""The WSGI fast path for POST /predict answers exactly as the Flask route does, and is counted in /metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest
from flask import Flask
from modelapp_serving.config import ModelFormat, ModelSpec, ServingConfig
from modelapp_serving.model import LoadedModel, load_model_file
from modelapp_serving.sample_model import write_sample_models
from modelapp_serving.web import MetricsMiddleware, PredictFastPath, create_app, get_serving
from werkzeug.test import EnvironBuilder, run_wsgi_app

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

pytestmark = pytest.mark.unit

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]
LIMIT = 4096


@dataclass(frozen=True)
class Answer:
    status: str
    headers: list[tuple[str, str]]
    body: bytes


class RecordingFallback:
    """Stands between the fast path and Flask and counts the requests handed over."""

    def __init__(self, wrapped: WSGIApplication) -> None:
        self.wrapped = wrapped
        self.calls = 0

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        self.calls += 1
        return self.wrapped(environ, start_response)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory: Path = tmp_path_factory.mktemp("sample")
    write_sample_models(directory)
    return load_model_file(directory / "iris.onnx", ModelFormat.ONNX, allow_pickle=False)


def make_app(model: LoadedModel | None) -> tuple[Flask, PredictFastPath, RecordingFallback]:
    if model is None:
        spec = ModelSpec(
            url="https://acct.blob.core.windows.net/m/iris.onnx",
            etag='"0x1"',
            sha256="ab" * 32,
            format=ModelFormat.ONNX,
        )
        app = create_app(ServingConfig(model=spec, max_request_bytes=LIMIT), load_in_background=False)
    else:
        app = create_app(ServingConfig(model=None, max_request_bytes=LIMIT), model=model)
    fast_path = get_serving(app).predict_fast_path
    assert fast_path is not None
    recorder = RecordingFallback(fast_path.fallback)
    fast_path.fallback = recorder
    return app, fast_path, recorder


def call(application: WSGIApplication, environ: WSGIEnvironment) -> Answer:
    app_iter, status, headers = run_wsgi_app(application, environ, buffered=True)
    return Answer(status, sorted(headers.items()), b"".join(app_iter))


def environ_for(body: bytes, content_type: str = "application/json", **overrides: Any) -> WSGIEnvironment:
    environ: WSGIEnvironment = EnvironBuilder(
        path="/predict", method="POST", data=body, content_type=content_type
    ).get_environ()
    for key, value in overrides.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return environ


def both_paths(
    app: Flask, recorder: RecordingFallback, body: bytes, content_type: str = "application/json", **overrides: Any
) -> tuple[Answer, Answer, int]:
    """(through the app with the fast path, straight to Flask, requests the fast path handed to Flask)."""
    before = recorder.calls
    with_fast_path = call(app.wsgi_app, environ_for(body, content_type, **overrides))
    handed_over = recorder.calls - before
    flask_only = call(recorder.wrapped, environ_for(body, content_type, **overrides))
    return with_fast_path, flask_only, handed_over


@pytest.mark.parametrize(
    ("payload", "content_type"),
    [
        ({"instance": SETOSA}, "application/json"),
        ({"instances": [SETOSA, VIRGINICA, [1, 2, 3, 4]]}, "application/json"),
        ({"instances": [SETOSA]}, "application/json; charset=utf-8"),
        ({"instances": [SETOSA]}, "Application/JSON"),
        ({"instances": [VIRGINICA]}, "application/vnd.iris+json"),
    ],
)
def test_good_input_is_answered_without_flask_and_exactly_as_flask(
    onnx_model: LoadedModel, payload: Any, content_type: str
) -> None:
    app, _, recorder = make_app(onnx_model)
    fast, flask_only, handed_over = both_paths(app, recorder, json.dumps(payload).encode(), content_type)
    assert handed_over == 0
    assert fast == flask_only
    assert fast.status == "200 OK"
    assert json.loads(fast.body)["predictions"][0] in (0, 2)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"instance": [1.0, 2.0, 3.0]}).encode(),
        json.dumps({"instances": [[1, 2, 3, 4], [1, 2, 3]]}).encode(),
        json.dumps({"instance": ["a", 2, 3, 4]}).encode(),
        json.dumps({"instance": [True, 2, 3, 4]}).encode(),
        json.dumps({"instance": [1e39, 2, 3, 4]}).encode(),
        json.dumps({"instances": []}).encode(),
        json.dumps({"instance": [[1, 2, 3, 4]]}).encode(),
        json.dumps({"rows": [SETOSA]}).encode(),
        json.dumps([SETOSA]).encode(),
        b'{"instance": [NaN, 1, 2, 3]}',
        b"{not json",
        b"\xff\xfe\x00",
    ],
)
def test_bad_input_goes_to_flask_and_gets_its_400(onnx_model: LoadedModel, body: bytes) -> None:
    app, _, recorder = make_app(onnx_model)
    fast, flask_only, handed_over = both_paths(app, recorder, body)
    assert handed_over == 1
    assert fast == flask_only
    assert fast.status.startswith("400")
    assert json.loads(fast.body)["status"] == 400


@pytest.mark.parametrize(
    ("content_type", "overrides", "status"),
    [
        ("text/plain", {}, "415"),
        ("", {}, "415"),
        ("application/json", {"CONTENT_LENGTH": None}, "400"),  # no length: Flask reads no body
        ("application/json", {"CONTENT_LENGTH": "0"}, "400"),
        ("application/json", {"CONTENT_LENGTH": "12x"}, "400"),
        ("application/json", {"HTTP_TRANSFER_ENCODING": "chunked"}, "400"),
    ],
)
def test_requests_the_fast_path_does_not_take_get_flasks_answer(
    onnx_model: LoadedModel, content_type: str, overrides: dict[str, Any], status: str
) -> None:
    app, _, recorder = make_app(onnx_model)
    body = json.dumps({"instance": SETOSA}).encode()
    fast, flask_only, handed_over = both_paths(app, recorder, body, content_type, **overrides)
    assert handed_over == 1
    assert fast == flask_only
    assert fast.status.startswith(status)


def test_body_shorter_than_its_content_length_is_flasks_400(onnx_model: LoadedModel) -> None:
    app, _, recorder = make_app(onnx_model)
    body = json.dumps({"instance": SETOSA}).encode()
    fast, flask_only, handed_over = both_paths(app, recorder, body, CONTENT_LENGTH=str(len(body) + 10))
    assert handed_over == 1
    assert fast == flask_only
    assert fast.status.startswith("400")


def test_oversize_body_is_flasks_413(onnx_model: LoadedModel) -> None:
    app, _, recorder = make_app(onnx_model)
    body = json.dumps({"instances": [SETOSA] * 400}).encode()
    assert len(body) > LIMIT
    fast, flask_only, handed_over = both_paths(app, recorder, body)
    assert handed_over == 1
    assert fast == flask_only
    assert fast.status.startswith("413")
    assert f"{LIMIT} bytes" in json.loads(fast.body)["error"]


def test_not_ready_is_flasks_503_then_the_fast_path_takes_over(onnx_model: LoadedModel) -> None:
    app, _, recorder = make_app(None)
    body = json.dumps({"instance": SETOSA}).encode()
    fast, flask_only, handed_over = both_paths(app, recorder, body)
    assert handed_over == 1
    assert fast == flask_only
    assert fast.status.startswith("503")
    assert ("Retry-After", "5") in fast.headers

    get_serving(app).state.set_ready(onnx_model)

    fast, flask_only, handed_over = both_paths(app, recorder, body)
    assert handed_over == 0
    assert fast == flask_only
    assert json.loads(fast.body) == {"predictions": [0]}


def test_other_routes_and_methods_go_to_flask(onnx_model: LoadedModel) -> None:
    app, _, recorder = make_app(onnx_model)
    client = app.test_client()
    assert client.get("/predict").status_code == 405
    assert client.post("/predict/", json={"instance": SETOSA}).status_code in (308, 404)
    assert client.get("/healthz").status_code == 200
    assert recorder.calls == 3


class ExplodingModel:
    n_features = 4
    input_dtype = np.dtype(np.float32)
    fixed_batch_size = None

    def predict(self, features: npt.NDArray[Any]) -> list[Any]:
        raise RuntimeError("secret internal detail")


def test_unexpected_error_is_the_json_500_without_trace(caplog: pytest.LogCaptureFixture) -> None:
    app, _, recorder = make_app(ExplodingModel())
    body = json.dumps({"instance": SETOSA}).encode()
    with caplog.at_level(logging.ERROR, logger="modelapp_serving"):
        fast, flask_only, handed_over = both_paths(app, recorder, body)
    assert handed_over == 0
    assert fast == flask_only
    assert fast.status == "500 INTERNAL SERVER ERROR"
    assert json.loads(fast.body) == {"error": "internal error", "status": 500}
    assert b"secret" not in fast.body
    assert caplog.text.count("unhandled error on POST /predict") == 2  # once by each path
    assert "secret internal detail" in caplog.text


def test_metrics_count_and_time_fast_path_requests(onnx_model: LoadedModel) -> None:
    app, _, recorder = make_app(onnx_model)
    client = app.test_client()
    for _ in range(3):
        assert client.post("/predict", json={"instance": SETOSA}).status_code == 200
    assert client.post("/predict", json={"instance": [1]}).status_code == 400
    assert recorder.calls == 1
    text = client.get("/metrics").get_data(as_text=True)
    assert 'modelapp_http_requests_total{endpoint="/predict",method="POST",status="200"} 3.0' in text
    assert 'modelapp_http_requests_total{endpoint="/predict",method="POST",status="400"} 1.0' in text
    assert 'modelapp_http_request_duration_seconds_count{endpoint="/predict"} 4.0' in text


def test_metrics_stay_right_past_the_remembered_label_sets(
    onnx_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(MetricsMiddleware, "MAX_CACHED_LABEL_SETS", 2)
    app, _, _ = make_app(onnx_model)
    client = app.test_client()
    for _ in range(2):
        for index in range(5):
            client.open("/healthz", method=f"X{index}")
    text = client.get("/metrics").get_data(as_text=True)
    for index in range(5):
        assert f'modelapp_http_requests_total{{endpoint="/healthz",method="X{index}",status="405"}} 2.0' in text
