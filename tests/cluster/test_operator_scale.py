"""The ModelApp's scale subresource and spec.autoscaling against the real control plane (issue 23):
`kubectl scale modelapp` scales without a rollout, the operator's HPA moves spec.replicas through the scale
subresource (the HPA controller keeps it within minReplicas even without metrics), and it goes when
spec.autoscaling does. Pods run on kwok nodes here; tests/pods/test_autoscaling_pods.py scales on load."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from azure.storage.blob import ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry
from modelapp_localstack.operator import OperatorProcess

from tests.cluster.helpers import StartOperator, apply, get, modelapp, prepare, wait_for, wait_ready

pytestmark = pytest.mark.cluster

NAMESPACE_PREFIX = f"scale-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def operator(start_operator: StartOperator, registry: Registry, azurite: Azurite) -> OperatorProcess:
    return start_operator(f"{NAMESPACE_PREFIX}-*", secrets=(registry.password, azurite.account_key))


def _scale(kube: KubeCluster, namespace: str, name: str) -> dict[str, Any]:
    path = f"/apis/modelapp.io/v1alpha1/namespaces/{namespace}/modelapps/{name}/scale"
    result: dict[str, Any] = json.loads(kube.kubectl("get", "--raw", path).stdout)
    return result


def test_kubectl_scale_modelapp_scales_the_deployment_without_a_rollout(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite))
    before = wait_ready(kube, app, operator)
    selector = f"app.kubernetes.io/instance={app.name},app.kubernetes.io/name=modelapp"
    assert before["status"]["selector"] == selector

    kube.kubectl("scale", "modelapp", app.name, "-n", app.namespace, "--replicas=3")

    def scaled() -> dict[str, Any] | None:
        deployment = get(kube, "deployment", app) or {}
        ready = (deployment.get("status") or {}).get("readyReplicas")
        return deployment if deployment["spec"]["replicas"] == 3 and ready == 3 else None

    deployment = wait_for("the Deployment at 3 ready replicas", scaled, operator)
    after = wait_ready(kube, app, operator)
    scale = _scale(kube, app.namespace, app.name)
    assert (scale["spec"]["replicas"], scale["status"]["replicas"], scale["status"]["selector"]) == (3, 3, selector)
    assert after["status"]["replicaSummary"] == "3/3"
    assert len(after["status"]["history"]) == len(before["status"]["history"]) == 1, "scaling rolled nothing"
    assert deployment["metadata"]["generation"] == 2  # the one change: replicas


def test_the_hpa_moves_spec_replicas_and_goes_with_autoscaling(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite, replicas=1, autoscaling={"minReplicas": 3, "maxReplicas": 4}))
    body = wait_ready(kube, app, operator)
    assert body["status"]["horizontalPodAutoscaler"] == app.name
    hpa = get(kube, "hpa", app)
    assert hpa is not None
    assert [ref["uid"] for ref in hpa["metadata"]["ownerReferences"]] == [body["metadata"]["uid"]]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "modelapp.io/v1alpha1", "kind": "ModelApp", "name": app.name}

    # No metrics-server in this tier: the HPA controller still lifts spec.replicas to minReplicas, through the
    # ModelApp's scale subresource, and the operator's Deployment follows.
    def at_min() -> dict[str, Any] | None:
        deployment = get(kube, "deployment", app) or {}
        return deployment if deployment["spec"]["replicas"] == 3 else None

    wait_for("the HPA's minReplicas on the Deployment", at_min, operator, timeout=120)
    assert (get(kube, "modelapp", app) or {})["spec"]["replicas"] == 3

    kube.kubectl("patch", "modelapp", app.name, "-n", app.namespace, "--type=json",
                 "-p", json.dumps([{"op": "remove", "path": "/spec/autoscaling"}]))  # fmt: skip
    wait_for("the HPA deleted", lambda: get(kube, "hpa", app) is None, operator)
    body = wait_ready(kube, app, operator)
    assert "horizontalPodAutoscaler" not in body["status"]
    assert body["spec"]["replicas"] == 3  # where the HPA left it


def test_min_above_max_is_refused_naming_the_field(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    body = modelapp(app, azurite, autoscaling={"minReplicas": 5, "maxReplicas": 2})
    refused = kube.kubectl("apply", "-f", "-", input=json.dumps(body), check=False)
    assert refused.returncode != 0
    assert "spec.autoscaling.minReplicas" in refused.stderr, refused.stderr
    assert "must not exceed autoscaling.maxReplicas" in refused.stderr, refused.stderr
