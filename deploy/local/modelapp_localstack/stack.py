"""The local stack as one object: start what is asked for, stop all of it.

With `real_nodes=1` the stack first makes a node network (node.py); every service then binds the
host side of it instead of loopback, so pods on the real node reach the API server, Azurite and
the registry at the same address the tests use.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .azurite import Azurite, start_azurite
from .binaries import REPO_ROOT
from .buildah import Buildah
from .cleanup import LEDGER_NAME, Janitor, Ledger, recording_into, undo
from .entra import EntraStandIn, start_entra_stand_in
from .kube import KubeCluster, start_cluster
from .node import (
    NodeNetwork,
    RealNode,
    create_network,
    network_policy_rbac,
    start_network_policies,
    start_real_node,
)
from .pki import CertificateAuthority
from .procs import ManagedProcess, StackError, log
from .prometheus import Prometheus, start_prometheus
from .registry import Registry, start_registry

LOOPBACK = "127.0.0.1"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
REAL_NODE_NAME = "real-node-0"
REAL_NODE_READY_TIMEOUT_SECONDS = 120.0


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass
class Stack:
    """Owns a run folder; every file and process it makes lives under it or is in its ledger."""

    run_dir: Path
    keep_run_dir: bool = False
    real_nodes: int = 0
    kube: KubeCluster | None = None
    azurite: Azurite | None = None
    registry: Registry | None = None
    prometheus: Prometheus | None = None
    node: RealNode | None = None
    network: NodeNetwork | None = None
    azurite_oauth: Azurite | None = None
    entra: EntraStandIn | None = None
    metrics_server: ManagedProcess | None = None
    _ca: CertificateAuthority | None = field(default=None, repr=False)
    _ledger: Ledger | None = field(default=None, repr=False)
    _janitor: Janitor | None = field(default=None, repr=False)

    @classmethod
    def create(cls, run_dir: Path | None = None, *, keep_run_dir: bool = False, real_nodes: int = 0) -> Stack:
        """real_nodes: 0 (kwok nodes only) or 1 (also a node that runs containers; needs root)."""
        if real_nodes not in (0, 1):
            raise StackError("the local stack runs at most one real node")
        if run_dir is None:
            base = REPO_ROOT / ".run"
            base.mkdir(exist_ok=True)
            run_dir = Path(tempfile.mkdtemp(prefix="stack-", dir=base))
        run_dir.mkdir(parents=True, exist_ok=True)
        stack = cls(run_dir=run_dir, keep_run_dir=keep_run_dir, real_nodes=real_nodes)
        stack._ledger = Ledger(run_dir / LEDGER_NAME)
        # From here on, even a SIGKILL of this process leaves nothing behind.
        stack._janitor = Janitor.start(run_dir, stack._ledger, remove_run_dir=not keep_run_dir)
        return stack

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.run_dir / LEDGER_NAME)
        return self._ledger

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            self._ca = CertificateAuthority(self.run_dir / "pki-services", "modelapp-local-services-ca")
        return self._ca

    @property
    def host(self) -> str:
        """The address services bind: loopback, or the host side of the real node's network."""
        if not self.real_nodes:
            return LOOPBACK
        if self.network is None:
            self.network = create_network(self.ledger)
        return self.network.host_ip

    def start_kube(self, nodes: int = 2) -> KubeCluster:
        if self.kube is None:
            with recording_into(self.ledger):
                host = self.host
                extra = {"service_cidr": self.network.service_cidr} if self.network else {}
                self.kube = start_cluster(self.run_dir / "kube", nodes=nodes, host=host, **extra)
                if self.real_nodes:
                    self.node = self._start_real_node(self.kube)
        return self.kube

    def start_network_policies(self) -> ManagedProcess:
        """kube-network-policies on the real node (node.start_network_policies): NetworkPolicies are enforced
        for its pods from here on. With no NetworkPolicy selecting a pod, nothing of its traffic is queued."""
        from . import binaries  # noqa: PLC0415 - kwok-only stacks never build it

        kube = self.kube
        if kube is None or self.node is None:
            raise StackError("NetworkPolicies are enforced on the real node: start the stack with real_nodes=1")
        for process in self.node.processes:
            if process.name == "kube-network-policies" and process.alive():
                return process
        binary = binaries.netpol_binary()
        kube.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": network_policy_rbac()}))
        with recording_into(self.ledger):
            return start_network_policies(self.node, binary=binary, server=kube.server, ca=kube.ca,
                                          ledger=self.ledger)

    def start_metrics_server(self) -> ManagedProcess:
        """metrics-server (metrics_server.py) scraping the real node's kubelet, behind the aggregation layer:
        HPAs read pods' CPU from it, `kubectl top pods` works."""
        from . import binaries  # noqa: PLC0415 - kwok-only stacks never build it
        from .metrics_server import start_metrics_server  # noqa: PLC0415
        from .node import REAL_NODE_LABEL  # noqa: PLC0415

        kube = self.kube
        if kube is None or self.node is None:
            raise StackError("metrics-server reads the real node's kubelet: start the stack with real_nodes=1")
        if self.metrics_server is None or not self.metrics_server.alive():
            with recording_into(self.ledger):
                self.metrics_server = start_metrics_server(
                    kube, binary=binaries.metrics_server_binary(), host=self.host,
                    node_selector=f"{REAL_NODE_LABEL}=true",
                )
        return self.metrics_server

    def _start_real_node(self, kube: KubeCluster) -> RealNode:
        from . import images  # noqa: PLC0415 - images build with buildah; kwok-only stacks never need them

        assert self.network is not None
        started = time.monotonic()
        node = start_real_node(
            name=REAL_NODE_NAME,
            run_dir=self.run_dir / "nodes",
            network=self.network,
            kube_binary=kube.binary,
            server=kube.server,
            ca=kube.ca,
            ledger=self.ledger,
            sandbox_image=images.PAUSE_IMAGE,
            sandbox_archive=images.pause_image_archive(),
        )
        if self.registry is not None:
            node.trust_registry(self.registry.host, self.registry.ca_file)
        deadline = time.monotonic() + REAL_NODE_READY_TIMEOUT_SECONDS
        while True:
            for process in node.processes:
                if not process.alive():
                    raise StackError(f"{process.name} exited (log {process.log_path}):\n{process.log_tail()}")
            ready = kube.kubectl(
                "get", "node", REAL_NODE_NAME, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                check=False,
            ).stdout.strip()
            if ready == "True":
                break
            if time.monotonic() > deadline:
                kubelet = node.processes[-2] if len(node.processes) > 1 else node.processes[0]
                raise StackError(f"real node {REAL_NODE_NAME} not Ready after "
                                 f"{REAL_NODE_READY_TIMEOUT_SECONDS:.0f}s; kubelet log:\n{kubelet.log_tail(40)}")
            time.sleep(0.5)
        # The node lifecycle controller (off: kwok nodes send no heartbeats) would lift this.
        kube.kubectl("taint", "nodes", REAL_NODE_NAME, "node.kubernetes.io/not-ready:NoSchedule-", check=False)
        log(f"real node {REAL_NODE_NAME} Ready in {time.monotonic() - started:.1f}s")
        return node

    def start_azurite(self) -> Azurite:
        if self.azurite is None:
            with recording_into(self.ledger):
                self.azurite = start_azurite(self.run_dir, host=self.host)
        return self.azurite

    def start_azurite_oauth(self) -> Azurite:
        """A second Azurite in OAuth mode (HTTPS, certificate from the stack's CA): bearer tokens only."""
        if self.azurite_oauth is None:
            host = self.host
            cert = self.ca.issue("azurite-oauth", "modelapp-azurite-oauth", dns_names=("localhost",),
                                 ip_addresses=(host,), server=True)
            with recording_into(self.ledger):
                self.azurite_oauth = start_azurite(self.run_dir, host=host, oauth_cert=cert)
        return self.azurite_oauth

    def start_entra(self) -> EntraStandIn:
        """The Entra ID stand-in (entra.py), trusting the API server's service-account issuer: local only."""
        if self.entra is None:
            kube = self.start_kube()

            def issuer_keys(issuer: str) -> dict[str, Any]:
                # What Entra does with the issuer URL (OIDC discovery, then jwks_uri), through the API server,
                # which serves both; its issuer URL itself resolves nowhere off the cluster.
                discovery = json.loads(kube.kubectl("get", "--raw", "/.well-known/openid-configuration").stdout)
                if discovery.get("issuer") != issuer:
                    raise StackError(f"the API server's issuer is {discovery.get('issuer')!r}, not {issuer!r}")
                jwks_path = urlsplit(str(discovery["jwks_uri"])).path
                keys: dict[str, Any] = json.loads(kube.kubectl("get", "--raw", jwks_path).stdout)
                return keys

            self.entra = start_entra_stand_in(self.ca, issuer_keys, host=self.host)
        return self.entra

    def start_registry(self, notify_url: str | None = None, notify_token: str | None = None) -> Registry:
        if self.registry is None:
            with recording_into(self.ledger):
                self.registry = start_registry(self.run_dir, self.ca, notify_url=notify_url,
                                               notify_token=notify_token, host=self.host)
            if self.node is not None:
                self.node.trust_registry(self.registry.host, self.registry.ca_file)
        return self.registry

    def start_prometheus(self) -> Prometheus:
        """Debian's prometheus on the stack's host address, its data in the run folder."""
        if self.prometheus is None:
            with recording_into(self.ledger):
                self.prometheus = start_prometheus(self.run_dir, host=self.host)
        return self.prometheus

    def buildah(self) -> Buildah:
        return Buildah(self.run_dir)

    def node_exec(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command in the real node's network namespace (as a process on the node would)."""
        if self.network is None:
            raise StackError("this stack has no real node")
        return subprocess.run([*self.network.nsenter(), *args], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def stop(self) -> None:
        """Stop everything and remove what the ledger names. A second Ctrl-C or SIGTERM while this
        runs is ignored: a half-done clean-up is the one thing worse than a slow one."""
        started = time.monotonic()
        with _signals_ignored():
            for component in (self.metrics_server, self.entra, self.azurite_oauth, self.prometheus, self.node,
                              self.registry,
                              self.azurite, self.kube):
                if component is not None:
                    with contextlib.suppress(Exception):
                        component.stop()
            self.prometheus = self.entra = self.azurite_oauth = self.metrics_server = None
            self.node = self.registry = self.azurite = self.kube = None
            # Containers, mounts, the node network, cgroups, links: whatever the ledger names. The run
            # folder (and the ledger in it) goes last, in the janitor's pass, so it knows whom to spare.
            undo(self.ledger, self.run_dir, remove_run_dir=False)
            self.network = None
            if self._janitor is not None:
                self._janitor.release()
                self._janitor = None
            if not self.keep_run_dir:
                undo(self.ledger, self.run_dir, remove_run_dir=True)
        if self.real_nodes:
            log(f"stack stopped and cleaned up in {time.monotonic() - started:.1f}s")

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
