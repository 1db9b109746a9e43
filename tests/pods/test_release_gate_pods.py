"""The release gate on real pods (issue 20): a candidate pair runs beside the stable pair under a steady
load through the Service; a model whose labels are permuted is kept out (by shadow agreement, or by a test
set with no live traffic), a good one takes every user in one selector switch. Every user answer names the
pair that gave it (the ModelApp-Pair header), so "no user answer from the candidate" is checked answer by
answer."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from modelapp_localstack import Azurite, KubeCluster
from modelapp_localstack.incluster import TENANT_NAMESPACE, InClusterOperator

from tests.pods.conftest import Image
from tests.pods.load import SAMPLE_ROWS, ServiceLoad
from tests.pods.test_real_pods import (
    MIN_RATE,
    MODELS_CONTAINER,
    _expected,
    _get,
    _labels,
    _modelapp,
    _publish,
    _ready_with,
    _service_address,
    _wait,
)

pytestmark = pytest.mark.pods


@pytest.fixture(scope="module")
def deeper_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another good model (a three-level tree): the same answers as v1 on the load's rows, another version."""
    from modelapp_localstack.demo import train_model

    return train_model(tmp_path_factory.mktemp("deeper"), 3)


@pytest.fixture(scope="module")
def permuted_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid model whose every answer is wrong: trained on the labels shifted by one."""
    from modelapp_serving.sample_model import export_onnx, train_iris_classifier

    return export_onnx(train_iris_classifier(label_shift=1), tmp_path_factory.mktemp("permuted") / "iris.onnx")


def gated(name: str, image: Image, azurite: Azurite, blob: str, release: dict[str, Any]) -> dict[str, Any]:
    return _modelapp(name, image, azurite, blob, release={"strategy": "Gated", "timeoutSeconds": 300, **release})


def start_gated(
    kube: KubeCluster,
    azurite: Azurite,
    image: Image,
    operator: InClusterOperator,
    model: Path,
    prefix: str,
    release: dict[str, Any],
) -> tuple[str, str, str]:
    """A Gated ModelApp Ready on `model`: (name, blob, the model's ETag)."""
    name = f"{prefix}-{uuid.uuid4().hex[:5]}"
    blob = f"{name}/model.onnx"
    etag = _publish(azurite, model, blob)
    kube.kubectl("apply", "-f", "-", input=json.dumps(gated(name, image, azurite, blob, release)))
    _ready_with(kube, name, operator, version=etag)
    return name, blob, etag


def gate_of(kube: KubeCluster, name: str) -> dict[str, Any]:
    return dict((_get(kube, "modelapp", name).get("status") or {}).get("gate") or {})


def wait_phase(
    kube: KubeCluster, name: str, operator: InClusterOperator, *phases: str, timeout: float = 300
) -> dict[str, Any]:
    def in_phase() -> dict[str, Any] | None:
        gate = gate_of(kube, name)
        return gate if gate.get("phase") in phases else None

    return _wait(f"gate of {name} in {phases}", in_phase, operator, timeout)


def events(kube: KubeCluster, name: str) -> list[dict[str, Any]]:
    listed = kube.kubectl("get", "events", "-n", TENANT_NAMESPACE, "--field-selector",
                          f"involvedObject.kind=ModelApp,involvedObject.name={name}", "-o", "json").stdout  # fmt: skip
    items: list[dict[str, Any]] = json.loads(listed)["items"]
    return items


def candidate_exists(kube: KubeCluster, name: str) -> bool:
    found = kube.kubectl("get", "deployment", f"{name}-candidate", "-n", TENANT_NAMESPACE, check=False)
    return found.returncode == 0


def assert_rejected_and_stable(
    kube: KubeCluster, operator: InClusterOperator, name: str, stable_etag: str, gate: dict[str, Any]
) -> None:
    body = _get(kube, "modelapp", name)
    status = body["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True", conditions
    assert status["model"]["version"] == stable_etag
    head = status["history"][0]
    assert head["outcome"] == "Rejected" and head["reason"] == "GateRejected" and head["failure"] == gate["message"]
    assert status["failedPairs"][0]["reason"] == "GateRejected"
    warnings = [e for e in events(kube, name) if e["reason"] == "GateRejected"]
    assert warnings and warnings[0]["type"] == "Warning" and gate["message"] in warnings[0]["message"]
    _wait("the candidate removed", lambda: not candidate_exists(kube, name), operator, 60)


def test_a_permuted_model_is_kept_out_by_shadow_agreement_under_load(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
    permuted_model: Path,
) -> None:
    release = {"shadow": {"minAgreement": 0.95, "minSamples": 100},
               "health": {"maxErrorRate": 0.05, "maxP99Milliseconds": 5000, "minRequests": 100}}  # fmt: skip
    name, blob, v1 = start_gated(
        kube, azurite, app_image, incluster_operator, model_files["v1"], "gate-shadow", release
    )
    load = ServiceLoad(*_service_address(kube, name)).start()
    try:
        time.sleep(3)
        permuted = _publish(azurite, permuted_model, blob)
        wait_phase(kube, name, incluster_operator, "Testing")
        gate = wait_phase(kube, name, incluster_operator, "Rejected", "Promoting", "Promoted")
        time.sleep(3)
    finally:
        load.stop()
    summary = load.summary()
    print(f"permuted model behind the shadow gate, under load: {summary}; gate: {gate}")
    assert gate["phase"] == "Rejected", gate
    assert gate["message"].startswith("shadow: agreement 0.00 < 0.95 over "), gate
    assert gate["candidate"]["modelVersion"] == permuted
    assert summary["failed"] == 0 and summary["rate"] >= MIN_RATE, summary
    v1_answer = _expected(model_files["v1"])
    assert {json.dumps(_labels(a.predictions)) for a in load.answers if a.status == 200} == {json.dumps(v1_answer)}
    assert {a.pair.split("/", 1)[1] for a in load.answers if a.pair} == {v1.strip('"')}
    assert_rejected_and_stable(kube, incluster_operator, name, v1, gate)


def test_a_permuted_model_is_kept_out_by_its_test_set_without_live_traffic(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
    permuted_model: Path,
) -> None:
    test_set = {"instances": SAMPLE_ROWS, "expected": _expected(model_files["v1"])}
    name = f"gate-set-{uuid.uuid4().hex[:5]}"
    BlobServiceClient.from_connection_string(azurite.connection_string).get_blob_client(
        MODELS_CONTAINER, f"{name}/test-set.json"
    ).upload_blob(json.dumps(test_set).encode(), overwrite=True)
    release = {"testSet": {"blob": f"{name}/test-set.json", "minAccuracy": 0.9}}
    blob = f"{name}/model.onnx"
    v1 = _publish(azurite, model_files["v1"], blob)
    kube.kubectl("apply", "-f", "-", input=json.dumps(gated(name, app_image, azurite, blob, release)))
    _ready_with(kube, name, incluster_operator, version=v1)
    _publish(azurite, permuted_model, blob)
    gate = wait_phase(kube, name, incluster_operator, "Rejected", "Promoting", "Promoted")
    print(f"permuted model behind the test-set gate: {gate}")
    assert gate["phase"] == "Rejected", gate
    assert gate["message"] == "testSet: accuracy 0.00 < 0.90 over 3 rows", gate
    assert_rejected_and_stable(kube, incluster_operator, name, v1, gate)


def test_a_good_candidate_takes_every_user_in_one_switch(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
    deeper_model: Path,
) -> None:
    release = {"shadow": {"minAgreement": 0.95, "minSamples": 60}, "drainSeconds": 5}
    name, blob, v1 = start_gated(kube, azurite, app_image, incluster_operator, model_files["v1"], "gate-pass", release)
    load = ServiceLoad(*_service_address(kube, name)).start()
    try:
        time.sleep(3)
        again = _publish(azurite, deeper_model, blob)  # the same answers on the load's rows, a new version
        promoting = wait_phase(kube, name, incluster_operator, "Promoting", "Rejected")
        switched_seen = time.monotonic()
        assert promoting["phase"] == "Promoting", promoting
        promoted = wait_phase(kube, name, incluster_operator, "Promoted", timeout=300)
        body = _ready_with(kube, name, incluster_operator, version=again)
        served_at = time.monotonic()
        time.sleep(4)
    finally:
        load.stop()
    summary = load.summary()
    print(f"good candidate through the gate, under load: {summary}; gate: {promoted}")
    assert summary["failed"] == 0 and summary["rate"] >= MIN_RATE, summary
    assert body["status"]["history"][0]["modelVersion"] == again
    old, new = v1.strip('"'), again.strip('"')
    by_pair = [(a.at, a.pair.split("/", 1)[1]) for a in load.answers if a.pair]
    first_new = min(at for at, version in by_pair if version == new)
    last_old = max(at for at, version in by_pair if version == old)
    switch_lag = max(0.0, last_old - switched_seen)
    print(
        f"first answer from the candidate {first_new - switched_seen:+.1f}s after the switch was seen; the old "
        f"pair's last answer {switch_lag:.1f}s after it; {served_at - switched_seen:.1f}s until Ready on it"
    )
    # One step: once the new pair answers, the old one answers only within kube-proxy's propagation lag.
    assert last_old - first_new < 2.0, (last_old, first_new)
    assert all(version == new for at, version in by_pair if at > served_at)
    assert not candidate_exists(kube, name)
