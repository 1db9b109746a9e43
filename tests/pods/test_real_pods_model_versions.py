"""Model versions with real containers: v1 Ready; a v2 whose bytes do not match the sha256 its metadata
vouches for is refused by the pods (never Ready), the operator rolls back by itself at once and the
refusal stays in the ModelApp's status, and pods created afterwards (a scale-up) download v1's snapshot
and become Ready."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from modelapp_localstack import Azurite, KubeCluster
from modelapp_localstack.incluster import TENANT_NAMESPACE, InClusterOperator

from tests.pods.conftest import Image
from tests.pods.test_real_pods import (
    PROGRESS_DEADLINE_SECONDS,
    _conditions,
    _get,
    _get_json,
    _overwrite_keeping_metadata,
    _pods,
    _ready_with,
    _running_on_v1,
    _service_address,
    _wait,
)

pytestmark = pytest.mark.pods


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0].get("env") or []}


def test_a_refused_model_is_shown_rolled_back_and_scaled_up_pods_load_v1(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
) -> None:
    name, blob, body = _running_on_v1(kube, azurite, app_image, incluster_operator, model_files["v1"], "mv")
    v1 = body["status"]["model"]
    v1_etag = v1["version"]
    assert v1["snapshot"], v1
    v1_pin = f"snapshot={v1['snapshot'].replace(':', '%3A')}"

    # v2: other bytes under metadata that vouches for v1's sha256. The operator reads only metadata and
    # rolls it out; every pod downloads v2's snapshot, finds another sha256 and refuses it.
    v2_etag = _overwrite_keeping_metadata(azurite, blob, model_files["v2"].read_bytes())
    started = time.monotonic()

    def rolled_back() -> dict[str, Any] | None:
        body = _get(kube, "modelapp", name)
        degraded = _conditions(body).get("Degraded") or {}
        return body if degraded.get("reason") == "RolledBack" else None

    # Every new pod refused v2: the operator rolls back at once (not at the deadline), and the rollback's
    # Degraded condition and the failed entry keep the pods' refusal.
    body = _wait("the automatic rollback", rolled_back, incluster_operator, timeout=PROGRESS_DEADLINE_SECONDS + 120)
    refusal = _conditions(body)["Degraded"]["message"]
    print(f"rolled back after {time.monotonic() - started:.0f}s: {refusal}")
    assert "ModelChecksumMismatch" in refusal and v1["sha256"] in refusal, refusal
    history = body["status"]["history"]
    failed = next(entry for entry in history if entry["revision"] == history[0]["rollbackOf"])
    assert failed["outcome"] == "Failed" and failed["modelVersion"].strip('"') == v2_etag.strip('"'), failed
    assert "refusing it" in failed.get("refusal", ""), failed
    assert "refusing it" in _conditions(body)["Degraded"]["message"]
    restored = _ready_with(kube, name, incluster_operator, version=v1_etag, timeout=180)
    assert restored["status"]["model"]["snapshot"] == v1["snapshot"]
    assert _conditions(restored)["ModelVerified"]["status"] == "True"

    # Scale up: the new pod of the restored pair downloads v1's snapshot (the blob itself holds v2 now).
    before = {pod["metadata"]["name"] for pod in _pods(kube, name)}
    kube.kubectl("patch", "modelapp", name, "-n", TENANT_NAMESPACE, "--type=merge", "-p", '{"spec":{"replicas":3}}')

    def scaled() -> dict[str, Any] | None:
        body = _get(kube, "modelapp", name)
        status = body.get("status") or {}
        ready = _conditions(body).get("Ready", {}).get("status") == "True"
        observed = status.get("observedGeneration") == body["metadata"]["generation"]
        return body if ready and observed and status.get("readyReplicas") == 3 else None

    _wait("3 ready replicas on v1", scaled, incluster_operator, timeout=180)
    pods = [pod for pod in _pods(kube, name) if pod["metadata"].get("deletionTimestamp") is None]
    new = [pod for pod in pods if pod["metadata"]["name"] not in before]
    assert len(pods) == 3 and new, [pod["metadata"]["name"] for pod in pods]
    for pod in pods:
        assert pod["status"]["containerStatuses"][0]["ready"], pod["status"]
        assert _env(pod)["MODELAPP_MODEL_PIN"] == v1_pin
    for pod in new:
        port = pod["spec"]["containers"][0]["ports"][0]["containerPort"]
        version = _get_json((pod["status"]["podIP"], port), "/version")
        assert version["ready"] is True
        assert (version["model"]["etag"], version["model"]["sha256"]) == (v1_etag, v1["sha256"]), version
        assert version["model"]["pin"] == v1_pin, version
    address = _service_address(kube, name)
    for _ in range(12):
        version = _get_json(address, "/version")
        assert (version["model"]["etag"], version["model"]["sha256"], version["model"]["pin"]) == (
            v1_etag,
            v1["sha256"],
            v1_pin,
        ), version
