"""The local control plane is a real one: server-side validation, rollouts on kwok nodes, pod security."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from modelapp_localstack import KubeCluster

pytestmark = pytest.mark.cluster

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.stack-test.modelapp.io"},
    "spec": {
        "group": "stack-test.modelapp.io",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [{
            "name": "v1",
            "served": True,
            "storage": True,
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {
                    "type": "object",
                    "required": ["size"],
                    "properties": {"size": {"type": "integer", "minimum": 1, "maximum": 10}},
                }},
            }},
        }],
    },
}


def _namespace(kube: KubeCluster, labels: dict[str, str] | None = None) -> str:
    name = f"stack-{uuid.uuid4().hex[:8]}"
    kube.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}))
    return name


def _wait_for(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_server_rejects_an_invalid_custom_object(kube: KubeCluster) -> None:
    kube.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(WIDGET_CRD))
    kube.kubectl("wait", "--for=condition=Established", "crd/widgets.stack-test.modelapp.io", "--timeout=30s")
    namespace = _namespace(kube)

    def widget(size: int) -> str:
        return json.dumps({"apiVersion": "stack-test.modelapp.io/v1", "kind": "Widget",
                           "metadata": {"name": f"w{size}", "namespace": namespace}, "spec": {"size": size}})

    kube.kubectl("apply", "-f", "-", input=widget(3))
    rejected = kube.kubectl("apply", "-f", "-", input=widget(99), check=False)
    assert rejected.returncode != 0
    assert "spec.size" in rejected.stderr, rejected.stderr


def test_deployment_gets_ready_pods_on_kwok_and_rolls_on_template_change(kube: KubeCluster) -> None:
    namespace = _namespace(kube)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]},
            },
        },
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(deployment))
    kube.kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=60s")
    pods = json.loads(kube.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"].startswith("kwok-node-")
        assert pod["status"]["phase"] == "Running"
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"]
        assert ready == "True"

    kube.kubectl("set", "image", "deployment/web", "web=example.invalid/web:2", "-n", namespace)
    kube.kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=60s")
    replica_sets = json.loads(kube.kubectl("get", "rs", "-n", namespace, "-o", "json").stdout)["items"]
    assert len(replica_sets) == 2
    by_image = {rs["spec"]["template"]["spec"]["containers"][0]["image"]: rs for rs in replica_sets}
    assert by_image["example.invalid/web:2"]["status"].get("readyReplicas") == 2
    assert by_image["example.invalid/web:1"]["spec"]["replicas"] == 0


def test_pod_security_admission_enforces_restricted(kube: KubeCluster) -> None:
    namespace = _namespace(kube, {"pod-security.kubernetes.io/enforce": "restricted"})
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": namespace},
        "spec": {
            "containers": [{"name": "c", "image": "example.invalid/c:1", "securityContext": {"privileged": True}}]
        },
    }
    rejected = kube.kubectl("apply", "-f", "-", input=json.dumps(pod), check=False)
    assert rejected.returncode != 0
    assert "violates PodSecurity" in rejected.stderr, rejected.stderr
