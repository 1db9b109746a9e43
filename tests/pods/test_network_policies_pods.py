"""NetworkPolicies of deploy/components/network-policies, enforced on the real node by kube-network-policies
(Stack.start_network_policies): traffic between real pods on the stack's own pod network only.

kube-network-policies learns a new pod's address from the API server, so the first packets of a pod that
has only just started may pass before its address is in the nftables set (upstream's NRI closes that race;
containerd 1.6 has no NRI). The probe pods therefore try every second for a while and the tests judge the
last tries."""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.incluster import TENANT_NAMESPACE, InClusterOperator
from modelapp_localstack.node import NETPOL_TABLE, real_node_namespace_annotations
from modelapp_localstack.operator import tenant_secrets
from modelapp_localstack.procs import ManagedProcess

from tests.pods.conftest import Image
from tests.pods.load import SAMPLE_ROWS
from tests.pods.test_real_pods import _running_on_v1, _service_address

pytestmark = pytest.mark.pods

COMPONENT = Path(__file__).resolve().parents[2] / "deploy" / "components" / "network-policies"
METADATA_CIDR = "169.254.169.254/32"
STAND_IN_PORT = 443  # a port the operator's egress policy allows: only the except-rule can block it
TRY_SECONDS = 20
JUDGED_TRIES = 4

# Tries each target once a second for TRY_SECONDS (connect timeout 1 s) and writes what happened to the
# termination message. Targets: [[url or host:port, method]]; POST sends the sample rows to /predict.
PROBE = """
import json, socket, sys, time, urllib.request
targets = json.loads(sys.argv[1]); seconds = float(sys.argv[2]); body = json.loads(sys.argv[3])
results = {name: [] for name, _ in targets}
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    started = time.monotonic()
    for name, target in targets:
        try:
            if target.startswith("http"):
                request = urllib.request.Request(target, data=json.dumps(body).encode(), method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=1) as response:
                    results[name].append(response.status == 200)
            else:
                host, port = target.rsplit(":", 1)
                socket.create_connection((host, int(port)), timeout=1).close()
                results[name].append(True)
        except Exception:
            results[name].append(False)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
open("/dev/termination-log", "w").write(json.dumps(results))
"""


def _documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((COMPONENT / name).read_text()) if doc]


def _policy(file: str, name: str, namespace: str) -> dict[str, Any]:
    """A NetworkPolicy of the component, as shipped, moved to `namespace`."""
    found = next(doc for doc in _documents(file) if doc["metadata"]["name"] == name)
    policy = copy.deepcopy(found)
    policy["metadata"] = {"name": name, "namespace": namespace}
    return policy


def _apply(kube: KubeCluster, *objects: dict[str, Any]) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def _pod(name: str, namespace: str, image: Image, command: list[str], labels: dict[str, str] | None = None,
         server: bool = False) -> dict[str, Any]:
    """A probe (runs once, as the image's non-root user) or a server (kept running, as root for port 443)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"role": name}},
        "spec": {
            "restartPolicy": "Always" if server else "Never",
            "imagePullSecrets": [{"name": "regcred"}],
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": 0} if server else {},
            "containers": [{"name": "main", "image": image.by_digest, "command": command}],
        },
    }


def _pod_status(kube: KubeCluster, namespace: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(
        kube.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)["status"]
    return status


def _wait_pod(kube: KubeCluster, namespace: str, name: str, phases: set[str], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = _pod_status(kube, namespace, name)
        if status.get("phase") in phases and (status.get("podIP") or status.get("phase") != "Running"):
            return status
        time.sleep(1)
    raise AssertionError(f"pod {namespace}/{name} not {phases} after {timeout:.0f}s: {status}")


def _namespace(kube: KubeCluster, registry: Registry, azurite: Azurite, prefix: str) -> str:
    """A namespace on the real node with the tenant Secrets (the registry's pull Secret `regcred`)."""
    name = f"{prefix}-{uuid.uuid4().hex[:5]}"
    _apply(kube, {"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": name, "annotations": real_node_namespace_annotations()}})
    _apply(kube, *tenant_secrets(name, registry, azurite))
    return name


def _probe(kube: KubeCluster, namespace: str, name: str, image: Image, targets: dict[str, str],
           labels: dict[str, str] | None = None) -> dict[str, list[bool]]:
    """Run a probe pod to completion; what each target answered, try by try."""
    command = ["python3", "-c", PROBE, json.dumps(list(targets.items())), str(TRY_SECONDS),
               json.dumps({"instances": SAMPLE_ROWS})]
    _apply(kube, _pod(name, namespace, image, command, labels))
    status = _wait_pod(kube, namespace, name, {"Succeeded", "Failed"}, timeout=TRY_SECONDS + 180)
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0, terminated
    results: dict[str, list[bool]] = json.loads(terminated["message"])
    return results


def _last(tries: list[bool]) -> list[bool]:
    assert len(tries) >= JUDGED_TRIES, tries
    return tries[-JUDGED_TRIES:]


@pytest.fixture(scope="module", autouse=True)
def enforced(real_stack: Stack) -> ManagedProcess:
    """kube-network-policies on the real node (it stays for the session: with no policy, it queues nothing)."""
    return real_stack.start_network_policies()


@pytest.fixture
def namespaces(kube: KubeCluster) -> Iterator[list[str]]:
    created: list[str] = []
    yield created
    for namespace in created:
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_the_stack_enforces_network_policies_with_kube_network_policies(
    real_stack: Stack, enforced: ManagedProcess
) -> None:
    assert enforced.alive()
    assert real_stack.start_network_policies() is enforced, "a second start must find the running one"
    listed = real_stack.node_exec("nft", "list", "table", "inet", NETPOL_TABLE)
    assert listed.returncode == 0, listed.stderr
    assert "NFQUEUE" in listed.stdout or "queue" in listed.stdout, listed.stdout


def test_another_namespace_reaches_predict_only_when_a_policy_allows_it(
    kube: KubeCluster, registry: Registry, azurite: Azurite, app_image: Image,
    incluster_operator: InClusterOperator, model_files: dict[str, Path], namespaces: list[str],
) -> None:
    name, _, _ = _running_on_v1(kube, azurite, app_image, incluster_operator, model_files["v1"], "netpol",
                                replicas=1)
    host, port = _service_address(kube, name)
    predict = f"http://{host}:{port}/predict"
    client = _namespace(kube, registry, azurite, "np-client")
    namespaces.append(client)

    before = _probe(kube, client, "before", app_image, {"predict": predict})
    assert all(_last(before["predict"])), before

    tenant_ingress = _policy("tenant.yaml", "modelapp-apps-ingress", TENANT_NAMESPACE)
    app_allows_client = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-from-client", "namespace": TENANT_NAMESPACE},
        "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": name}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                     "kubernetes.io/metadata.name": client}}}], "ports": [{"port": "http"}]}]},
    }
    try:
        _apply(kube, tenant_ingress)
        denied = _probe(kube, client, "denied", app_image, {"predict": predict})
        assert not any(_last(denied["predict"])), denied

        _apply(kube, app_allows_client)
        allowed = _probe(kube, client, "allowed", app_image, {"predict": predict})
        assert all(_last(allowed["predict"])), allowed
    finally:
        kube.kubectl("delete", "networkpolicy", "-n", TENANT_NAMESPACE, "modelapp-apps-ingress", f"{name}-from-client",
                     "--ignore-not-found", check=False)
        kube.kubectl("delete", "modelapp", name, "-n", TENANT_NAMESPACE, "--wait=false", check=False)


def test_the_operator_egress_policy_blocks_a_metadata_stand_in(
    kube: KubeCluster, registry: Registry, azurite: Azurite, app_image: Image, namespaces: list[str],
) -> None:
    """The stand-in is a pod on the stack's pod network listening where the real endpoint could not be
    reached from here; the policy is the shipped one with its address added to `except`, next to the metadata
    address, as a platform admin adds one. Another server on the same port stays reachable."""
    namespace = _namespace(kube, registry, azurite, "np-egress")
    namespaces.append(namespace)
    serve = ["python3", "-m", "http.server", str(STAND_IN_PORT)]
    _apply(kube, _pod("metadata-stand-in", namespace, app_image, serve, server=True),
           _pod("storage-stand-in", namespace, app_image, serve, server=True))
    stand_in = _wait_pod(kube, namespace, "metadata-stand-in", {"Running"})["podIP"]
    storage = _wait_pod(kube, namespace, "storage-stand-in", {"Running"})["podIP"]
    targets = {"metadata": f"{stand_in}:{STAND_IN_PORT}", "storage": f"{storage}:{STAND_IN_PORT}"}
    operator_labels = {"app.kubernetes.io/name": "modelapp-operator"}

    before = _probe(kube, namespace, "before", app_image, targets, operator_labels)
    assert all(_last(before["metadata"])) and all(_last(before["storage"])), before

    policy = _policy("operator.yaml", "modelapp-operator-egress", namespace)
    (https,) = [rule for rule in policy["spec"]["egress"] if any("ipBlock" in peer for peer in rule["to"])]
    block = https["to"][0]["ipBlock"]
    assert METADATA_CIDR in block["except"], "the shipped policy must keep the metadata address out"
    block["except"].append(f"{stand_in}/32")
    _apply(kube, policy)

    after = _probe(kube, namespace, "after", app_image, targets, operator_labels)
    assert not any(_last(after["metadata"])), after
    assert all(_last(after["storage"])), after
