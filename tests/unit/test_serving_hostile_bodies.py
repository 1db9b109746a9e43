"""Hostile bodies on every endpoint that reads one (POST /predict and the V2 infer endpoints), through the WSGI
app (gunicorn's gthread and sync workers) and the ASGI app (its fast path, and Flask behind a2wsgi): deeply
nested JSON anywhere in the document is a 400 JSON answer, never a 500; a body past the limit is a 413, with or
without a Content-Length."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from modelapp_serving.config import ModelFormat, ServingConfig
from modelapp_serving.model import LoadedModel, load_model_file
from modelapp_serving.sample_model import write_sample_models
from modelapp_serving.web import AsgiPredictApp, create_app, create_asgi_app

from tests.unit.test_serving_asgi import request as asgi_request

pytestmark = pytest.mark.unit

LIMIT = 1 << 20
INFER = "/v2/models/model/infer"
ENDPOINTS = ("/predict", INFER)
# Depths around numpy's 64 dimensions, Python's recursion limit (1,000) and far past it.
DEPTHS = (63, 64, 65, 500, 990, 1_000, 5_000, 100_000)


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def tensor(**fields: str) -> str:
    """A V2 inference request whose one input has `fields` (raw JSON) over a well-formed FP32 [1, 4] tensor."""
    parts = {"name": '"input"', "shape": "[1,4]", "datatype": '"FP32"', "data": "[1,2,3,4]", **fields}
    return '{"inputs":[{' + ",".join(f'"{key}":{value}' for key, value in parts.items()) + "}]}"


# Where a nested value can sit in each endpoint's document: (endpoint, body of that depth). Infer ignores
# `parameters` (oip.py), so there a depth the JSON parser takes is answered (200); any other is a 400.
PLACES: dict[str, tuple[str, Callable[[int], str]]] = {
    "predict instances": ("/predict", lambda depth: '{"instances":' + nested(depth) + "}"),
    "predict instance": ("/predict", lambda depth: '{"instance":' + nested(depth) + "}"),
    "predict booleans": ("/predict", lambda depth: '{"instances":' + nested(depth, "true") + "}"),
    "predict objects in a row": ("/predict", lambda depth: '{"instances":[' + nested_objects(depth) + "]}"),
    "predict top-level list": ("/predict", nested),
    "predict unknown key": ("/predict", lambda depth: '{"other":' + nested_objects(depth) + "}"),
    "infer data": (INFER, lambda depth: tensor(data=nested(depth))),
    "infer BYTES data": (INFER, lambda depth: tensor(datatype='"BYTES"', data=nested(depth, '"a"'))),
    "infer shape": (INFER, lambda depth: tensor(shape=nested(depth))),
    "infer input name": (INFER, lambda depth: tensor(name=nested(depth))),
    "infer datatype": (INFER, lambda depth: tensor(datatype=nested_objects(depth))),
    "infer parameters": (INFER, lambda depth: tensor(parameters=nested_objects(depth))),
    "infer id": (INFER, lambda depth: '{"id":' + nested(depth) + "}"),
    "infer outputs": (INFER, lambda depth: '{"outputs":[{"name":' + nested(depth) + '}],"inputs":[]}'),
    "infer inputs": (INFER, lambda depth: '{"inputs":' + nested(depth) + "}"),
}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory: Path = tmp_path_factory.mktemp("sample")
    write_sample_models(directory)
    return load_model_file(directory / "iris.onnx", ModelFormat.ONNX, allow_pickle=False)


@pytest.fixture(scope="module")
def wsgi_app(onnx_model: LoadedModel) -> Flask:
    return create_app(ServingConfig(model=None, max_request_bytes=LIMIT), model=onnx_model)


@pytest.fixture(scope="module")
def asgi_app(onnx_model: LoadedModel) -> AsgiPredictApp:
    return create_asgi_app(ServingConfig(model=None, max_request_bytes=LIMIT), model=onnx_model)


def assert_json_400(status: int, body: bytes, what: str, *, ignored: bool = False) -> None:
    """A 400 with a JSON error; where the value is ignored, a 200 is right too."""
    if ignored and status == 200:
        assert "outputs" in json.loads(body)
        return
    assert status == 400, f"{what}: {status} {body[:200]!r}"
    assert isinstance(json.loads(body)["error"], str)


@pytest.mark.parametrize("place", PLACES)
def test_deeply_nested_json_is_a_400_everywhere(
    wsgi_app: Flask, asgi_app: AsgiPredictApp, caplog: pytest.LogCaptureFixture, place: str
) -> None:
    endpoint, body_of = PLACES[place]
    client = wsgi_app.test_client()
    with caplog.at_level(logging.ERROR):
        for depth in DEPTHS:
            body = body_of(depth)
            answer = client.post(endpoint, data=body, content_type="application/json")
            ignored = place == "infer parameters"
            assert_json_400(answer.status_code, answer.data, f"WSGI, depth {depth}", ignored=ignored)
            status, _, answer_body = asgi_request(asgi_app, "POST", endpoint, body.encode())
            assert_json_400(status, answer_body, f"ASGI, depth {depth}", ignored=ignored)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], "an unhandled error"


def oversized(endpoint: str) -> bytes:
    row = "[5.1,3.5,1.4,0.2]"
    rows = ",".join([row] * (LIMIT // len(row) + 1))
    if endpoint == "/predict":
        return ('{"instances":[' + rows + "]}").encode()
    return tensor(shape="[-1,4]", data="[" + rows + "]").encode()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_chunked_body_past_the_limit_is_a_413_not_a_cut_body(
    wsgi_app: Flask, asgi_app: AsgiPredictApp, endpoint: str
) -> None:
    """No Content-Length: werkzeug stops reading at the limit, and the rest used to be taken for bad JSON."""
    body = oversized(endpoint)
    answer = wsgi_app.test_client().post(
        endpoint,
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked"},
        content_type="application/json",
        environ_overrides={"wsgi.input_terminated": True},  # as gunicorn's workers say of every body
    )
    assert answer.status_code == 413 and "limit" in answer.get_json()["error"]
    chunked = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]
    status, _, answer_body = asgi_request(asgi_app, "POST", endpoint, body, headers=chunked, chunks=40)
    assert status == 413 and "limit" in json.loads(answer_body)["error"]
    # With a Content-Length past the limit, neither reads it.
    assert wsgi_app.test_client().post(endpoint, data=body, content_type="application/json").status_code == 413
    assert asgi_request(asgi_app, "POST", endpoint, body)[0] == 413


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_chunked_body_within_the_limit_is_answered(asgi_app: AsgiPredictApp, endpoint: str) -> None:
    """Through a2wsgi (the ASGI app's way to Flask) a chunked body used to arrive empty."""
    row = [5.1, 3.5, 1.4, 0.2]
    document = {"instances": [row]} if endpoint == "/predict" else json.loads(tensor())
    body = json.dumps(document).encode()
    chunked = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]
    status, _, answer_body = asgi_request(asgi_app, "POST", endpoint, body, headers=chunked, chunks=3)
    assert status == 200, answer_body
    assert answer_body == asgi_request(asgi_app, "POST", endpoint, body)[2]  # as with a Content-Length
