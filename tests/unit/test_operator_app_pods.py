"""clients/app_pods.py against real HTTP servers on loopback: the stable pods' shadow counts read from /metrics
(capped), the test set posted to a candidate, and which failures are the candidate's and which are "not yet"."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from modelapp_localstack.procs import free_port
from modelapp_operator.clients.app_pods import (
    METRICS_MAX_BYTES,
    AppPodsClient,
    CandidateUnreachable,
    TestSetError,
    parse_test_set,
    pod_base_urls,
)
from modelapp_operator.plan.release_gate import shadow_figures
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

pytestmark = pytest.mark.unit

CANDIDATE = "sha256:" + "2" * 64 + "/0x2"


def app_metrics() -> bytes:
    """What a stable pod's /metrics says: the app's own shadow series (same names, labels and buckets)."""
    registry = CollectorRegistry()
    comparisons = Counter("modelapp_shadow_comparisons", "", ["candidate", "outcome"], registry=registry)
    latency = Histogram("modelapp_shadow_latency_seconds", "", ["candidate"], registry=registry,
                        buckets=(0.001, 0.005, 0.05, 1.0))  # fmt: skip
    comparisons.labels(CANDIDATE, "agreed").inc(7)
    comparisons.labels(CANDIDATE, "disagreed").inc(3)
    comparisons.labels("sha256:" + "9" * 64 + "/0x9", "agreed").inc(100)  # an earlier candidate: never counted
    for seconds in (0.0005, 0.002, 0.003, 0.04):
        latency.labels(CANDIDATE).observe(seconds)
    return generate_latest(registry)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[str, Handler]], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(routes: dict[str, Handler]) -> str:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_shadow_counts_are_summed_over_the_pods_and_a_silent_pod_is_named(serve: Any) -> None:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=app_metrics(), content_type="text/plain")

    pod = await serve({"/metrics": metrics})
    client = AppPodsClient(timeout_seconds=2)
    try:
        read = await client.shadow_samples([pod, pod, f"http://127.0.0.1:{free_port()}"])
    finally:
        await client.close()
    assert read.pods_read == 2 and len(read.errors) == 1
    figures = shadow_figures(read.samples, CANDIDATE)
    assert (figures.agreed, figures.disagreed, figures.compared) == (14, 6, 20)
    assert figures.p99_ms == 50.0  # the upper bound of the bucket holding it


async def test_a_metrics_body_past_its_cap_is_not_read(serve: Any) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(METRICS_MAX_BYTES // 65536 + 4):
            await response.write(b"# " + b"x" * 65534)
        return response

    pod = await serve({"/metrics": endless})
    client = AppPodsClient(timeout_seconds=5)
    try:
        read = await client.shadow_samples([pod])
    finally:
        await client.close()
    assert read.pods_read == 0 and "ResponseTooLarge" in read.errors[0]


async def test_the_test_set_is_posted_in_batches_and_a_bad_answer_is_the_candidates(serve: Any) -> None:
    seen: list[int] = []

    async def predict(request: web.Request) -> web.Response:
        rows = (await request.json())["instances"]
        seen.append(len(rows))
        return web.json_response({"predictions": [0] * len(rows)})

    async def another_pair(request: web.Request) -> web.Response:
        rows = (await request.json())["instances"]
        return web.json_response({"predictions": [1] * len(rows)}, headers={"ModelApp-Pair": "sha256:9/0x9"})

    async def broken(_: web.Request) -> web.Response:
        return web.json_response({"error": "boom"}, status=500)

    good, bad = await serve({"/predict": predict}), await serve({"/predict": broken})
    elsewhere = await serve({"/predict": another_pair})
    client = AppPodsClient(timeout_seconds=2)
    try:
        assert await client.predictions(good, [[1.0]] * 130) == [0] * 130
        with pytest.raises(TestSetError, match="answered 500"):
            await client.predictions(bad, [[1.0]])
        with pytest.raises(CandidateUnreachable, match="answered by sha256:9/0x9"):  # not the candidate's answer
            await client.predictions(elsewhere, [[1.0]], CANDIDATE)
        with pytest.raises(CandidateUnreachable):  # nothing listening yet: tried again next tick
            await client.predictions(f"http://127.0.0.1:{free_port()}", [[1.0]])
    finally:
        await client.close()
    assert seen == [64, 64, 2]


def test_a_test_set_must_be_rows_with_an_answer_each() -> None:
    assert parse_test_set(json.dumps({"instances": [[1], [2]], "expected": [0, 1]}).encode()).expected == (0, 1)
    for body, message in (
        (b"not json", "not JSON"),
        (b"[]", "must be an object"),
        (json.dumps({"instances": [[1]], "expected": []}).encode(), "1 instances and 0 expected"),
        (json.dumps({"instances": [], "expected": []}).encode(), "non-empty"),
    ):
        with pytest.raises(TestSetError, match=message):
            parse_test_set(body)


def test_only_running_pods_with_an_address_are_read() -> None:
    pods = [
        {"status": {"phase": "Running", "podIP": "10.244.0.4"}},
        {"status": {"phase": "Pending", "podIP": "10.244.0.5"}},
        {"status": {"phase": "Running"}},
        {"status": {"phase": "Running", "podIP": "fd00::5"}},
    ]
    assert pod_base_urls(pods, 8080) == ["http://10.244.0.4:8080", "http://[fd00::5]:8080"]
