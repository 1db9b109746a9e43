"""Two replicas, one active, against the real kube-apiserver: leader election on a Lease in the operator's
own namespace (modelapp_operator.leader; docs/operations.md, "Two replicas, one active").

- two operator processes: one holds the Lease and reconciles, the other stands by and forwards a webhook to
  the holder's pod (its IP read from the API), token in the header;
- a Lease patched to name an attacker's address, or a pod that does not exist, redirects no webhook: a
  listener on loopback playing the attacker receives nothing;
- a namespace admin of an app namespace (the strongest tenant) can neither write the Lease nor read the pods
  it names;
- no Lease and none creatable (its namespace missing): nobody acts; once it can be created, one replica
  creates it and acts.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.storage.blob import ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry
from modelapp_localstack.operator import OperatorProcess
from modelapp_localstack.procs import free_port

from tests.cluster.helpers import App, StartOperator, apply, get, modelapp, prepare, wait_for, wait_ready
from tests.cluster.operator_pods import operator_namespace, stand_in_pod

pytestmark = pytest.mark.cluster

LEASE = "modelapp-operator"
TOKEN = "leader-election-test-token"
FAST = {  # short, as client-go allows (lease > deadline > 1.2 x retry), so the test waits seconds, not minutes
    "MODELAPP_LEADER_ELECTION_LEASE_SECONDS": "4",
    "MODELAPP_LEADER_ELECTION_RENEW_DEADLINE_SECONDS": "3",
    "MODELAPP_LEADER_ELECTION_RETRY_SECONDS": "0.5",
}


def env(namespace: str, pod: str, port: int, **extra: str) -> dict[str, str]:
    return {
        "MODELAPP_LEADER_ELECTION": LEASE,
        "MODELAPP_POD_NAMESPACE": namespace,
        "MODELAPP_POD_NAME": pod,
        "MODELAPP_RECEIVER_TOKEN": TOKEN,
        "MODELAPP_RECEIVER_PORT": str(port),
        "MODELAPP_RECEIVER_BIND": "127.0.0.1",
        "MODELAPP_POLL_INTERVAL_SECONDS": "2",
        **FAST,
        **extra,
    }


def lease(kube: KubeCluster, namespace: str) -> dict[str, Any] | None:
    found = kube.kubectl("get", "lease", LEASE, "-n", namespace, "-o", "json", check=False)
    return json.loads(found.stdout) if found.returncode == 0 else None


def post(port: int, path: str = "/webhooks/registry", body: Any = None) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body if body is not None else {"events": []}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def received(port: int) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return int(json.loads(answer.read())["received"])


def push_event(app: App) -> dict[str, Any]:
    host, _, repository = app.repository.partition("/")
    target = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": repository, "tag": "stable"}
    return {"events": [{"action": "push", "target": target | {"digest": app.digest}, "request": {"host": host}}]}


class Attacker(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []  # noqa: RUF012 - one listener per test run

    def do_POST(self) -> None:
        Attacker.hits.append(f"{self.path} {self.headers.get('Authorization')}")
        self.send_response(202)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def attacker() -> Iterator[int]:
    Attacker.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_two_operators_one_acts_and_a_patched_lease_redirects_no_webhook(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    start_operator: StartOperator,
    attacker: int,
) -> None:
    namespace = operator_namespace(kube, f"le-{uuid.uuid4().hex[:6]}")
    prefix = f"lea-{uuid.uuid4().hex[:4]}"
    port_a, port_b = free_port(), free_port()
    stand_in_pod(kube, namespace, "operator-a", port_a)
    stand_in_pod(kube, namespace, "operator-b", port_b)
    first = start_operator(f"{prefix}-*", env(namespace, "operator-a", port_a), secrets=[TOKEN])
    wait_for("operator-a active", lambda: "is now active" in first.log_text(), first, 60, 0.2)
    second = start_operator(f"{prefix}-*", env(namespace, "operator-b", port_b), secrets=[TOKEN])
    wait_for("operator-b standing by", lambda: "operator-a holds the Lease" in second.log_text(), second, 60, 0.2)
    held = lease(kube, namespace)
    assert held is not None and held["spec"]["holderIdentity"] == "operator-a"
    assert held["spec"]["leaseDurationSeconds"] == 4 and held["spec"]["leaseTransitions"] == 0

    app = prepare(kube, registry, azurite, models, prefix=prefix)
    apply(kube, modelapp(app, azurite, replicas=1))
    wait_ready(kube, app, first)
    assert f"{app.namespace}/iris: reconciled" in first.log_text()
    assert "reconciled" not in second.log_text() and "is now active" not in second.log_text()

    # A webhook to the standby reaches the leader (forwarded to operator-a's pod IP and port), not the standby.
    before = received(port_a)
    assert post(port_b, body=push_event(app)) == 202
    assert received(port_a) == before + 1 and received(port_b) == 0

    # The Lease patched (as only an admin of its namespace can) to name an address, then a pod that does not
    # exist: the standby forwards nothing anywhere; the attacker's listener on loopback gets no request.
    for holder in (f"127.0.0.1:{attacker}", f"http://127.0.0.1:{attacker}/", "operator-ghost"):
        patch = {"spec": {"holderIdentity": holder}}
        kube.kubectl("patch", "lease", LEASE, "-n", namespace, "--type=merge", "-p", json.dumps(patch))
        time.sleep(1.0)  # both replicas have read it (retry 0.5 s); it expires 4 s after the patch
        assert post(port_b) == 503
        assert post(port_a) == 503  # operator-a lost the Lease to the patch: it stands by at once, too
    assert Attacker.hits == []
    # The patched holder never renews: after its lease duration one of the two takes the Lease again.
    taken = wait_for("a replica takes the Lease again", lambda: holder_of(kube, namespace), first, 30, 0.2)
    assert taken in ("operator-a", "operator-b")
    assert Attacker.hits == []


def holder_of(kube: KubeCluster, namespace: str) -> str | None:
    found = lease(kube, namespace)
    holder = (found or {}).get("spec", {}).get("holderIdentity")
    return holder if holder in ("operator-a", "operator-b") else None


def test_tenant_credentials_cannot_write_the_lease_or_read_its_pods(kube: KubeCluster) -> None:
    namespace = operator_namespace(kube, f"le-{uuid.uuid4().hex[:6]}")
    tenant = f"lea-{uuid.uuid4().hex[:4]}-team"
    kube.kubectl("create", "namespace", tenant)
    # The strongest tenant: the built-in admin ClusterRole in its own namespace.
    kube.kubectl("create", "rolebinding", "team-admin", "-n", tenant, "--clusterrole=admin", "--user=team-admin")
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE, "namespace": namespace},
        "spec": {"holderIdentity": "operator-a", "leaseDurationSeconds": 15},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    as_tenant = ["--as=team-admin", "--as-group=system:authenticated"]
    assert kube.kubectl("get", "pods", "-n", tenant, *as_tenant, check=False).returncode == 0  # its own: yes
    for attempt in (
        ["patch", "lease", LEASE, "-n", namespace, "--type=merge", "-p", '{"spec":{"holderIdentity":"evil"}}'],
        ["delete", "lease", LEASE, "-n", namespace],
        ["create", "-f", "-"],
        ["get", "pods", "-n", namespace],
        ["get", "lease", LEASE, "-n", namespace],
    ):
        stdin = json.dumps(body | {"metadata": {"name": "other", "namespace": namespace}}) if "-f" in attempt else None
        result = kube.kubectl(*attempt, *as_tenant, input=stdin, check=False)
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), (attempt, result.stderr)
    held = lease(kube, namespace)
    assert held is not None and held["spec"]["holderIdentity"] == "operator-a"


def test_without_a_lease_nobody_acts_until_one_replica_creates_it(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    start_operator: StartOperator,
) -> None:
    namespace = f"le-{uuid.uuid4().hex[:6]}"  # not created yet: the Lease can be neither read nor created
    prefix = f"leb-{uuid.uuid4().hex[:4]}"
    operator: OperatorProcess = start_operator(f"{prefix}-*", env(namespace, "operator-a", free_port()))
    app = prepare(kube, registry, azurite, models, prefix=prefix)
    apply(kube, modelapp(app, azurite, replicas=1))
    wait_for("a failed Lease attempt", lambda: "cannot read or write the Lease" in operator.log_text(), operator, 60)
    time.sleep(5)  # several attempts (every 0.5 s), and longer than a lease: still nobody acts
    assert get(kube, "deployment", app) is None
    assert not ((get(kube, "modelapp", app) or {}).get("status") or {}).get("conditions")
    assert "is now active" not in operator.log_text()
    operator_namespace(kube, namespace)
    wait_ready(kube, app, operator)
    held = lease(kube, namespace)
    assert held is not None and held["spec"]["holderIdentity"] == "operator-a"
