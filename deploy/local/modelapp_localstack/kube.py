"""A real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok (fake nodes whose pods become
Running and Ready, so Deployment rollouts behave as on a real cluster).
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import binaries
from .pki import CertificateAuthority, write_service_account_key
from .procs import ManagedProcess, StackError, free_port, log

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_POD_CIDR = "10.245.0.0/16"  # kwok pods: never routed, never a real pod's address (real nodes: node.py)
POD_READY_STAGE = "pod-ready"
FRONT_PROXY_CLIENT = "front-proxy-client"  # the API server's name towards extension API servers


def _stage(name: str, kind: str, expressions: list[dict[str, Any]], next_step: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": name},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": kind},
            "selector": {"matchExpressions": expressions},
            "next": next_step,
        },
    }


def default_stages() -> list[dict[str, Any]]:
    """How fake nodes and pods move through their lives.

    kwok reads these as Stage objects from the API server, so a test can change
    them at run time: patching the `pod-ready` stage to skip an image models an
    app that never becomes ready, with nothing in the operator knowing about it.
    """
    not_deleted = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
    return [
        _stage(
            POD_READY_STAGE,
            "Pod",
            [
                not_deleted,
                {"key": ".status.phase", "operator": "In", "values": ["Pending"]},
                {"key": '.status.conditions.[] | select( .type == "Ready" ) | .status',
                 "operator": "NotIn", "values": ["True"]},
            ],
            {"statusTemplate": _READY_POD_STATUS},
        ),
        _stage(
            "pod-delete",
            "Pod",
            [{"key": ".metadata.deletionTimestamp", "operator": "Exists"}],
            {"finalizers": {"empty": True}, "delete": True},
        ),
        _stage(
            "node-initialize",
            "Node",
            [{"key": '.status.conditions.[] | select( .type == "Ready" ) | .status',
              "operator": "NotIn", "values": ["True"]}],
            {"statusTemplate": _NODE_STATUS},
        ),
    ]


_READY_POD_STATUS = """
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: PodScheduled
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  name: {{ .name | Quote }}
  ready: true
  restartCount: 0
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
{{ with NodeIPsWith .spec.nodeName }}
hostIP: {{ index . 0 | Quote }}
{{ end }}
{{ with PodIPsWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" )
     ( or .metadata.name "" ) ( or .metadata.namespace "" ) }}
podIP: {{ index . 0 | Quote }}
podIPs:
{{ range . }}
- ip: {{ . | Quote }}
{{ end }}
{{ end }}
phase: Running
startTime: {{ $now | Quote }}
"""

_NODE_STATUS = """
{{ $now := Now }}
conditions:
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $now | Quote }}
  message: kwok fake node is ready
  reason: KubeletReady
  status: "True"
  type: Ready
addresses:
- address: {{ NodeIP | Quote }}
  type: InternalIP
- address: {{ .metadata.name | Quote }}
  type: Hostname
allocatable:
  cpu: "32"
  memory: 256Gi
  pods: "1000"
capacity:
  cpu: "32"
  memory: 256Gi
  pods: "1000"
nodeInfo:
  architecture: amd64
  kubeletVersion: fake
  kubeProxyVersion: fake
  operatingSystem: linux
phase: Running
"""


def fake_node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
        },
        "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "pods": "1000"}},
    }


@dataclass
class KubeCluster:
    """A running control plane. `kubectl` runs the kubectl built with it."""

    run_dir: Path
    server: str
    kubeconfig: Path
    ca_file: Path
    binary: Path
    ca: CertificateAuthority
    processes: list[ManagedProcess] = field(default_factory=list)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), "kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, ["kubectl", *args], result.stdout, result.stderr
            )
        return result

    def set_never_ready_images(self, images: list[str]) -> None:
        """Make kwok leave pods whose first container runs one of `images` unready (Pending) for good.

        This configures the fake nodes, like a broken image would on a real cluster;
        nothing in the code under test knows about it. An empty list restores the default.
        """
        expressions = [e for e in default_stages()[0]["spec"]["selector"]["matchExpressions"]]
        if images:
            expressions.append({"key": ".spec.containers.[0].image", "operator": "NotIn", "values": images})
        patch = {"spec": {"selector": {"matchExpressions": expressions}}}
        self.kubectl("patch", "stage.kwok.x-k8s.io", POD_READY_STAGE, "--type=merge", "-p", json.dumps(patch))

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def process(self, name: str) -> ManagedProcess:
        return next(p for p in self.processes if p.name == name)

    def api_ready(self) -> bool:
        result = self.kubectl("get", "--raw", "/readyz", check=False, timeout=5)
        return result.returncode == 0 and result.stdout.strip() == "ok"

    def restart_apiserver(self, *, kill: bool = False, down_seconds: float = 0.0) -> None:
        """Restart kube-apiserver (SIGTERM, or SIGKILL with kill=True): same port and certificates;
        etcd keeps running, so every object survives. Returns once /readyz answers again."""
        self.process("kube-apiserver").restart(
            self.api_ready, 90, kill=kill, down_seconds=down_seconds, what="/readyz after a restart"
        )


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    """A kubeconfig with one cluster and one client-certificate user (the admin, a node, kube-proxy)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "modelapp-local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "modelapp-local", "context": {"cluster": "modelapp-local", "user": user}}],
        "current-context": "modelapp-local",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def start_cluster(
    run_dir: Path, *, nodes: int = 2, host: str = "127.0.0.1", service_cidr: str = "10.96.0.0/16"
) -> KubeCluster:
    """Start the control plane with `nodes` kwok nodes. `host`: the address the API server binds
    and advertises (loopback, or the host side of a real node's network so pods reach it)."""
    started = time.monotonic()
    kube = binaries.kube_binary()
    kwok = binaries.kwok_binary()
    run_dir.mkdir(parents=True, exist_ok=True)
    pki_dir = run_dir / "pki"
    ca = CertificateAuthority(pki_dir, "modelapp-local-kubernetes-ca")
    serving = ca.issue(
        "apiserver",
        "kube-apiserver",
        dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
        ip_addresses=tuple(dict.fromkeys(("127.0.0.1", host, str(next(ipaddress.ip_network(service_cidr).hosts()))))),
        server=True,
    )
    admin = ca.issue("admin", "modelapp-admin", organizations=("system:masters",), client=True)
    # The API server's client certificate towards kubelets (logs, exec, port-forward on real nodes).
    kubelet_client = ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                              organizations=("system:masters",), client=True)
    sa_private, sa_public = write_service_account_key(pki_dir)
    # The aggregation layer (metrics-server's metrics.k8s.io): the API server proxies to an extension API
    # server with this client certificate, of a CA of its own, and passes the caller's identity in headers.
    front_proxy_ca = CertificateAuthority(pki_dir / "front-proxy", "modelapp-local-front-proxy-ca")
    front_proxy = front_proxy_ca.issue("front-proxy-client", FRONT_PROXY_CLIENT, client=True)

    etcd_port, etcd_peer_port, api_port = free_port(), free_port(), free_port()
    server = f"https://{host}:{api_port}"
    kubeconfig = run_dir / "kubeconfig"
    write_kubeconfig(kubeconfig, server, ca.cert_path, admin.cert, admin.key, "modelapp-admin")
    cluster = KubeCluster(run_dir=run_dir, server=server, kubeconfig=kubeconfig, ca_file=ca.cert_path, binary=kube,
                          ca=ca)
    logs = run_dir / "logs"

    try:
        etcd = ManagedProcess(
            "etcd",
            [
                str(kube), "etcd",
                "--name=modelapp-local",
                f"--data-dir={run_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                f"--initial-cluster=modelapp-local=http://127.0.0.1:{etcd_peer_port}",
                "--listen-metrics-urls=",
                # Test data: durability across power loss is not worth the fsync cost.
                "--unsafe-no-fsync",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
            logs / "etcd.log",
        )
        cluster.processes.append(etcd)
        etcd.start()
        etcd.wait_ready(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{etcd_port}/health", timeout=1).status == 200,
            30,
            "health",
        )

        apiserver = ManagedProcess(
            "kube-apiserver",
            [
                str(kube), "kube-apiserver",
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--bind-address={host}",
                f"--advertise-address={host}",
                f"--secure-port={api_port}",
                f"--cert-dir={run_dir / 'apiserver-certs'}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert_path}",
                f"--service-account-key-file={sa_public}",
                f"--service-account-signing-key-file={sa_private}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={service_cidr}",
                "--authorization-mode=Node,RBAC",
                # Namespaces choose real or kwok nodes with annotations (node.real_node_namespace_annotations).
                "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                # The endpoints of the `kubernetes` Service may not be loopback addresses; on a
                # real node's network the API server's address is what pods reach it at.
                f"--endpoint-reconciler-type={'none' if host == '127.0.0.1' else 'lease'}",
                "--enable-priority-and-fairness=false",
                # Nodes are reached at their InternalIP (the real node has no DNS name the host resolves).
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                f"--requestheader-client-ca-file={front_proxy_ca.cert_path}",
                f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={front_proxy.cert}",
                f"--proxy-client-key-file={front_proxy.key}",
                # To an APIService's endpoint, not its Service's cluster IP: the API server runs on the host,
                # where no kube-proxy programs cluster IPs (metrics_server.py).
                "--enable-aggregator-routing=true",
                "--profiling=false",
                "--v=0",
            ],
            logs / "kube-apiserver.log",
        )
        cluster.processes.append(apiserver)
        apiserver.start()
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        context.load_cert_chain(str(admin.cert), str(admin.key))

        def api_ready() -> bool:
            with urllib.request.urlopen(f"{server}/readyz", context=context, timeout=2) as response:
                return bool(response.status == 200)

        apiserver.wait_ready(api_ready, 90, "/readyz")

        common = [f"--kubeconfig={kubeconfig}", "--bind-address=127.0.0.1", "--leader-elect=false"]
        controller_manager = ManagedProcess(
            "kube-controller-manager",
            [
                str(kube), "kube-controller-manager",
                *common,
                f"--secure-port={free_port()}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--service-account-private-key-file={sa_private}",
                f"--root-ca-file={ca.cert_path}",
                f"--cluster-signing-cert-file={ca.cert_path}",
                f"--cluster-signing-key-file={ca.key_path}",
                "--use-service-account-credentials=false",
                "--controllers=*,-node-ipam-controller,-node-lifecycle-controller",
                # Fast feedback for tests and local runs. The default client rate limit (20 QPS)
                # makes the controller manager, not the operator, the bottleneck of a large rollout.
                "--kube-api-qps=300",
                "--kube-api-burst=500",
                "--concurrent-deployment-syncs=10",
                "--concurrent-replicaset-syncs=10",
                "--concurrent-gc-syncs=20",
                # The stack installs the ModelApp CRD and a tenant's quota on it at once: the quota
                # controller discovers the new resource within 30 s but recounts a quota only on its
                # full resync (default 5 min); until then every create is refused "status unknown".
                "--resource-quota-sync-period=10s",
                "--v=0",
            ],
            logs / "kube-controller-manager.log",
        )
        scheduler = ManagedProcess(
            "kube-scheduler",
            [
                str(kube), "kube-scheduler",
                *common,
                f"--secure-port={free_port()}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--kube-api-qps=300",
                "--kube-api-burst=500",
                "--v=0",
            ],
            logs / "kube-scheduler.log",
        )
        # kwok reads its stages from the API (Stage CRD), so tests can change them at run time.
        cluster.kubectl("apply", "--server-side", "-f", str(binaries.kwok_stage_crd()))
        cluster.kubectl("wait", "--for=condition=Established", "crd/stages.kwok.x-k8s.io", "--timeout=30s")
        cluster.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": default_stages()}))
        kwok_process = ManagedProcess(
            "kwok",
            [
                str(kwok),
                f"--kubeconfig={kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                "--node-ip=127.0.0.1",
                # Fake pods' addresses, apart from the real nodes' 10.244.N.0/24: kube-network-policies maps a
                # packet's address to its pod, and a kwok pod holding a real pod's address made its verdicts flap.
                f"--cidr={FAKE_POD_CIDR}",
                f"--server-address=127.0.0.1:{free_port()}",
                "--enable-crds=Stage",
            ],
            logs / "kwok.log",
        )
        for process in (controller_manager, scheduler, kwok_process):
            cluster.processes.append(process)
            process.start()

        cluster.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "List", "items": [fake_node(f"kwok-node-{i}") for i in range(nodes)],
        }))
        deadline = time.monotonic() + 60
        while True:
            for process in cluster.processes:
                if not process.alive():
                    raise StackError(f"{process.name} exited (log {process.log_path}):\n{process.log_tail()}")
            ready = cluster.kubectl(
                "get", "nodes", "-o",
                "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{'\\n'}{end}",
                check=False,
            ).stdout.split()
            # The default ServiceAccount shows the controller manager is working.
            has_sa = cluster.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0
            if ready.count("True") == nodes and has_sa:
                # The API server taints new nodes not-ready; lifting that is the node lifecycle
                # controller's job, which is off because fake nodes send no kubelet heartbeats.
                cluster.kubectl("taint", "nodes", "--all", "node.kubernetes.io/not-ready:NoSchedule-", check=False)
                break
            if time.monotonic() > deadline:
                raise StackError(f"control plane not ready after 60s: nodes={ready} default-sa={has_sa}")
            time.sleep(0.2)
    except BaseException:
        cluster.stop()
        raise
    log(f"Kubernetes {binaries.versions().kubernetes} up at {server} in {time.monotonic() - started:.1f}s "
        f"({nodes} kwok nodes)")
    return cluster
