"""Operators run as processes in these tiers, but leader election names pods: a replica's identity is its
pod's name, and a standby forwards webhooks to that pod's IP, read from the API (modelapp_operator.leader).

`stand_in_pod` creates that pod object in the real API server, never scheduled (a scheduler that does not
exist), and writes its status as the kubelet would: Running, IP 127.0.0.1, so the forward reaches the
process on loopback at the pod's `webhooks` port.
"""

from __future__ import annotations

import json

from modelapp_localstack import KubeCluster

UNSCHEDULED = "modelapp-stand-in"  # no scheduler of that name: the pod stays on no node


def operator_namespace(kube: KubeCluster, name: str) -> str:
    kube.kubectl("create", "namespace", name)
    return name


def stand_in_pod(kube: KubeCluster, namespace: str, name: str, port: int, ip: str = "127.0.0.1") -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "modelapp-operator"}},
        "spec": {
            "schedulerName": UNSCHEDULED,
            "containers": [
                {
                    "name": "operator",
                    "image": "modelapp-operator",
                    "ports": [{"name": "webhooks", "containerPort": port}],
                }
            ],
        },
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(pod))
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
    kube.kubectl(
        "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )
