"""Shadow traffic (app/modelapp_serving/shadow.py): a stable pod's ASGI app also sends /predict to a candidate
(a real HTTP server on loopback here), answers its user first and alone, and counts how the answers compared;
a slow, failing, absent or flooding candidate costs the user nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from modelapp_contract import container
from modelapp_contract.settings import ConfigError
from modelapp_serving.config import ModelFormat, ServingConfig, ShadowConfig
from modelapp_serving.metrics import ServingMetrics
from modelapp_serving.model import LoadedModel, load_model_file
from modelapp_serving.sample_model import write_sample_models
from modelapp_serving.shadow import Shadow
from modelapp_serving.shadow_header import pair_header
from modelapp_serving.web import create_asgi_app

pytestmark = pytest.mark.unit

SETOSA = [5.1, 3.5, 1.4, 0.2]
BODY = json.dumps({"instances": [SETOSA]}).encode()
STABLE_IMAGE = "registry.example/apps/iris@sha256:" + "a" * 64
CANDIDATE_PAIR = "sha256:" + "b" * 64 + "/0x1C357D7C6417470"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    directory: Path = tmp_path_factory.mktemp("sample")
    write_sample_models(directory)
    return load_model_file(directory / "iris.onnx", ModelFormat.ONNX, allow_pickle=False)


def answering(predictions: Any, *, status: int = 200, delay: float = 0.0, pair: str = CANDIDATE_PAIR) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"predictions": predictions}, status=status, headers={container.PAIR_HEADER: pair})

    return handler


async def candidate_server(handler: Handler) -> TestServer:
    app = web.Application()
    app.router.add_post("/predict", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def call(app: Any, path: str = "/predict", body: bytes = BODY) -> tuple[int, dict[str, str], bytes]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST" if body else "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), *(headers if body else [])],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, answer


def shadowing_app(model: LoadedModel, url: str, **shadow: Any) -> Any:
    config = ServingConfig(model=None, image=STABLE_IMAGE, shadow=ShadowConfig(url=url, percent=100.0, **shadow))
    return create_asgi_app(config, model=model)


async def settle(app: Any) -> None:
    """The shadow's comparisons under way done and its connections closed (what the lifespan's shutdown does)."""
    shadow: Shadow = app._shadow
    await shadow.close()


async def shadow_samples(app: Any) -> dict[tuple[str, ...], float]:
    status, _, text = await call(app, "/metrics", b"")
    assert status == 200
    samples: dict[tuple[str, ...], float] = {}
    for line in text.decode().splitlines():
        if line.startswith("modelapp_shadow_") and not line.startswith("#") and "_created" not in line:
            name, _, value = line.rpartition(" ")
            samples[(name,)] = float(value)
    return samples


def count(samples: dict[tuple[str, ...], float], metric: str, **labels: str) -> float:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return sum(v for (name,), v in samples.items() if name.startswith(metric + "{") and wanted in name)


def run(coroutine: Awaitable[Any]) -> Any:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_an_agreeing_candidate_is_counted_and_the_user_gets_the_stable_answer(onnx_model: LoadedModel) -> None:
    async def scenario() -> tuple[int, dict[str, str], bytes, dict[tuple[str, ...], float]]:
        server = await candidate_server(answering([0]))
        try:
            app = shadowing_app(onnx_model, str(server.make_url("")))
            results = [await call(app) for _ in range(5)]
            await settle(app)
            return (*results[-1], await shadow_samples(app))
        finally:
            await server.close()

    status, _, body, samples = run(scenario())
    assert status == 200 and json.loads(body) == {"predictions": [0]}
    assert count(samples, "modelapp_shadow_comparisons_total", candidate=CANDIDATE_PAIR, outcome="agreed") == 5
    assert count(samples, "modelapp_shadow_latency_seconds_count", candidate=CANDIDATE_PAIR) == 5


def test_a_candidate_with_permuted_labels_disagrees_and_no_user_sees_its_answer(onnx_model: LoadedModel) -> None:
    async def scenario() -> tuple[list[bytes], dict[tuple[str, ...], float]]:
        server = await candidate_server(answering([2]))  # setosa answered as virginica
        try:
            app = shadowing_app(onnx_model, str(server.make_url("")))
            bodies = [(await call(app))[2] for _ in range(4)]
            await settle(app)
            return bodies, await shadow_samples(app)
        finally:
            await server.close()

    bodies, samples = run(scenario())
    assert {json.loads(body)["predictions"][0] for body in bodies} == {0}
    assert count(samples, "modelapp_shadow_comparisons_total", candidate=CANDIDATE_PAIR, outcome="disagreed") == 4
    assert count(samples, "modelapp_shadow_comparisons_total", outcome="agreed") == 0


def test_a_failing_candidate_is_an_error_and_the_user_still_gets_200(onnx_model: LoadedModel) -> None:
    async def scenario() -> tuple[list[int], dict[tuple[str, ...], float]]:
        server = await candidate_server(answering(None, status=500))
        try:
            app = shadowing_app(onnx_model, str(server.make_url("")))
            statuses = [(await call(app))[0] for _ in range(3)]
            await settle(app)
            return statuses, await shadow_samples(app)
        finally:
            await server.close()

    statuses, samples = run(scenario())
    assert statuses == [200, 200, 200]
    assert count(samples, "modelapp_shadow_comparisons_total", candidate=CANDIDATE_PAIR, outcome="error") == 3


def test_a_slow_candidate_times_out_after_the_user_was_answered(onnx_model: LoadedModel) -> None:
    async def scenario() -> tuple[float, dict[tuple[str, ...], float]]:
        server = await candidate_server(answering([0], delay=2.0))
        try:
            app = shadowing_app(onnx_model, str(server.make_url("")), timeout_seconds=1.0)
            started = time.perf_counter()
            status, _, _ = await call(app)
            answered = time.perf_counter() - started
            assert status == 200
            await settle(app)
            return answered, await shadow_samples(app)
        finally:
            await server.close()

    answered, samples = run(scenario())
    assert answered < 0.5  # the user waited neither for the candidate (2 s) nor for the shadow's timeout (1 s)
    assert count(samples, "modelapp_shadow_comparisons_total", outcome="timeout") == 1


def test_no_candidate_listening_is_dropped_as_unreachable(onnx_model: LoadedModel) -> None:
    async def scenario() -> dict[tuple[str, ...], float]:
        server = await candidate_server(answering([0]))
        url = str(server.make_url(""))
        await server.close()  # the port is free again: nothing listens there
        app = shadowing_app(onnx_model, url)
        for _ in range(3):
            assert (await call(app))[0] == 200
        await settle(app)
        return await shadow_samples(app)

    samples = run(scenario())
    assert count(samples, "modelapp_shadow_dropped_total", reason="unreachable") == 3
    assert count(samples, "modelapp_shadow_comparisons_total") == 0


def test_past_its_slots_a_request_is_dropped_never_queued(onnx_model: LoadedModel) -> None:
    async def scenario() -> tuple[int, dict[tuple[str, ...], float]]:
        server = await candidate_server(answering([0], delay=1.0))  # longer than the 10 requests take
        try:
            app = shadowing_app(onnx_model, str(server.make_url("")), max_in_flight=2)
            for _ in range(10):
                assert (await call(app))[0] == 200
            peak = app._shadow.in_flight
            await settle(app)
            return peak, await shadow_samples(app)
        finally:
            await server.close()

    peak, samples = run(scenario())
    assert peak == 2
    assert count(samples, "modelapp_shadow_dropped_total", reason="overloaded") == 8
    assert count(samples, "modelapp_shadow_comparisons_total", outcome="agreed") == 2


def test_only_the_share_asked_for_is_sent() -> None:
    async def scenario() -> int:
        sent = 0

        async def counting(request: web.Request) -> web.StreamResponse:
            nonlocal sent
            sent += 1
            return web.json_response({"predictions": [0]})

        server = await candidate_server(counting)
        try:
            draws = iter([0.05, 0.5, 0.19, 0.2, 0.99] * 20)
            shadow = Shadow(
                ShadowConfig(url=str(server.make_url("")), percent=20.0, max_in_flight=100),
                ServingMetrics(),
                draw=lambda: next(draws),
            )
            for _ in range(100):
                shadow.offer(BODY, b'{"predictions": [0]}')
            await shadow.close()
            return sent
        finally:
            await server.close()

    assert run(scenario()) == 40  # draws under 0.20: two of every five


def test_a_candidate_answer_past_its_cap_is_an_error_not_read_whole() -> None:
    async def scenario() -> float | None:
        async def flooding(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={container.PAIR_HEADER: CANDIDATE_PAIR})
            await response.prepare(request)
            try:
                for _ in range(200):
                    await response.write(b" " * 65536)  # 12.5 MiB, past the 4 MiB cap
            except (ConnectionResetError, RuntimeError):
                pass
            return response

        server = await candidate_server(flooding)
        try:
            metrics = ServingMetrics()
            shadow = Shadow(ShadowConfig(url=str(server.make_url("")), percent=100.0), metrics)
            shadow.offer(BODY, b'{"predictions": [0]}')
            await shadow.close()
            return metrics.registry.get_sample_value(
                "modelapp_shadow_comparisons_total", {"candidate": CANDIDATE_PAIR, "outcome": "error"}
            )
        finally:
            await server.close()

    assert run(scenario()) == 1.0


def test_the_pair_header_names_the_image_digest_and_the_model_version() -> None:
    assert pair_header(STABLE_IMAGE, '"0x1C357D7C6417470"') == (
        b"modelapp-pair",
        b"sha256:" + b"a" * 64 + b"/0x1C357D7C6417470",
    )
    assert pair_header(None, '"0x1"') is None
    assert pair_header(STABLE_IMAGE, None) is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({container.SHADOW_URL: "10.0.0.7:80"}, container.SHADOW_URL),
        ({container.SHADOW_URL: "http://10.0.0.7:80/other"}, container.SHADOW_URL),
        ({container.SHADOW_URL: "http://10.0.0.7", container.SHADOW_PERCENT: "101"}, container.SHADOW_PERCENT),
        ({container.SHADOW_URL: "http://10.0.0.7", container.SHADOW_TOLERANCE: "-1"}, container.SHADOW_TOLERANCE),
        (
            {container.SHADOW_URL: "http://10.0.0.7", "MODELAPP_SHADOW_MAX_IN_FLIGHT": "0"},
            "MODELAPP_SHADOW_MAX_IN_FLIGHT",
        ),
    ],
)
def test_bad_shadow_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    base = {
        container.MODEL_URL: "https://acct.blob.core.windows.net/models/iris.onnx",
        container.MODEL_ETAG: '"0x1"',
        container.MODEL_SHA256: "c" * 64,
        container.MODEL_FORMAT: "onnx",
    }
    with pytest.raises(ConfigError, match=named):
        ServingConfig.from_env({**base, **env})


def test_no_shadow_url_means_no_shadow() -> None:
    base = {
        container.MODEL_URL: "https://acct.blob.core.windows.net/models/iris.onnx",
        container.MODEL_ETAG: '"0x1"',
        container.MODEL_SHA256: "c" * 64,
        container.MODEL_FORMAT: "onnx",
    }
    assert ServingConfig.from_env(base).shadow is None
    shadow = ServingConfig.from_env({**base, container.SHADOW_URL: "http://10.0.0.7:80"}).shadow
    assert shadow is not None and shadow.percent == 100.0 and shadow.predict_url == "http://10.0.0.7:80/predict"
