"""A real Kubernetes node: containerd + runc, CNI bridge, kubelet and kube-proxy, in a network
namespace of the stack's own.

Layout (N is the stack's network index, the first one free on this machine):

    host                                   node network namespace `modelapp-N`
    ----                                   -----------------------------------
    mdlN  10.243.N.1/30  <── veth ──>      eth0 10.243.N.2/30   (node IP: kubelet, kube-proxy)
    (apiserver, Azurite, registry bind                 cni0 10.244.N.1/24 ── pods (own netns each)
     10.243.N.1 so pods can reach them)    containerd, kubelet, kube-proxy, iptables rules of kube-proxy

The node namespace has no default route: pods reach the node, the host's 10.243.N.1 and each
other, nothing else, so nothing is routed off the machine. The host gets routes to the pod and
Service ranges through the veth (they go away with it), so tests reach Services as any client
on a cluster's network would. kube-proxy's rules live in the node namespace, not the host's, so
stacks side by side never share a chain.

Everything else lives in the run folder: containerd's root, state and socket, kubelet's root,
pod logs, CNI state; the cgroups are under `/modelapp-N` in each hierarchy. The ledger
(cleanup.py) names all of it, so stop, Ctrl-C or the death of the stack's process removes it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import yaml

from .cleanup import CGROUP_ROOT, Ledger, delete_nft_table
from .kube import write_kubeconfig
from .pki import CertificateAuthority
from .procs import ManagedProcess, StackError, log

MAX_NETWORKS = 32
REAL_NODE_LABEL = "modelapp.dev/real-node"
# Real nodes are tainted: only namespaces that ask for them (see `real_node_namespace_annotations`)
# run pods there, so kwok-based tests never land on the one node that runs containers.
REAL_NODE_TAINT = f"{REAL_NODE_LABEL}=true:NoSchedule"
CNI_BIN_DIR = Path("/usr/lib/cni")
CONTAINER_LOG_LINKS = Path("/var/log/containers")
# kube-network-policies' nftables table (family inet) in the node's network namespace, and its API user.
NETPOL_TABLE = "kube-network-policies"
NETPOL_USER = "system:kube-network-policies"
NETPOL_READY_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class NodeNetwork:
    index: int
    namespace: str
    host_link: str
    host_ip: str
    node_ip: str
    pod_cidr: str
    service_cidr: str

    @property
    def bridge_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def api_service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP (first address of the range), for the apiserver's cert."""
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    def nsenter(self) -> list[str]:
        """Prefix that runs a command in the node's network namespace (and nothing else: mounts
        stay shared, so containerd sees the volumes the kubelet mounts)."""
        return ["nsenter", f"--net=/run/netns/{self.namespace}", "--"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise StackError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def create_network(ledger: Ledger) -> NodeNetwork:
    """Claim the first free index (creating the namespace is the lock) and wire the veth."""
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        raise StackError("real nodes need iproute2 (`ip`) and util-linux (`nsenter`)")
    for index in range(MAX_NETWORKS):
        namespace = f"modelapp-{index}"
        if _ip("netns", "add", namespace, check=False).returncode != 0:
            continue
        ledger.record("netns", name=namespace)
        network = NodeNetwork(
            index=index,
            namespace=namespace,
            host_link=f"mdl{index}",
            host_ip=f"10.243.{index}.1",
            node_ip=f"10.243.{index}.2",
            pod_cidr=f"10.244.{index}.0/24",
            service_cidr=f"10.{96 + index}.0.0/16",
        )
        ledger.record("link", name=network.host_link)
        _ip("link", "add", network.host_link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("addr", "add", f"{network.host_ip}/30", "dev", network.host_link)
        _ip("link", "set", network.host_link, "up")
        _ip("-n", namespace, "addr", "add", f"{network.node_ip}/30", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        # The host reaches pods and Services through the node, as a client on the cluster network would.
        _ip("route", "add", network.pod_cidr, "via", network.node_ip)
        _ip("route", "add", network.service_cidr, "via", network.node_ip)
        # Service traffic between pods on the same bridge must pass kube-proxy's rules; these are
        # per-namespace settings and change nothing on the host.
        for setting in ("net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"):
            subprocess.run([*network.nsenter(), "sysctl", "-q", "-w", setting], capture_output=True, check=False)
        log(f"node network {namespace}: host {network.host_ip}, node {network.node_ip}, pods {network.pod_cidr}, "
            f"services {network.service_cidr}")
        return network
    raise StackError(f"no free node network: modelapp-0..{MAX_NETWORKS - 1} all exist (`ip netns list`)")


def real_node_namespace_annotations() -> dict[str, str]:
    """Namespace annotations (PodNodeSelector, PodTolerationRestriction) that put its pods on real nodes."""
    return {
        "scheduler.alpha.kubernetes.io/node-selector": f"{REAL_NODE_LABEL}=true",
        "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(
            [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}]
        ),
    }


@dataclass
class RealNode:
    name: str
    network: NodeNetwork
    run_dir: Path
    containerd_socket: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """containerd's own CLI against this node's containerd, in the `k8s.io` namespace (CRI's)."""
        result = subprocess.run(
            ["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args],
            capture_output=True, text=True, check=False, timeout=300,
        )
        if check and result.returncode != 0:
            raise StackError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def trust_registry(self, host: str, ca_file: Path) -> None:
        """Let this node's containerd pull from `host` over TLS with the stack's CA (hosts.toml)."""
        folder = self.run_dir / "containerd" / "certs.d" / host
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text(
            f'server = "https://{host}"\n\n[host."https://{host}"]\n'
            f'  capabilities = ["pull", "resolve"]\n  ca = {json.dumps(str(ca_file))}\n'
        )

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive))

    def stop(self) -> None:
        # kubelet first (it would restart what containerd stops), then kube-proxy and containerd.
        for process in self.processes:
            process.stop()


def _containerd_config(folder: Path, socket: Path, cni_conf_dir: Path, sandbox_image: str) -> str:
    cri: dict[str, Any] = {
        "sandbox_image": sandbox_image,
        # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails to start
        # ("failed to update /proc/self/oom_score_adj: Permission denied", field notes).
        "restrict_oom_score_adj": True,
        # Pod network namespaces under our state folder, not the host's /var/run/netns.
        "netns_mounts_under_state_dir": True,
        "enable_selinux": False,
        "disable_apparmor": True,
        "stream_server_address": "127.0.0.1",
        "containerd": {
            "snapshotter": "overlayfs",
            "default_runtime_name": "runc",
            "runtimes": {"runc": {"runtime_type": "io.containerd.runc.v2",
                                  "options": {"SystemdCgroup": False, "BinaryName": shutil.which("runc") or "runc"}}},
        },
        "cni": {"bin_dir": str(CNI_BIN_DIR), "conf_dir": str(cni_conf_dir), "max_conf_num": 1},
    }
    # hosts.toml per registry, read at each pull: a registry started after the node is trusted too.
    cri["registry"] = {"config_path": str(folder / "certs.d")}
    config = {
        "version": 2,
        "root": str(folder / "root"),
        "state": str(folder / "state"),
        "grpc": {"address": str(socket)},
        "ttrpc": {"address": str(socket) + ".ttrpc"},
        "debug": {"level": "warn"},
        "metrics": {"address": ""},
        # Plugins that would use folders outside the run folder or that this node has no use for.
        "disabled_plugins": [
            "io.containerd.internal.v1.opt",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.tracing.processor.v1.otlp",
        ],
        "plugins": {"io.containerd.grpc.v1.cri": cri},
    }
    return tomli_w.dumps(config)


def _cni_config(network: NodeNetwork, state: Path) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": f"modelapp-{network.index}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                # Pod traffic leaving the pod range (to the host's services) takes the node's address.
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": network.pod_cidr, "gateway": network.bridge_ip}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(state / "ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def _prepare_cgroup_root(relative: str, ledger: Ledger) -> None:
    """kubelet wants its cgroup root to exist in every hierarchy; a new cpuset needs cpus and mems."""
    ledger.record("cgroup", path=relative)
    for hierarchy in CGROUP_ROOT.iterdir():
        if not hierarchy.is_dir() or hierarchy.is_symlink():
            continue
        folder = hierarchy / relative.lstrip("/")
        with contextlib.suppress(OSError):
            folder.mkdir(exist_ok=True)
        if (hierarchy / "cpuset.cpus").exists():
            for name in ("cpuset.cpus", "cpuset.mems"):
                with contextlib.suppress(OSError):
                    (folder / name).write_text((hierarchy / name).read_text())


def start_real_node(
    *,
    name: str,
    run_dir: Path,
    network: NodeNetwork,
    kube_binary: Path,
    server: str,
    ca: CertificateAuthority,
    ledger: Ledger,
    sandbox_image: str,
    sandbox_archive: Path,
) -> RealNode:
    """Start containerd, kubelet and kube-proxy for node `name`; return once they are running
    (the caller waits for the Node to be Ready through the API)."""
    for tool in ("containerd", "runc", "ctr", "iptables"):
        if shutil.which(tool) is None:
            raise StackError(f"real nodes need `{tool}`: apt-get install containerd runc iptables")
    if not (CNI_BIN_DIR / "bridge").exists():
        raise StackError(f"real nodes need CNI plugins in {CNI_BIN_DIR}: apt-get install containernetworking-plugins")
    started = time.monotonic()
    # Unix socket paths (containerd's, kubelet's pod-resources and plugin sockets) are limited to
    # about 100 bytes, and a run folder under pytest's tmp_path is longer: everything of the node
    # is named through a short link to its folder in the run folder.
    (run_dir / name).mkdir(parents=True, exist_ok=True)
    folder = Path(f"/run/modelapp-{network.index}")
    ledger.record("path", path=str(folder))
    folder.unlink(missing_ok=True)
    folder.symlink_to(run_dir / name)
    logs = folder / "logs"
    containerd_dir = folder / "containerd"
    cni_conf_dir = folder / "cni" / "net.d"
    for path in (logs, containerd_dir, cni_conf_dir):
        path.mkdir(parents=True, exist_ok=True)
    socket = containerd_dir / "containerd.sock"
    node = RealNode(name=name, network=network, run_dir=folder, containerd_socket=socket)
    cgroup_root = f"/modelapp-{network.index}"
    _prepare_cgroup_root(cgroup_root, ledger)
    # kubelet links each container's log into this host folder; the links point into our run folder.
    ledger.record("symlinks-into", folder=str(CONTAINER_LOG_LINKS))
    ledger.record("path", path=f"/var/lib/cni/results/modelapp-{network.index}")

    (cni_conf_dir / "10-modelapp.conflist").write_text(json.dumps(_cni_config(network, folder / "cni"), indent=2))
    config_path = containerd_dir / "config.toml"
    config_path.write_text(_containerd_config(containerd_dir, socket, cni_conf_dir, sandbox_image))
    try:
        containerd = ManagedProcess("containerd", [*network.nsenter(), "containerd", f"--config={config_path}"],
                                    logs / "containerd.log")
        node.processes.append(containerd)
        containerd.start()
        containerd.wait_ready(lambda: node.ctr("version", check=False).returncode == 0, 30, "its socket")
        node.import_image(sandbox_archive)

        kubelet_cert = ca.issue(f"{name}-kubelet", f"system:node:{name}", organizations=("system:nodes",),
                                client=True)
        proxy_cert = ca.issue(f"{name}-proxy", "system:kube-proxy", client=True)
        kubelet_kubeconfig = write_kubeconfig(folder / "kubelet.kubeconfig", server, ca.cert_path,
                                         kubelet_cert.cert, kubelet_cert.key, f"system:node:{name}")
        proxy_kubeconfig = write_kubeconfig(folder / "kube-proxy.kubeconfig", server, ca.cert_path,
                                       proxy_cert.cert, proxy_cert.key, "system:kube-proxy")
        kubelet_config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine has cgroups v1 (hybrid); kubelet refuses v1 unless told (field notes).
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": cgroup_root,
            "containerRuntimeEndpoint": f"unix://{socket}",
            "failSwapOn": False,
            "address": network.node_ip,
            "healthzBindAddress": "127.0.0.1",
            "readOnlyPort": 0,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(ca.cert_path)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": str(folder / "pod-logs"),
            "volumePluginDir": str(folder / "volume-plugins"),
            "enforceNodeAllocatable": [],
            "resolvConf": "",
            "serializeImagePulls": False,
            # A shared test machine's disk and memory are not this node's to guard.
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "10s",
            "rotateCertificates": False,
            "maxPods": 110,
        }
        (folder / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config))
        kubelet = ManagedProcess(
            "kubelet",
            [
                *network.nsenter(), str(kube_binary), "kubelet",
                f"--config={folder / 'kubelet.yaml'}",
                f"--kubeconfig={kubelet_kubeconfig}",
                f"--root-dir={folder / 'kubelet'}",
                f"--cert-dir={folder / 'kubelet' / 'pki'}",
                f"--hostname-override={name}",
                f"--node-ip={network.node_ip}",
                f"--node-labels={REAL_NODE_LABEL}=true,type=real",
                f"--register-with-taints={REAL_NODE_TAINT}",
                "--v=1",
            ],
            logs / "kubelet.log",
        )
        proxy_config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(proxy_kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": network.pod_cidr,
            "hostnameOverride": name,
            "bindAddress": network.node_ip,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # Leave conntrack sysctls alone: some are not per network namespace.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        }
        (folder / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy_config))
        proxy = ManagedProcess(
            "kube-proxy",
            [*network.nsenter(), str(kube_binary), "kube-proxy", f"--config={folder / 'kube-proxy.yaml'}", "--v=0"],
            logs / "kube-proxy.log",
        )
        for process in (kubelet, proxy):
            node.processes.insert(0, process)
            process.start()
    except BaseException:
        node.stop()
        raise
    log(f"real node {name} started in {time.monotonic() - started:.1f}s "
        f"(containerd, kubelet, kube-proxy in netns {network.namespace})")
    return node


def network_policy_rbac() -> list[dict[str, Any]]:
    """What kube-network-policies reads (its upstream install.yaml, less the admin policy APIs): pods,
    namespaces and NetworkPolicies, and the events it records."""
    name = "modelapp-local:kube-network-policies"
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
         "rules": [
             {"apiGroups": [""], "resources": ["pods", "namespaces", "nodes"], "verbs": ["list", "watch"]},
             {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch"]},
             {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": NETPOL_USER}]},
    ]


def start_network_policies(
    node: RealNode, *, binary: Path, server: str, ca: CertificateAuthority, ledger: Ledger
) -> ManagedProcess:
    """Run kube-network-policies for `node` in its network namespace (where pod traffic is bridged and
    routed) and wait for its nftables table. The RBAC of `network_policy_rbac()` must be applied first.

    Its table goes when it stops (SIGTERM: it deletes the table itself), when the stack's undo runs
    (the ledger's `nft-table` entry, for a controller that was killed) and at the latest with the netns."""
    network = node.network
    ledger.record("nft-table", netns=network.namespace, family="inet", name=NETPOL_TABLE)
    cert = ca.issue(f"{node.name}-netpol", NETPOL_USER, client=True)
    kubeconfig = write_kubeconfig(node.run_dir / "kube-network-policies.kubeconfig", server, ca.cert_path,
                                  cert.cert, cert.key, NETPOL_USER)
    process = ManagedProcess(
        "kube-network-policies",
        [*network.nsenter(), str(binary), f"--kubeconfig={kubeconfig}", f"--hostname-override={node.name}",
         "--v=2"],
        node.run_dir / "logs" / "kube-network-policies.log",
    )
    # Stopped before kubelet and containerd (node.stop() goes in list order).
    node.processes.insert(0, process)
    process.start()

    def table_present() -> bool:
        listed = subprocess.run([*network.nsenter(), "nft", "list", "table", "inet", NETPOL_TABLE],
                                capture_output=True, text=True, check=False)
        return listed.returncode == 0

    try:
        process.wait_ready(table_present, NETPOL_READY_TIMEOUT_SECONDS, f"its nftables table inet {NETPOL_TABLE}")
    except BaseException:
        process.stop()
        delete_nft_table(network.namespace, "inet", NETPOL_TABLE)
        raise
    log(f"kube-network-policies enforces NetworkPolicies on {node.name} (nftables table inet {NETPOL_TABLE})")
    return process
