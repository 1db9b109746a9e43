"""The release gate on real pods (issue 20): a candidate pair runs beside the stable pair under a steady
load through the Service; a model whose labels are permuted is kept out (by shadow agreement, or by a test
set with no live traffic), a good one takes every user in one selector switch. Every user answer names the
pair that gave it (the ModelApp-Pair header), so "no user answer from the candidate" is checked answer by
answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from modelapp_localstack import Azurite, KubeCluster, Registry
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


def gated_under_load(
    kube: KubeCluster, azurite: Azurite, image: Image, operator: InClusterOperator, model: Path, prefix: str,
    release: dict[str, Any],
) -> tuple[str, str, str, ServiceLoad]:
    """start_gated, then a steady load through its Service: (name, blob, the model's ETag, the load)."""
    name, blob, etag = start_gated(kube, azurite, image, operator, model, prefix, release)
    return name, blob, etag, ServiceLoad(*_service_address(kube, name)).start()


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


def candidate_running(kube: KubeCluster, name: str) -> bool:
    """Whether the candidate Deployment has pods (a decided candidate is scaled to zero, not deleted)."""
    found = kube.kubectl("get", "deployment", f"{name}-candidate", "-n", TENANT_NAMESPACE, "-o", "json", check=False)
    if found.returncode != 0:
        return False
    deployment = json.loads(found.stdout)
    return bool(deployment["spec"].get("replicas") or (deployment.get("status") or {}).get("replicas"))


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
    _wait("the candidate scaled to zero", lambda: not candidate_running(kube, name), operator, 60)


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
    name, blob, v1, load = gated_under_load(
        kube, azurite, app_image, incluster_operator, model_files["v1"], "gate-shadow", release
    )
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
    name, blob, v1, load = gated_under_load(
        kube, azurite, app_image, incluster_operator, model_files["v1"], "gate-pass", release
    )
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
    assert not candidate_running(kube, name)


# A fault injected into a variant of the project's app image (tests only): sitecustomize runs at the interpreter's
# start and makes the ASGI app answer 500 to every third POST /predict.
FAULT = b'''"""Test fault: every third POST /predict is answered 500."""
import itertools

from modelapp_serving import web

_original = web.AsgiPredictApp.__call__
_count = itertools.count()


async def _faulty(self, scope, receive, send):
    if scope.get("type") == "http" and scope.get("path") == "/predict" and next(_count) % 3 == 0:
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": "injected fault"}'})
        return
    await _original(self, scope, receive, send)


web.AsgiPredictApp.__call__ = _faulty
'''


def test_an_image_that_answers_500_is_kept_out_by_its_health_and_no_user_sees_a_500(
    kube: KubeCluster,
    azurite: Azurite,
    registry: Registry,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
) -> None:
    name = f"gate-500-{uuid.uuid4().hex[:5]}"
    repository = app_image.repository.split("/", 1)[1]
    registry.push_variant(repository, app_image.tag, name)  # the stable image: a plain build of its own tag
    own_tag = Image(app_image.repository, name, "")
    blob = f"{name}/model.onnx"
    v1 = _publish(azurite, model_files["v1"], blob)
    release = {"shadow": {"minAgreement": 0.5, "minSamples": 60},
               "health": {"maxErrorRate": 0.05, "maxP99Milliseconds": 5000, "minRequests": 60}}  # fmt: skip
    kube.kubectl("apply", "-f", "-", input=json.dumps(gated(name, own_tag, azurite, blob, release)))
    _ready_with(kube, name, incluster_operator, version=v1)
    load = ServiceLoad(*_service_address(kube, name)).start()
    try:
        time.sleep(3)
        faulty = registry.push_variant(repository, app_image.tag, name, files={"opt/fault/sitecustomize.py": FAULT},
                                       env={"PYTHONPATH": "/opt/fault"})  # fmt: skip
        gate = wait_phase(kube, name, incluster_operator, "Rejected", "Promoting", "Promoted")
        time.sleep(3)
    finally:
        load.stop()
    summary = load.summary()
    print(f"an image answering 500 behind the health gate, under load: {summary}; gate: {gate['message']}")
    assert gate["phase"] == "Rejected" and gate["candidate"]["imageDigest"] == faulty, gate
    assert "health: error rate 0.3" in gate["message"] and "> 0.050 over" in gate["message"], gate
    assert summary["failed"] == 0 and summary["rate"] >= MIN_RATE, summary
    assert _get(kube, "modelapp", name)["status"]["image"]["digest"] != faulty


def modelapp_cli(kube: KubeCluster, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelapp_operator.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)}, timeout=60, check=False)  # fmt: skip


def test_manual_promotion_abort_and_a_newer_model_replacing_the_candidate(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
    deeper_model: Path,
    tmp_path: Path,
) -> None:
    from modelapp_serving.sample_model import export_onnx
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    features, labels = load_iris(return_X_y=True)
    four_levels = DecisionTreeClassifier(max_depth=4, random_state=0).fit(features.astype("float32"), labels)
    another = export_onnx(four_levels, tmp_path / "iris.onnx")
    release = {"shadow": {"minAgreement": 0.95, "minSamples": 40}, "promotion": "Manual", "drainSeconds": 3}
    name, blob, v1, load = gated_under_load(
        kube, azurite, app_image, incluster_operator, model_files["v1"], "gate-manual", release
    )
    try:
        time.sleep(2)
        first = _publish(azurite, deeper_model, blob)
        waiting = wait_phase(kube, name, incluster_operator, "AwaitingPromotion", "Rejected")
        assert waiting["phase"] == "AwaitingPromotion" and waiting["candidate"]["modelVersion"] == first, waiting
        # A newer model while the first waits for a person: it replaces the candidate.
        second = _publish(azurite, another, blob)
        _wait("the newer candidate", lambda: gate_of(kube, name)["candidate"]["modelVersion"] == second,
              incluster_operator, 120)  # fmt: skip
        wait_phase(kube, name, incluster_operator, "AwaitingPromotion")
        aborted = modelapp_cli(kube, "abort", name, "-n", TENANT_NAMESPACE)
        assert aborted.returncode == 0, aborted.stderr
        rejected = wait_phase(kube, name, incluster_operator, "Rejected")
        assert rejected["message"].startswith("aborted by ") and rejected["decidedBy"], rejected
        third = _publish(azurite, deeper_model, blob)  # the first model again, under a new version
        waiting = wait_phase(kube, name, incluster_operator, "AwaitingPromotion")
        assert waiting["candidate"]["modelVersion"] == third, waiting
        promoted = modelapp_cli(kube, "promote", name, "-n", TENANT_NAMESPACE)
        assert promoted.returncode == 0, promoted.stderr
        done = wait_phase(kube, name, incluster_operator, "Promoted")
        _ready_with(kube, name, incluster_operator, version=third)
    finally:
        load.stop()
    summary = load.summary()
    print(f"manual promotion, abort and a replaced candidate under load: {summary}; gate: {done['message']}")
    assert summary["failed"] == 0 and summary["rate"] >= MIN_RATE, summary
    assert done["decidedBy"] == rejected["decidedBy"]  # the same person, as the API server named them
    served = {a.pair.split("/", 1)[1] for a in load.answers if a.pair}
    assert served <= {v1.strip('"'), third.strip('"')}, served  # the aborted and the replaced never answered users
