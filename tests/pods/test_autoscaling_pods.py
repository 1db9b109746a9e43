"""Replicas that follow load, on real pods (issue 23): spec.autoscaling's HPA, the stack's real metrics-server
reading the real node's kubelet, a load through the Service that raises the replicas, idleness that lowers
them, and no failed request while pods come and go."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from modelapp_localstack import Azurite, KubeCluster, Stack
from modelapp_localstack.incluster import TENANT_NAMESPACE, InClusterOperator

from tests.pods.conftest import Image
from tests.pods.load import ServiceLoad
from tests.pods.test_real_pods import _get, _modelapp, _pods, _publish, _ready_with, _service_address, _wait

pytestmark = pytest.mark.pods

MAX_REPLICAS = 3
# Each pod asks for 50m of CPU and the HPA aims at half of it: a few dozen requests per second are several times
# that, an idle gunicorn (probes only) a few percent.
RESOURCES = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}}
TARGET_CPU_PERCENT = 50
SCALE_DOWN_STABILIZATION_SECONDS = 15  # the HPA's default is 300 s
BUSY_RATE = 40.0
IDLE_RATE = 2.0  # still a request every half second while pods are removed: none may fail


def _hpa(kube: KubeCluster, name: str) -> dict[str, Any] | None:
    found = kube.kubectl("get", "hpa", name, "-n", TENANT_NAMESPACE, "-o", "json", check=False)
    return json.loads(found.stdout) if found.returncode == 0 else None


def _replicas(kube: KubeCluster, name: str) -> tuple[int, int]:
    """(spec.replicas the HPA wrote through the scale subresource, ready pods of the Deployment)."""
    app = _get(kube, "modelapp", name)
    deployment = _get(kube, "deployment", name)
    return int(app["spec"]["replicas"]), int((deployment.get("status") or {}).get("readyReplicas") or 0)


def _explain(kube: KubeCluster, name: str) -> str:
    hpa = kube.kubectl("describe", "hpa", name, "-n", TENANT_NAMESPACE, check=False).stdout
    top = kube.kubectl("top", "pods", "-n", TENANT_NAMESPACE, check=False)
    return f"{hpa}\n{top.stdout}{top.stderr}"


def test_replicas_follow_load_and_no_request_fails(
    real_stack: Stack,
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
) -> None:
    started = time.monotonic()
    real_stack.start_metrics_server()
    print(f"metrics-server serving node metrics after {time.monotonic() - started:.1f}s")
    name = f"scale-{uuid.uuid4().hex[:5]}"
    blob = f"{name}/model.onnx"
    etag = _publish(azurite, model_files["v1"], blob)
    body = _modelapp(
        name,
        app_image,
        azurite,
        blob,
        resources=RESOURCES,
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": MAX_REPLICAS,
            "targetCPUUtilizationPercentage": TARGET_CPU_PERCENT,
            "scaleDownStabilizationSeconds": SCALE_DOWN_STABILIZATION_SECONDS,
        },
    )
    del body["spec"]["replicas"]  # the HPA's to move: a manifest with autoscaling leaves it out
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    app = _ready_with(kube, name, incluster_operator, version=etag)
    assert app["status"]["selector"] == f"app.kubernetes.io/instance={name},app.kubernetes.io/name=modelapp"
    assert app["status"]["horizontalPodAutoscaler"] == name

    hpa = _hpa(kube, name)
    assert hpa is not None
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "modelapp.io/v1alpha1", "kind": "ModelApp", "name": name}
    assert [ref["uid"] for ref in hpa["metadata"]["ownerReferences"]] == [app["metadata"]["uid"]]

    def measuring() -> bool:
        # The HPA has read the pods' CPU through metrics.k8s.io (ScalingActive), so it can act on a load.
        found = _hpa(kube, name) or {}
        conditions = {c["type"]: c for c in (found.get("status") or {}).get("conditions") or []}
        return conditions.get("ScalingActive", {}).get("status") == "True" and bool(
            (found.get("status") or {}).get("currentMetrics")
        )

    _wait("the HPA reading the pods' CPU", measuring, incluster_operator, timeout=180)
    assert _replicas(kube, name) == (1, 1)

    address = _service_address(kube, name)
    busy = ServiceLoad(*address, rate=BUSY_RATE).start()
    loaded_at = time.monotonic()
    try:
        try:
            _wait("more replicas under load", lambda: _replicas(kube, name)[1] >= 2, incluster_operator, timeout=300)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{_explain(kube, name)}") from None
        scaled_up = time.monotonic() - loaded_at
        time.sleep(10)  # the new pods serve too
        peak = _replicas(kube, name)
    finally:
        busy.stop()
    busy_summary = busy.summary()
    print(f"scale up: {scaled_up:.1f}s from load start to 2 ready pods; peak (spec, ready) {peak}; load {busy_summary}")
    served_by = {pod["metadata"]["name"] for pod in _pods(kube, name)}

    idle = ServiceLoad(*address, rate=IDLE_RATE).start()
    idled_at = time.monotonic()
    try:
        try:
            _wait(
                "replicas lowered when idle",
                lambda: _replicas(kube, name) == (1, 1) and len(_pods(kube, name)) == 1,
                incluster_operator,
                timeout=300,
            )
        except AssertionError as error:
            raise AssertionError(f"{error}\n{_explain(kube, name)}") from None
        scaled_down = time.monotonic() - idled_at
        time.sleep(3)
    finally:
        idle.stop()
    idle_summary = idle.summary()
    print(
        f"scale down: {scaled_down:.1f}s from idle to 1 pod (stabilization {SCALE_DOWN_STABILIZATION_SECONDS}s); "
        f"load {idle_summary}"
    )

    assert len(served_by) >= 2, served_by
    assert busy_summary["failed"] == 0, busy_summary
    assert idle_summary["failed"] == 0, idle_summary
    history = _get(kube, "modelapp", name)["status"].get("history") or []
    assert len(history) == 1, "scaling rolled nothing"

    # Autoscaling off: the operator deletes its HPA; spec.replicas stays where the HPA left it.
    kube.kubectl(
        "patch",
        "modelapp",
        name,
        "-n",
        TENANT_NAMESPACE,
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": "/spec/autoscaling"}]),
    )
    _wait("the HPA deleted", lambda: _hpa(kube, name) is None, incluster_operator, timeout=60)
    assert _replicas(kube, name)[0] == 1
    kube.kubectl("delete", "modelapp", name, "-n", TENANT_NAMESPACE, "--wait=false")
