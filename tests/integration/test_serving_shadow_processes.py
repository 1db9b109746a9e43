"""Shadow traffic between two real serving processes (gunicorn, ASGI workers, models downloaded and verified
from Azurite): the stable one answers every user with its own model and counts, on its /metrics summed over its
workers, how the candidate's answers compared. A candidate with permuted labels disagrees on every request; a
candidate with the same model agrees on every one; a stopped candidate costs no request."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from modelapp_localstack import Azurite
from modelapp_serving.publish import PublishedModel, publish_model
from modelapp_serving.sample_model import write_sample_models
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_serving_oip_clients import own_answers
from tests.integration.test_serving_process_health import serve, stop, wait_for

pytestmark = pytest.mark.integration

STABLE_IMAGE = "registry.local/apps/iris@sha256:" + "a" * 64
CANDIDATE_IMAGE = "registry.local/apps/iris@sha256:" + "b" * 64
REQUESTS = 120


@dataclass(frozen=True)
class Models:
    v1: PublishedModel
    v1_file: Path
    permuted: PublishedModel


@pytest.fixture(scope="module")
def shadow_models(azurite: Azurite, tmp_path_factory: pytest.TempPathFactory) -> Models:
    container = f"{azurite.blob_endpoint}/shadow-{uuid.uuid4().hex[:10]}"
    v1 = write_sample_models(tmp_path_factory.mktemp("v1"))
    permuted = write_sample_models(tmp_path_factory.mktemp("permuted"), label_shift=1)
    return Models(
        v1=publish_model(v1.onnx, f"{container}/v1.onnx", connection_string=azurite.connection_string),
        v1_file=v1.onnx,
        permuted=publish_model(
            permuted.onnx, f"{container}/permuted.onnx", connection_string=azurite.connection_string
        ),
    )


@dataclass
class Pair:
    stable: int  # ports
    candidate: int
    servers: list[subprocess.Popen[bytes]]


def _serve(
    azurite: Azurite, model: PublishedModel, folder: Path, image: str, **env: str
) -> tuple[subprocess.Popen[bytes], int]:
    folder.mkdir()
    (folder / "prometheus").mkdir()
    server, port, _, _ = serve(
        azurite, model, folder, MODELAPP_IMAGE=image, PROMETHEUS_MULTIPROC_DIR=str(folder / "prometheus"), **env
    )
    return server, port


@pytest.fixture
def pair(request: pytest.FixtureRequest, azurite: Azurite, shadow_models: Models, tmp_path: Path) -> Iterator[Pair]:
    candidate_model = shadow_models.permuted if request.param == "permuted" else shadow_models.v1
    candidate, candidate_port = _serve(azurite, candidate_model, tmp_path / "candidate", CANDIDATE_IMAGE)
    servers = [candidate]
    try:
        stable, stable_port = _serve(
            azurite, shadow_models.v1, tmp_path / "stable", STABLE_IMAGE,
            MODELAPP_SHADOW_URL=f"http://127.0.0.1:{candidate_port}", MODELAPP_SHADOW_PERCENT="100",
        )  # fmt: skip
        servers.append(stable)
        for port in (candidate_port, stable_port):
            wait_for(f"http://127.0.0.1:{port}/readyz", 200)
        yield Pair(stable_port, candidate_port, servers)
    finally:
        for server in servers:
            stop(server)


def _rows(count: int) -> list[list[float]]:
    generator = np.random.default_rng(7)
    ranges = [(4.3, 7.9), (2.0, 4.4), (1.0, 6.9), (0.1, 2.5)]
    return [[round(float(generator.uniform(low, high)), 1) for low, high in ranges] for _ in range(count)]


def _predict(port: int, row: list[float]) -> tuple[int, list[int], str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict",
        data=json.dumps({"instances": [row]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())["predictions"], response.headers.get("ModelApp-Pair", "")


def _shadow_counts(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "modelapp_shadow_comparisons_total":
                counts[(sample.labels["candidate"], sample.labels["outcome"])] = sample.value
            elif sample.name == "modelapp_shadow_dropped_total":
                counts[("", f"dropped:{sample.labels['reason']}")] = sample.value
    return counts


def _settled(port: int, total: int) -> dict[tuple[str, str], float]:
    """The stable pod's counts once every shadowed request has an outcome (they finish after the answers)."""
    for _ in range(100):
        counts = _shadow_counts(port)
        if sum(counts.values()) >= total:
            return counts
        time.sleep(0.1)
    return _shadow_counts(port)


CANDIDATE_PAIR = "sha256:" + "b" * 64


@pytest.mark.parametrize("pair", ["permuted"], indirect=True)
def test_a_permuted_candidate_disagrees_on_every_request_and_users_get_only_stable_answers(
    pair: Pair, shadow_models: Models
) -> None:
    rows = _rows(REQUESTS)
    wanted = own_answers(shadow_models.v1_file, np.asarray(rows, dtype=np.float32))
    answers = [_predict(pair.stable, row) for row in rows]
    assert [status for status, _, _ in answers] == [200] * REQUESTS
    assert [labels[0] for _, labels, _ in answers] == wanted  # never the candidate's
    assert {header for _, _, header in answers} == {f"sha256:{'a' * 64}/{shadow_models.v1.etag.strip(chr(34))}"}
    counts = _settled(pair.stable, REQUESTS)
    candidate = f"{CANDIDATE_PAIR}/{shadow_models.permuted.etag.strip(chr(34))}"
    assert counts.get((candidate, "disagreed")) == REQUESTS, counts
    assert counts.get((candidate, "agreed"), 0) == 0


@pytest.mark.parametrize("pair", ["same"], indirect=True)
def test_a_candidate_with_the_same_model_agrees_and_a_stopped_one_costs_no_request(
    pair: Pair, shadow_models: Models
) -> None:
    rows = _rows(REQUESTS)
    assert all(_predict(pair.stable, row)[0] == 200 for row in rows)
    counts = _settled(pair.stable, REQUESTS)
    candidate = f"{CANDIDATE_PAIR}/{shadow_models.v1.etag.strip(chr(34))}"
    assert counts.get((candidate, "agreed")) == REQUESTS, counts

    stop(pair.servers[0])  # the candidate is gone: the stable pod answers as before
    assert all(_predict(pair.stable, row)[0] == 200 for row in rows[:20])
    counts = _settled(pair.stable, REQUESTS + 20)
    assert counts.get(("", "dropped:unreachable")) == 20, counts
