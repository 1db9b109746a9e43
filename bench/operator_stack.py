"""Shared by bench/push_to_rollout.py and bench/scale.py: the local stack, the operator as a
subprocess (`python -m modelapp_operator`, as in production), and a small Kubernetes API reader.

Reads go straight to the API server over HTTPS with the kubeconfig's client certificate
(tens of milliseconds apart), because `kubectl` per read would dominate the timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
for _source_root in ("operator", "deploy/local"):
    if str(REPO_ROOT / _source_root) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / _source_root))

from azure.storage.blob import BlobServiceClient, ContainerClient  # noqa: E402
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack  # noqa: E402
from modelapp_localstack.operator import OperatorProcess as LocalOperatorProcess  # noqa: E402
from modelapp_localstack.operator import (  # noqa: E402
    apply_crd,
    namespace_object,
    tenant_secrets,
)

GROUP = "modelapp.io"
ANNOTATION_MODEL_VERSION = f"{GROUP}/model-version"
MANAGED_BY_SELECTOR = "app.kubernetes.io/managed-by=modelapp-operator"
T = TypeVar("T")
_POLL_LINE = re.compile(r"watch poll: (\d+) image keys, (\d+) model keys, (\d+) requests since last poll")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: with 50 samples p99 is the largest."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(1, min(len(ordered), math.ceil(fraction * len(ordered)))) - 1]


class KubeApi:
    """GET/LIST against the API server with the kubeconfig's client certificate."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        self.server = str(cluster["server"]).rstrip("/")
        self._context = ssl.create_default_context(cafile=cluster["certificate-authority"])
        self._context.load_cert_chain(user["client-certificate"], user["client-key"])

    def get(self, path: str) -> dict[str, Any] | None:
        request = urllib.request.Request(self.server + path, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self._context, timeout=30) as response:
                document: dict[str, Any] = json.loads(response.read())
                return document
        except urllib.error.HTTPError as error:
            with error:
                if error.code == 404:
                    return None
                raise

    def items(self, path: str) -> list[dict[str, Any]]:
        """All items of a list, following `continue` (chunks of 500)."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            separator = "&" if "?" in path else "?"
            page = self.get(f"{path}{separator}limit=500" + (f"&continue={token}" if token else ""))
            if page is None:
                return items
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return items


def start_stack(*, notify_port: int | None, notify_token: str | None, nodes: int = 2) -> Stack:
    stack = Stack.create()
    try:
        stack.start_kube(nodes=nodes)
        stack.start_azurite()
        notify_url = f"http://127.0.0.1:{notify_port}/webhooks/registry" if notify_port else None
        stack.start_registry(notify_url=notify_url, notify_token=notify_token)
        kube = stack.kube
        assert kube is not None
        apply_crd(kube)
    except BaseException:
        stack.stop()
        raise
    return stack


def models_container(azurite: Azurite, name: str = "models") -> ContainerClient:
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(name)
    with contextlib.suppress(Exception):
        container.create_container()
    return container


def publish_model(container: ContainerClient, blob_name: str, content: bytes) -> str:
    """Upload a model version (with the metadata the publisher writes); return its ETag."""
    sha = hashlib.sha256(content).hexdigest()
    result = container.get_blob_client(blob_name).upload_blob(
        content, overwrite=True, metadata={"sha256": sha, "format": "onnx"}
    )
    return str(result["etag"])


def apply_objects(kube: KubeCluster, objects: list[dict[str, Any]], chunk: int = 100) -> None:
    for start in range(0, len(objects), chunk):
        batch = {"apiVersion": "v1", "kind": "List", "items": objects[start : start + chunk]}
        kube.kubectl("apply", "--server-side", "--field-manager=bench", "-f", "-", input=json.dumps(batch), timeout=600)


def namespace_objects(namespace: str, registry: Registry, azurite: Azurite) -> list[dict[str, Any]]:
    """The namespace and its two Secrets, for one batched apply."""
    return [namespace_object(namespace), *tenant_secrets(namespace, registry, azurite)]


def modelapp(
    namespace: str, name: str, repository: str, azurite: Azurite, blob_name: str, *, replicas: int = 1
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "image": {"repository": repository, "tag": "stable", "pullSecretName": "regcred"},
            "model": {
                "blob": {"accountUrl": azurite.blob_endpoint, "container": "models", "name": blob_name},
                "credentials": {"secretRef": {"name": "storage"}},
            },
            "replicas": replicas,
        },
    }


def template_of(deployment: Mapping[str, Any]) -> tuple[str, str]:
    """(image reference, model version) of a Deployment's pod template."""
    template = deployment["spec"]["template"]
    image = str(template["spec"]["containers"][0]["image"])
    version = str((template["metadata"].get("annotations") or {}).get(ANNOTATION_MODEL_VERSION, ""))
    return image, version


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.02) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class OperatorProcess(LocalOperatorProcess):
    """The shared operator process (all namespaces unless told), plus what the benchmarks measure."""

    def _status_kib(self, field: str) -> int | None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return None

    def rss_kib(self) -> int | None:
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int | None:
        """VmHWM: the kernel's high-water mark of the resident set."""
        return self._status_kib("VmHWM")

    def poll_lines(self) -> Iterator[tuple[int, int, int]]:
        """(image keys, model keys, requests since last poll) from the hub's per-poll log line."""
        for line in self.log_file.read_text(errors="replace").splitlines():
            match = _POLL_LINE.search(line)
            if match:
                yield int(match.group(1)), int(match.group(2)), int(match.group(3))
