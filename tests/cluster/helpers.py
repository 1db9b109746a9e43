"""Test-only helpers shared by the cluster tests that run the operator: a tenant with an image and
a model, the ModelApp for it, reads of its objects, and waiting for conditions with the operator's
log in the failure message. Running the operator itself is modelapp_localstack.operator."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from azure.storage.blob import ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry
from modelapp_localstack.operator import OperatorProcess, apply_crd, create_tenant_namespace

T = TypeVar("T")


@dataclass
class App:
    namespace: str
    name: str
    repository: str
    digest: str
    blob_name: str
    model_sha256: str
    model_etag: str


def stop_operator(operator: OperatorProcess, *secrets: str) -> None:
    """Stop it as Kubernetes would (SIGTERM) and check its log for crashes and leaked credentials."""
    operator.stop()
    text = operator.log_text()
    assert "Traceback" not in text, operator.log_tail(200)
    for secret in secrets:
        assert secret not in text, "a credential reached the operator log"


@contextlib.contextmanager
def operator_running(
    kube: KubeCluster,
    registry: Registry,
    log_file: Path,
    namespaces: str,
    env: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
) -> Iterator[OperatorProcess]:
    """`python -m modelapp_operator` as in production (the CRD applied first), watching the namespaces
    that match the kopf pattern `namespaces`, with `env` on top of the stack's settings; stopped at the
    end by `stop_operator`, which checks its log for crashes and for each of `secrets`."""
    apply_crd(kube)
    running = OperatorProcess.start(kube, registry, log_file, env, namespaces=[namespaces])
    try:
        yield running
    finally:
        stop_operator(running, *secrets)


class StartOperator(Protocol):
    """The `start_operator` fixture (tests/cluster/conftest.py): `operator_running` for a test module,
    stopped when the module ends."""

    def __call__(
        self, namespaces: str, env: Mapping[str, str] | None = None, *, secrets: Sequence[str] = ()
    ) -> OperatorProcess: ...


def publish_model(models: ContainerClient, blob_name: str, content: bytes) -> tuple[str, str]:
    """Upload a model version with the publisher's metadata; return (sha256, ETag)."""
    sha = hashlib.sha256(content).hexdigest()
    blob = models.get_blob_client(blob_name)
    result = blob.upload_blob(content, overwrite=True, metadata={"sha256": sha, "format": "onnx"})
    return sha, str(result["etag"])


def prepare(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    *,
    prefix: str,
    labels: Mapping[str, str] | None = None,
) -> App:
    """A fresh namespace `<prefix>-<random>` with its Secrets, an image tagged `stable` and a model."""
    namespace = f"{prefix}-{uuid.uuid4().hex[:6]}"
    create_tenant_namespace(kube, namespace, registry, azurite, labels)
    repository = f"{registry.host}/apps/{namespace}"
    digest = registry.push_random_image(f"apps/{namespace}", "stable")
    blob_name = f"{namespace}/model.onnx"
    sha, etag = publish_model(models, blob_name, f"model of {namespace} v1".encode())
    return App(namespace, "iris", repository, digest, blob_name, sha, etag)


def modelapp(app: App, azurite: Azurite, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": app.name, "namespace": app.namespace},
        "spec": {
            "image": {"repository": app.repository, "tag": "stable", "pullSecretName": "regcred"},
            "model": {
                "blob": {"accountUrl": azurite.blob_endpoint, "container": "models", "name": app.blob_name},
                "credentials": {"secretRef": {"name": "storage"}},
            },
            "replicas": 2,
            "env": [{"name": "LOG_LEVEL", "value": "info"}],
            "rollout": {"maxSurge": 1, "maxUnavailable": 0},
        },
    }
    body["spec"].update(spec)
    return body


def apply(kube: KubeCluster, body: dict[str, Any]) -> None:
    kube.kubectl("apply", "--server-side", "--field-manager=test", "-f", "-", input=json.dumps(body))


def get(kube: KubeCluster, kind: str, app: App, name: str | None = None) -> dict[str, Any] | None:
    result = kube.kubectl("get", kind, name or app.name, "-n", app.namespace, "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def replicasets(kube: KubeCluster, app: App) -> list[dict[str, Any]]:
    result = kube.kubectl(
        "get", "rs", "-n", app.namespace, "-l", f"app.kubernetes.io/instance={app.name}", "-o", "json"
    )
    return json.loads(result.stdout)["items"]  # type: ignore[no-any-return]


def conditions(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (body.get("status") or {}).get("conditions") or []}


def env_of(deployment: dict[str, Any]) -> dict[str, Any]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def wait_for(
    what: str, check: Callable[[], T | None], operator: OperatorProcess, timeout: float = 90, interval: float = 0.5
) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}\n--- operator log ---\n{operator.log_tail()}")


def wait_for_events(kube: KubeCluster, app: App, reasons: set[str], operator: OperatorProcess) -> list[dict[str, Any]]:
    """The namespace's events once they include these reasons (the operator posts events in the background)."""

    def found() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = json.loads(
            kube.kubectl("get", "events", "-n", app.namespace, "-o", "json").stdout
        )["items"]
        return items if reasons <= {e.get("reason") for e in items} else None

    return wait_for(f"events {sorted(reasons)}", found, operator, timeout=30)


def wait_ready(
    kube: KubeCluster, app: App, operator: OperatorProcess, generation: int | None = None, timeout: float = 90
) -> dict[str, Any]:
    """The ModelApp once Ready=True for `generation` (default: its current generation)."""

    def ready() -> dict[str, Any] | None:
        body = get(kube, "modelapp", app)
        if body is None:
            return None
        status = body.get("status") or {}
        wanted = generation if generation is not None else body["metadata"]["generation"]
        condition = conditions(body).get("Ready") or {}
        if condition.get("status") == "True" and status.get("observedGeneration") == wanted:
            return body
        return None

    return wait_for(f"ModelApp {app.namespace}/{app.name} Ready", ready, operator, timeout)


def wait_for_reason(
    kube: KubeCluster, app: App, operator: OperatorProcess, condition: str, reason: str
) -> dict[str, Any]:
    """The ModelApp once its `condition` has `reason` (whatever its status)."""

    def reached() -> dict[str, Any] | None:
        body = get(kube, "modelapp", app)
        found = conditions(body or {}).get(condition) or {}
        return body if found.get("reason") == reason else None

    return wait_for(f"{condition} reason {reason}", reached, operator)


def request_reconcile(kube: KubeCluster, app: App) -> None:
    """What the poller and the webhook receiver do: stamp the reconcile-request annotation."""
    kube.kubectl(
        "annotate", "modelapp", app.name, "-n", app.namespace, "--overwrite",
        f"modelapp.io/reconcile-requested-at={time.time()}",
    )  # fmt: skip
