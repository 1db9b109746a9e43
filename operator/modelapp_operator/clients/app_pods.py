"""The ModelApp's own pods, as the release gate reads them: the stable pods' /metrics (their shadow
counts) and the candidate Service's /predict (the test set). Facts only; plan/gate.py judges them.

Why the operator reads the pods directly instead of asking Prometheus: the gate must work where no
Prometheus runs, and a Prometheus that scrapes the same pods sees the same counters the gate used
(docs/serving-api.md). Every body is read up to a cap, every call has a time-out: these pods run a
tenant's image.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from modelapp_contract.agreement import Prediction
from modelapp_contract.container import PAIR_HEADER
from modelapp_operator.clients.limits import ResponseTooLarge, read_capped
from prometheus_client.parser import text_string_to_metric_families

METRICS_MAX_BYTES = 1 << 20  # one pod's /metrics: ~10 KiB with a few candidates' series
PREDICT_MAX_BYTES = 4 << 20  # one test-set batch's answer
TEST_SET_BATCH = 64  # rows per /predict request of the test set
SHADOW_METRIC_PREFIX = "modelapp_shadow_"
Sample = tuple[str, Mapping[str, str], float]  # (name, labels, value): what plan/release_gate.shadow_figures sums


@dataclass(frozen=True)
class PodMetrics:
    samples: tuple[Sample, ...]
    pods_read: int
    errors: tuple[str, ...]  # pods that did not answer (a restarting pod's counts are missing this tick)


class AppPodsClient:
    """One HTTP session for the gate's reads; close it with `close()`."""

    def __init__(self, *, timeout_seconds: float = 5.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No proxies from the environment: these are in-cluster addresses.
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def shadow_samples(self, pod_urls: Sequence[str]) -> PodMetrics:
        """The modelapp_shadow_* samples of every pod's /metrics (base URLs http://<pod IP>:<port>)."""
        results = await asyncio.gather(*(self._metrics(url) for url in pod_urls), return_exceptions=True)
        samples: list[Sample] = []
        errors: list[str] = []
        for url, result in zip(pod_urls, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(f"{url}: {type(result).__name__}: {result}"[:300])
            else:
                samples.extend(result)
        return PodMetrics(tuple(samples), len(pod_urls) - len(errors), tuple(errors))

    async def _metrics(self, base_url: str) -> list[Sample]:
        async with self._http().get(f"{base_url}/metrics") as response:
            if response.status != 200:
                raise RuntimeError(f"/metrics answered {response.status}")
            text = (await read_capped(response, METRICS_MAX_BYTES)).decode("utf-8", "replace")
        found: list[Sample] = []
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(SHADOW_METRIC_PREFIX):
                continue
            found.extend((sample.name, dict(sample.labels), float(sample.value)) for sample in family.samples)
        return found

    async def predictions(self, base_url: str, instances: Sequence[Any], pair: str | None = None) -> list[Prediction]:
        """The candidate's answers to the test set's rows, in batches; raises TestSetError when it fails one.

        pair: the candidate's ModelApp-Pair ("<digest>/<version>"): an answer naming another pair is not the
        candidate's (a pod of an earlier candidate still terminating behind the Service): CandidateUnreachable."""
        answers: list[Prediction] = []
        for start in range(0, len(instances), TEST_SET_BATCH):
            batch = list(instances[start : start + TEST_SET_BATCH])
            try:
                async with self._http().post(f"{base_url}/predict", json={"instances": batch}) as response:
                    body = await read_capped(response, PREDICT_MAX_BYTES)
                    status = response.status
                    answered_by = response.headers.get(PAIR_HEADER)
            except (aiohttp.ClientConnectionError, TimeoutError) as error:
                # Not reached (yet): the Service's new endpoints may still be on their way to the proxy.
                rows = f"rows {start}-{start + len(batch) - 1}"
                raise CandidateUnreachable(f"the candidate did not answer {rows}: {error}") from None
            except (aiohttp.ClientError, ResponseTooLarge) as error:
                raise TestSetError(
                    f"the candidate's answer to rows {start}-{start + len(batch) - 1}: {error}"
                ) from None
            if pair is not None and answered_by is not None and answered_by != pair:
                raise CandidateUnreachable(f"rows {start}-{start + len(batch) - 1} were answered by {answered_by}")
            if status != 200:
                raise TestSetError(f"the candidate answered {status} to rows {start}-{start + len(batch) - 1}")
            try:
                predictions = json.loads(body)["predictions"]
            except (ValueError, KeyError, TypeError):
                raise TestSetError("the candidate's answer has no predictions list") from None
            if not isinstance(predictions, list) or len(predictions) != len(batch):
                raise TestSetError(f"the candidate gave {len(predictions)} predictions for {len(batch)} rows")
            answers.extend(predictions)
        return answers


class TestSetError(Exception):
    """The test set could not be run against the candidate (an unreadable blob, a failing candidate)."""

    __test__ = False  # not a pytest test class


class CandidateUnreachable(Exception):
    """The candidate's Service took no connection or gave no answer in time: try again on the next tick."""


@dataclass(frozen=True)
class TestSet:
    __test__ = False

    instances: tuple[Any, ...]
    expected: tuple[Prediction, ...]


TEST_SET_MAX_ROWS = 10_000


def parse_test_set(body: bytes) -> TestSet:
    """{"instances": [[...], ...], "expected": [...]}: the same rows /predict takes, one expected answer each."""
    try:
        document = json.loads(body)
    except ValueError as error:
        raise TestSetError(f"the test set is not JSON: {error}") from None
    if not isinstance(document, Mapping):
        raise TestSetError('the test set must be an object {"instances": [...], "expected": [...]}')
    instances, expected = document.get("instances"), document.get("expected")
    if not isinstance(instances, list) or not isinstance(expected, list) or not instances:
        raise TestSetError('the test set needs non-empty lists "instances" and "expected"')
    if len(instances) != len(expected):
        raise TestSetError(f"the test set has {len(instances)} instances and {len(expected)} expected answers")
    if len(instances) > TEST_SET_MAX_ROWS:
        raise TestSetError(f"the test set has {len(instances)} rows, at most {TEST_SET_MAX_ROWS}")
    return TestSet(tuple(instances), tuple(expected))


def pod_base_urls(pods: Sequence[Mapping[str, Any]], port: int) -> list[str]:
    """http://<IP>:<port> of each running pod with an address (a pod that is gone or starting has no counts)."""
    urls = []
    for pod in pods:
        status = pod.get("status") or {}
        address = status.get("podIP")
        if status.get("phase") == "Running" and isinstance(address, str) and address:
            host = f"[{address}]" if ":" in address else address
            urls.append(f"http://{host}:{port}")
    return urls
