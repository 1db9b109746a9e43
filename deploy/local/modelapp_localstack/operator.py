"""The operator against the local stack, as in production (`python -m modelapp_operator`), and the
objects a tenant namespace needs before a ModelApp can run there (the CRD, the registry pull
Secret, the Azurite connection-string Secret). Shared by the demo, the cluster tests and the
benchmarks, so all of them run the operator the same way."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from .azurite import Azurite
from .binaries import REPO_ROOT
from .kube import KubeCluster
from .registry import Registry

CRD_FILE = REPO_ROOT / "crds" / "modelapp.yaml"
CRD_NAME = "modelapps.modelapp.io"
OPERATOR_SOURCE = REPO_ROOT / "operator"
# SIGTERM first (what Kubernetes sends); SIGKILL only if the operator has not exited by then.
STOP_TIMEOUT_SECONDS = 20.0


def allowed_sources(registry: Registry) -> dict[str, str]:
    """The operator's allow-lists for the stack (plan/sources.py): exactly the stack's registry, and storage on
    the stack's own address only (its Azurite instances, each on a free port and some started after the
    operator: `host:*`). Nothing else, so an address a test names outside them is refused as in production."""
    host = registry.host.rsplit(":", 1)[0]
    return {"MODELAPP_ALLOWED_REGISTRIES": registry.host, "MODELAPP_ALLOWED_STORAGE": f"{host}:*"}


def apply_crd(kube: KubeCluster) -> None:
    """Install (or update) the ModelApp CRD and wait until the API server serves it."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")


def namespace_object(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}}


def tenant_secrets(namespace: str, registry: Registry, azurite: Azurite) -> list[dict[str, Any]]:
    """The registry pull Secret (`regcred`) and the storage Secret (`storage`, key `connectionString`)."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "regcred", "namespace": namespace},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": registry.dockerconfigjson()},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "storage", "namespace": namespace},
            "stringData": {"connectionString": azurite.connection_string},
        },
    ]


def create_tenant_namespace(
    kube: KubeCluster,
    namespace: str,
    registry: Registry,
    azurite: Azurite,
    labels: Mapping[str, str] | None = None,
) -> None:
    """The namespace (with labels, e.g. pod security) and its two Secrets; idempotent."""
    kube.kubectl("apply", "-f", "-", input=json.dumps(namespace_object(namespace, labels)))
    items = tenant_secrets(namespace, registry, azurite)
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


@dataclass
class OperatorProcess:
    """A running `python -m modelapp_operator` in its own process group, its output in `log_file`.

    Use `OperatorProcess.start(...)` (or `with OperatorProcess.start(...) as operator:`); `stop()`
    is idempotent."""

    process: subprocess.Popen[bytes]
    log_file: Path

    @classmethod
    def start(
        cls,
        kube: KubeCluster,
        registry: Registry,
        log_file: Path,
        env: Mapping[str, str] | None = None,
        operator_src: Path = OPERATOR_SOURCE,
        *,
        namespaces: Sequence[str] = (),
        extra_source_roots: Sequence[Path] = (),
    ) -> Self:
        """env: overrides (MODELAPP_POLL_INTERVAL_SECONDS, receiver port/token...) on top of the
        stack's KUBECONFIG and registry CA. namespaces: kopf patterns to watch; none: all namespaces.
        operator_src: the source root to run (another checkout's operator/ to compare versions)."""
        roots = [str(operator_src), *map(str, extra_source_roots), os.environ.get("PYTHONPATH", "")]
        full_env = {
            **os.environ,
            "KUBECONFIG": str(kube.kubeconfig),
            "MODELAPP_REGISTRY_CA_FILE": str(registry.ca_file),
            **allowed_sources(registry),
            "PYTHONPATH": os.pathsep.join(roots).rstrip(os.pathsep),
            # Several operators run side by side in tests: no fixed metrics port unless env asks for one.
            "MODELAPP_METRICS_PORT": "off",
            **(env or {}),
        }
        scope = [arg for pattern in namespaces for arg in ("--namespace", pattern)] or ["--all-namespaces"]
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "modelapp_operator", *scope, "--liveness", "off"],
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                # Its own group: stop() reaches anything it spawned, and a terminal's Ctrl-C goes
                # to the caller, which then stops it in order.
                start_new_session=True,
            )
        return cls(process, log_file)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def exited(self) -> bool:
        return self.process.poll() is not None

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.exited():
            raise RuntimeError(f"the operator exited with {self.returncode}:\n{self.log_tail(40)}")

    def stop(self) -> None:
        if self.exited():
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL (a crash: no clean-up, its Lease not released); returns once it is gone."""
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)

    def _signal_group(self, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
