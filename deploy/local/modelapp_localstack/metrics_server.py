"""metrics-server for the local stack: the resource metrics API (metrics.k8s.io) an HPA reads pods' CPU from.

It runs as a process on the host, like the control plane, bound to the host side of the real node's network,
and scrapes that node's kubelet (`/metrics/resource` on its InternalIP; the kubelet accepts any client
certificate of the cluster's CA and authorizes with AlwaysAllow, and its serving certificate is self-signed,
hence `--kubelet-insecure-tls`). The API server reaches it through the aggregation layer: an APIService
`v1beta1.metrics.k8s.io` backed by a Service without selector whose endpoint is metrics-server's address
(the API server routes to endpoints, `--enable-aggregator-routing`, as it has no kube-proxy on the host), with
the stack's CA as caBundle. kwok's fake nodes have no kubelet to scrape, so only the real node is asked.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

from .kube import KubeCluster, write_kubeconfig
from .procs import ManagedProcess, free_port, log

API_SERVICE = "v1beta1.metrics.k8s.io"
NAMESPACE = "kube-system"
NAME = "metrics-server"
USER = "system:metrics-server"
# The kubelet's cAdvisor gathers CPU every ~10 s; 15 s is what the upstream manifests use (10 s is the least).
METRIC_RESOLUTION = "15s"
READY_TIMEOUT_SECONDS = 90.0


def rbac_objects() -> list[dict[str, Any]]:
    """What upstream's manifests grant metrics-server: read nodes, their metrics and pods; delegate authentication
    and authorization of the requests the aggregator forwards to the API server."""
    rbac = "rbac.authorization.k8s.io"
    user = {"apiGroup": rbac, "kind": "User", "name": USER}

    def binding(kind: str, name: str, role_kind: str, role: str, namespace: str | None = None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {})}
        return {
            "apiVersion": f"{rbac}/v1",
            "kind": kind,
            "metadata": metadata,
            "roleRef": {"apiGroup": rbac, "kind": role_kind, "name": role},
            "subjects": [user],
        }

    return [
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRole",
            "metadata": {"name": USER},
            "rules": [
                {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]},
            ],
        },
        binding("ClusterRoleBinding", USER, "ClusterRole", USER),
        binding("ClusterRoleBinding", f"{NAME}:system:auth-delegator", "ClusterRole", "system:auth-delegator"),
        binding("RoleBinding", f"{NAME}-auth-reader", "Role", "extension-apiserver-authentication-reader", NAMESPACE),
    ]


def aggregation_objects(host: str, port: int, ca_bundle: bytes) -> list[dict[str, Any]]:
    """The Service (no selector), its endpoint on the host, and the APIService that names them."""
    service_port = 443
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": NAME, "namespace": NAMESPACE},
            "spec": {"ports": [{"name": "https", "port": service_port, "targetPort": port, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": NAME, "namespace": NAMESPACE},
            "subsets": [{"addresses": [{"ip": host}], "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}],
        },
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": API_SERVICE},
            "spec": {
                "group": "metrics.k8s.io",
                "version": "v1beta1",
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
                "caBundle": base64.b64encode(ca_bundle).decode(),
                "service": {"name": NAME, "namespace": NAMESPACE, "port": service_port},
            },
        },
    ]


def start_metrics_server(kube: KubeCluster, *, binary: Path, host: str, node_selector: str) -> ManagedProcess:
    """Start metrics-server on `host` (not loopback: the API server dials its endpoint), register it with the
    aggregation layer and return once the resource metrics API lists a node matching `node_selector`."""
    started = time.monotonic()
    folder = kube.run_dir / "metrics-server"
    folder.mkdir(parents=True, exist_ok=True)
    serving = kube.ca.issue(
        "metrics-server-serving", NAME, dns_names=(f"{NAME}.{NAMESPACE}.svc",), ip_addresses=(host,), server=True
    )
    client = kube.ca.issue("metrics-server-client", USER, client=True)
    kubeconfig = write_kubeconfig(folder / "kubeconfig", kube.server, kube.ca_file, client.cert, client.key, USER)
    port = free_port()
    kube.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [*rbac_objects(), *aggregation_objects(host, port, kube.ca_file.read_bytes())],
            }
        ),
    )
    process = ManagedProcess(
        NAME,
        [
            str(binary),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={host}",
            f"--secure-port={port}",
            f"--cert-dir={folder}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--kubelet-client-certificate={client.cert}",
            f"--kubelet-client-key={client.key}",
            "--kubelet-insecure-tls",
            "--kubelet-preferred-address-types=InternalIP",
            "--kubelet-use-node-status-port",
            f"--node-selector={node_selector}",
            f"--metric-resolution={METRIC_RESOLUTION}",
            "--v=1",
        ],
        kube.run_dir / "logs" / "metrics-server.log",
    )
    process.start()

    def node_metrics() -> bool:
        listed = kube.kubectl("get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes", check=False, timeout=10)
        return listed.returncode == 0 and bool(json.loads(listed.stdout or "{}").get("items"))

    try:
        process.wait_ready(node_metrics, READY_TIMEOUT_SECONDS, f"{API_SERVICE} listing a node")
    except BaseException:
        process.stop()
        raise
    log(f"metrics-server serves {API_SERVICE} from {host}:{port} in {time.monotonic() - started:.1f}s")
    return process
