"""The operator as a pod, installed the way users install it: `kubectl apply -k` on deploy/.

A small overlay in the run folder points deploy/ at the stack: the operator image built from
Dockerfile.operator and pushed to the stack's registry (by digest), the registry's CA and pull
Secret, shorter intervals for a local run, and namespace annotations that put its pods on the real
node. Nothing in deploy/ itself changes; the operator has only its ServiceAccount's rights.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .binaries import REPO_ROOT
from .kube import KubeCluster
from .node import real_node_namespace_annotations
from .operator import allowed_sources
from .procs import StackError, log
from .registry import Registry

OPERATOR_NAMESPACE = "modelapp-system"
OPERATOR_DEPLOYMENT = "modelapp-operator"
TENANT_NAMESPACE = "ml"
REGISTRY_CA_MOUNT = "/etc/modelapp/registry-ca"
RECEIVER_SERVICE = "modelapp-operator-webhooks"
RECEIVER_PORT = 8082
RECEIVER_CLUSTER_IP_OFFSET = 200
PULL_SECRET_NAME = "regcred"  # noqa: S105 - the name of a Secret, not a credential


@dataclass(frozen=True)
class InClusterOperator:
    kube: KubeCluster
    overlay: Path

    def pods(self) -> list[dict[str, Any]]:
        found = self.kube.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-l",
                                  f"app.kubernetes.io/name={OPERATOR_DEPLOYMENT}", "-o", "json")
        items: list[dict[str, Any]] = json.loads(found.stdout)["items"]
        return items

    def logs(self, tail: int = 60) -> str:
        # Every replica's log (the active one and the standby), each line prefixed with its pod.
        result = self.kube.kubectl("logs", "-n", OPERATOR_NAMESPACE, "-l",
                                   f"app.kubernetes.io/name={OPERATOR_DEPLOYMENT}", f"--tail={tail}",
                                   "--all-containers", "--prefix", check=False)
        return result.stdout + result.stderr

    def uninstall(self) -> None:
        self.kube.kubectl("delete", "deployment", OPERATOR_DEPLOYMENT, "-n", OPERATOR_NAMESPACE,
                          "--ignore-not-found", "--wait=true", check=False)


def _crash_looping(operator: InClusterOperator) -> bool:
    """A replica waits in CrashLoopBackOff: it exited at start-up more than once, the operator cannot start."""
    for pod in operator.pods():
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if ((status.get("state") or {}).get("waiting") or {}).get("reason") == "CrashLoopBackOff":
                return True
    return False


def receiver_address(service_cidr: str) -> str:
    """A fixed ClusterIP for the webhook receiver's Service, so a registry started before the
    operator can be told where to send its notifications."""
    return str(ipaddress.ip_network(service_cidr).network_address + RECEIVER_CLUSTER_IP_OFFSET)


def receiver_url(service_cidr: str, path: str = "/webhooks/registry") -> str:
    return f"http://{receiver_address(service_cidr)}:{RECEIVER_PORT}{path}"


def _overlay(
    folder: Path,
    image: str,
    registry: Registry,
    settings: Mapping[str, str],
    real_node_namespaces: Sequence[str],
    receiver_token: str,
    receiver_cluster_ip: str | None,
    api_cluster_ip: str,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name, digest = image.split("@", 1)
    namespace_patches = [
        {
            "target": {"kind": "Namespace", "name": namespace},
            "patch": yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": namespace, "annotations": real_node_namespace_annotations()}}),
        }
        for namespace in real_node_namespaces
    ]
    deployment_patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": OPERATOR_DEPLOYMENT, "namespace": OPERATOR_NAMESPACE},
        "spec": {"template": {"spec": {
            "imagePullSecrets": [{"name": PULL_SECRET_NAME}],
            # The local cluster runs no DNS; kopf reaches the API server by this name in-cluster.
            "hostAliases": [{"ip": api_cluster_ip, "hostnames": ["kubernetes.default.svc",
                                                                 "kubernetes.default.svc.cluster.local"]}],
            "containers": [{"name": "operator", "volumeMounts": [
                {"name": "registry-ca", "mountPath": REGISTRY_CA_MOUNT, "readOnly": True}]}],
            "volumes": [{"name": "registry-ca", "configMap": {"name": "modelapp-registry-ca"}}],
        }}},
    }
    extra = [
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "modelapp-registry-ca", "namespace": OPERATOR_NAMESPACE},
         "data": {"ca.crt": registry.ca_file.read_text()}},
        {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
         "metadata": {"name": PULL_SECRET_NAME, "namespace": OPERATOR_NAMESPACE},
         "stringData": {".dockerconfigjson": registry.dockerconfigjson()}},
    ]
    (folder / "local-objects.yaml").write_text(yaml.safe_dump_all(extra))
    service_patches = [] if receiver_cluster_ip is None else [{"patch": yaml.safe_dump({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": RECEIVER_SERVICE, "namespace": OPERATOR_NAMESPACE},
        "spec": {"clusterIP": receiver_cluster_ip}})}]
    literals = {"MODELAPP_REGISTRY_CA_FILE": f"{REGISTRY_CA_MOUNT}/ca.crt", **allowed_sources(registry), **settings}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(REPO_ROOT / "deploy", folder), "local-objects.yaml"],
        "images": [{"name": "modelapp-operator", "newName": name, "digest": digest}],
        "configMapGenerator": [{
            "name": "modelapp-operator",
            "namespace": OPERATOR_NAMESPACE,
            "behavior": "merge",
            "literals": [f"{key}={value}" for key, value in sorted(literals.items())],
        }],
        "patches": [*namespace_patches, {"patch": yaml.safe_dump(deployment_patch)}, *service_patches],
        # The webhook receiver's token (deploy/base/deployment.yaml mounts this Secret; never committed).
        "secretGenerator": [{"name": "modelapp-receiver-token", "namespace": OPERATOR_NAMESPACE,
                             "literals": [f"token={receiver_token}"]}],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return folder


def install_operator(
    kube: KubeCluster,
    registry: Registry,
    image: str,
    run_dir: Path,
    *,
    settings: Mapping[str, str] | None = None,
    real_node_namespaces: Sequence[str] = (OPERATOR_NAMESPACE, TENANT_NAMESPACE),
    receiver_token: str | None = None,
    service_cidr: str | None = None,
    timeout: float = 240,
) -> InClusterOperator:
    """`kubectl apply -k` deploy/ through a local overlay, then wait until the operator pod is Ready.

    image: `registry/repository@sha256:...` built from Dockerfile.operator.
    settings: MODELAPP_* values merged into the operator's ConfigMap (poll interval, namespaces...).
    receiver_token: the webhook receiver's token (default: a random one).
    service_cidr: the cluster's Service range; the receiver's Service then gets `receiver_address(service_cidr)`."""
    if "@sha256:" not in image:
        raise StackError(f"install the operator by digest, not {image!r}")
    started = time.monotonic()
    overlay = _overlay(
        run_dir / "operator-overlay", image, registry, settings or {}, real_node_namespaces,
        receiver_token or secrets.token_urlsafe(24), receiver_address(service_cidr) if service_cidr else None,
        kube.kubectl("get", "service", "kubernetes", "-n", "default", "-o", "jsonpath={.spec.clusterIP}").stdout,
    )
    # A test before this one may have deleted the operator's namespace: nothing can be created in it until
    # it is gone, so wait for that rather than fail the install.
    phase = kube.kubectl("get", "namespace", OPERATOR_NAMESPACE, "-o", "jsonpath={.status.phase}", check=False)
    if phase.stdout.strip() == "Terminating":
        kube.kubectl("wait", "--for=delete", f"namespace/{OPERATOR_NAMESPACE}", "--timeout=120s", check=False,
                     timeout=150)
    # The CRDs first (as docs/operations.md says).
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(REPO_ROOT / "crds"), timeout=120)
    kube.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    applied = kube.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(overlay), timeout=120,
                           check=False)
    if applied.returncode != 0:
        raise StackError(f"kubectl apply -k {overlay} failed:\n{applied.stderr.strip()}")
    operator = InClusterOperator(kube, overlay)
    deadline = time.monotonic() + timeout
    while True:
        # Short rounds, so a replica that exits at start-up fails the install at once with its log,
        # not after the whole timeout (and every test after it).
        result = kube.kubectl("rollout", "status", f"deployment/{OPERATOR_DEPLOYMENT}", "-n", OPERATOR_NAMESPACE,
                              "--timeout=5s", check=False, timeout=40)
        if result.returncode == 0 or time.monotonic() > deadline or _crash_looping(operator):
            break
    if result.returncode != 0:
        pods = kube.kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "wide", check=False).stdout
        events = kube.kubectl("get", "events", "-n", OPERATOR_NAMESPACE, "--sort-by=.lastTimestamp",
                              check=False).stdout
        raise StackError(f"the in-cluster operator did not become ready:\n{result.stderr}\n{pods}\n"
                         f"{events[-3000:]}\n{operator.logs()}")
    log(f"operator running in-cluster ({OPERATOR_NAMESPACE}/{OPERATOR_DEPLOYMENT}, {image.rsplit('/', 1)[-1][:30]}...)"
        f" in {time.monotonic() - started:.1f}s")
    return operator
