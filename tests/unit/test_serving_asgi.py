"""The ASGI app (MODELAPP_WORKER_CLASS=asgi): /predict on the event loop answers exactly as the WSGI app does,
everything else is the Flask app's answer, and /metrics counts both."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from modelapp_serving.config import ModelFormat, ServingConfig
from modelapp_serving.model import LoadedModel, load_model_file
from modelapp_serving.sample_model import write_sample_models
from modelapp_serving.web import AsgiPredictApp, create_app, create_asgi_app

pytestmark = pytest.mark.unit

SETOSA = [5.1, 3.5, 1.4, 0.2]
LIMIT = 4096


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory: Path = tmp_path_factory.mktemp("sample")
    write_sample_models(directory)
    return load_model_file(directory / "iris.onnx", ModelFormat.ONNX, allow_pickle=False)


def asgi_app(model: LoadedModel) -> AsgiPredictApp:
    return create_asgi_app(ServingConfig(model=None, max_request_bytes=LIMIT), model=model)


def request(
    app: AsgiPredictApp,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    chunks: int = 1,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request through the ASGI app, the body in `chunks` messages; (status, headers, body)."""
    if headers is None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    size = max(1, -(-len(body) // chunks))
    parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages = [
        {"type": "http.request", "body": part, "more_body": index < len(parts) - 1} for index, part in enumerate(parts)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, answer


def test_predict_is_answered_as_the_wsgi_app_answers(onnx_model: LoadedModel) -> None:
    app = asgi_app(onnx_model)
    body = json.dumps({"instances": [SETOSA, SETOSA]}).encode()
    status, headers, answer = request(app, "POST", "/predict", body, chunks=3)
    wsgi = create_app(ServingConfig(model=None, max_request_bytes=LIMIT), model=onnx_model).test_client()
    expected = wsgi.post("/predict", data=body, content_type="application/json")
    assert (status, answer) == (expected.status_code, expected.get_data())
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(answer))


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b'{"instance": [1]}', None, 400),
        (b"not json", None, 400),
        (b'{"instance": [1]}', [(b"content-type", b"text/plain"), (b"content-length", b"17")], 415),
        (b"x" * (LIMIT + 1), None, 413),
        (b'{"instance": [1, 2, 3, 4]}', [(b"content-type", b"application/json"), (b"content-length", b"99")], 400),
    ],
)
def test_what_the_fast_path_does_not_answer_gets_flasks_answer(
    onnx_model: LoadedModel, body: bytes, headers: list[tuple[bytes, bytes]] | None, status: int
) -> None:
    got, _, answer = request(asgi_app(onnx_model), "POST", "/predict", body, headers)
    assert got == status
    assert json.loads(answer)["status"] == status


def test_other_routes_and_the_metrics_of_both_paths(onnx_model: LoadedModel) -> None:
    app = asgi_app(onnx_model)
    for _ in range(2):
        assert request(app, "POST", "/predict", json.dumps({"instance": SETOSA}).encode())[0] == 200
    assert request(app, "POST", "/predict", b'{"instance": [1]}')[0] == 400
    assert request(app, "GET", "/readyz", headers=[])[0] == 200
    status, _, text = request(app, "GET", "/metrics", headers=[])
    assert status == 200
    assert b'modelapp_http_requests_total{endpoint="/predict",method="POST",status="200"} 2.0' in text
    assert b'modelapp_http_requests_total{endpoint="/predict",method="POST",status="400"} 1.0' in text


def test_lifespan_starts_and_stops(onnx_model: LoadedModel) -> None:
    app = asgi_app(onnx_model)
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
