"""Real containers on the real node: the app image from Dockerfile.app, the operator in-cluster from
deploy/ (only its ServiceAccount's rights), models downloaded and verified inside the pods, answers
through the Service while the pair changes under a steady load."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from azure.storage.blob import BlobServiceClient
from modelapp_localstack import Azurite, KubeCluster
from modelapp_localstack.incluster import OPERATOR_NAMESPACE, TENANT_NAMESPACE, InClusterOperator
from modelapp_serving.publish import publish_model

from tests.pods.conftest import Image
from tests.pods.load import SAMPLE_ROWS, ServiceLoad

pytestmark = pytest.mark.pods

T = TypeVar("T")
MODELS_CONTAINER = "models"
# Long enough for a real pod to pull, download, verify and load on a busy 2-core machine; short enough
# to see a rollback within the test.
PROGRESS_DEADLINE_SECONDS = 90
MIN_RATE = 20.0


def _modelapp(name: str, image: Image, azurite: Azurite, blob: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": name, "namespace": TENANT_NAMESPACE},
        "spec": {
            "image": {"repository": image.repository, "tag": image.tag, "pullSecretName": "regcred"},
            "model": {
                "blob": {"accountUrl": azurite.blob_endpoint, "container": MODELS_CONTAINER, "name": blob},
                "credentials": {"secretRef": {"name": "storage"}},
            },
            "replicas": 2,
            "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
            "rollout": {"maxSurge": 1, "maxUnavailable": 0, "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS},
        },
    }
    body["spec"].update(spec)
    return body


def _get(kube: KubeCluster, kind: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(kube.kubectl("get", kind, name, "-n", TENANT_NAMESPACE, "-o", "json").stdout)
    return result


def _conditions(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (body.get("status") or {}).get("conditions") or []}


def _wait(what: str, check: Callable[[], T | None], operator: InClusterOperator, timeout: float = 300) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n--- operator ---\n{operator.logs()}")


def _ready_with(kube: KubeCluster, name: str, operator: InClusterOperator, version: str | None = None,
                timeout: float = 300) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        body = _get(kube, "modelapp", name)
        status = body.get("status") or {}
        if _conditions(body).get("Ready", {}).get("status") != "True":
            return None
        if status.get("observedGeneration") != body["metadata"]["generation"]:
            return None
        if version is not None and (status.get("model") or {}).get("version") != version:
            return None
        return body

    try:
        return _wait(f"ModelApp {name} Ready" + (f" on {version}" if version else ""), ready, operator, timeout)
    except AssertionError:
        pods = kube.kubectl("get", "pods", "-n", TENANT_NAMESPACE, "-o", "wide", check=False).stdout
        raise AssertionError(f"{pods}\n{_get(kube, 'modelapp', name).get('status')}") from None


def _service_address(kube: KubeCluster, name: str) -> tuple[str, int]:
    service = _get(kube, "service", name)
    return service["spec"]["clusterIP"], int(service["spec"]["ports"][0]["port"])


def _post(address: tuple[str, int], path: str, body: Any) -> Any:
    request = urllib.request.Request(f"http://{address[0]}:{address[1]}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _get_json(address: tuple[str, int], path: str) -> Any:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=10) as response:
        return json.loads(response.read())


def _publish(azurite: Azurite, model: Path, blob: str) -> str:
    published = publish_model(model, (MODELS_CONTAINER, blob), connection_string=azurite.connection_string,
                              overwrite=True, progress=False)
    return published.etag


def _running_on_v1(
    kube: KubeCluster, azurite: Azurite, image: Image, operator: InClusterOperator, model: Path, prefix: str,
    **spec: Any,
) -> tuple[str, str, dict[str, Any]]:
    """A new ModelApp `<prefix>-<random>` on its own blob holding `model` (spec fields overridden by `spec`),
    once Ready on it: (name, blob, the ModelApp)."""
    name = f"{prefix}-{uuid.uuid4().hex[:5]}"
    blob = f"{name}/model.onnx"
    etag = _publish(azurite, model, blob)
    kube.kubectl("apply", "-f", "-", input=json.dumps(_modelapp(name, image, azurite, blob, **spec)))
    return name, blob, _ready_with(kube, name, operator, version=etag)


def _pods(kube: KubeCluster, name: str) -> list[dict[str, Any]]:
    """The pods of the ModelApp (its Deployment's instance label)."""
    selector = f"app.kubernetes.io/instance={name}"
    listed = kube.kubectl("get", "pods", "-n", TENANT_NAMESPACE, "-l", selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(listed)["items"]
    return items


def _app_restarts(kube: KubeCluster, name: str) -> dict[str, int]:
    """Restart count of the containers of every pod of the ModelApp, by pod name."""
    restarts: dict[str, int] = {}
    for pod in _pods(kube, name):
        statuses = pod["status"].get("containerStatuses") or []
        restarts[pod["metadata"]["name"]] = sum(int(status.get("restartCount") or 0) for status in statuses)
    return restarts


def _overwrite_keeping_metadata(azurite: Azurite, blob: str, content: bytes) -> str:
    """Other bytes under the blob's current metadata (which vouches for the old sha256); the new ETag."""
    client = BlobServiceClient.from_connection_string(azurite.connection_string).get_blob_client(MODELS_CONTAINER, blob)
    metadata = client.get_blob_properties().metadata
    return str(client.upload_blob(content, overwrite=True, metadata=metadata)["etag"])


def _expected(model: Path) -> list[Any]:
    """What the model itself answers for SAMPLE_ROWS (onnxruntime, the app's runtime)."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = session.run(None, {session.get_inputs()[0].name: np.asarray(SAMPLE_ROWS, dtype=np.float32)})[0]
    return [int(label) for label in labels]


def _labels(predictions: Any) -> list[Any]:
    return [int(p["label"]) if isinstance(p, dict) else int(p) for p in predictions]


def test_pods_serve_the_pinned_pair_through_the_service(
    kube: KubeCluster, azurite: Azurite, app_image: Image, incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
) -> None:
    name, _, body = _running_on_v1(kube, azurite, app_image, incluster_operator, model_files["v1"], "serve")
    etag = body["status"]["model"]["version"]
    assert body["status"]["image"]["digest"] == app_image.digest

    pods = _pods(kube, name)
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeName"] == "real-node-0", "a kwok node would run no container"
        status = pod["status"]["containerStatuses"][0]
        assert status["ready"] and status["imageID"].endswith(app_image.digest), status

    address = _service_address(kube, name)
    answer = _post(address, "/predict", {"instances": SAMPLE_ROWS})
    assert _labels(answer["predictions"]) == _expected(model_files["v1"]) == [0, 2, 1]
    version = _get_json(address, "/version")
    assert version["ready"] is True
    assert version["model"]["etag"] == etag
    assert version["model"]["sha256"] == hashlib.sha256(model_files["v1"].read_bytes()).hexdigest()
    assert app_image.digest in json.dumps(version), version


def test_a_model_that_fails_verification_is_rolled_back_and_no_request_fails(
    kube: KubeCluster, azurite: Azurite, app_image: Image, incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
) -> None:
    name, blob, first = _running_on_v1(kube, azurite, app_image, incluster_operator, model_files["v1"], "bad")
    address = _service_address(kube, name)
    load = ServiceLoad(*address).start()
    try:
        time.sleep(3)
        # Other bytes under metadata that vouches for v1's sha256: the pods must refuse them.
        _overwrite_keeping_metadata(azurite, blob, model_files["v2"].read_bytes())

        def rolled_back() -> dict[str, Any] | None:
            # The restored pair's history entry says RolledBack only until it is Ready again (then
            # RolloutComplete); Degraded keeps saying RolledBack, and the refused pair stays Failed.
            body = _get(kube, "modelapp", name)
            history = (body.get("status") or {}).get("history") or []
            degraded = _conditions(body).get("Degraded", {})
            failed = any(entry.get("outcome") == "Failed" for entry in history)
            return body if degraded.get("reason") == "RolledBack" and failed else None

        # The deadline runs from the last progress; a crash-looping pod and a busy machine add minutes to it.
        _wait("the automatic rollback", rolled_back, incluster_operator, timeout=PROGRESS_DEADLINE_SECONDS + 330)
        _ready_with(kube, name, incluster_operator, version=first["status"]["model"]["version"], timeout=120)
        time.sleep(3)
    finally:
        load.stop()
    summary = load.summary()
    print(f"bad model under load: {summary}")
    assert summary["failed"] == 0, summary
    assert summary["rate"] >= MIN_RATE, summary
    assert set(summary["answers"]) == {json.dumps(_expected(model_files["v1"]))}, summary


def test_a_good_model_change_moves_answers_to_v2_and_no_request_fails(
    kube: KubeCluster, azurite: Azurite, app_image: Image, incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
) -> None:
    """Under CPU pressure (issue 19): each pod may use a tenth of a core, so gunicorn, the imports and the
    model's load are slow; no pod is restarted for it and no request fails while the model changes."""
    starved = {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "100m", "memory": "1Gi"}}
    started = time.monotonic()
    name, blob, _ = _running_on_v1(
        kube, azurite, app_image, incluster_operator, model_files["v1"], "good", resources=starved
    )
    print(f"Ready on v1 under a 100m CPU limit after {time.monotonic() - started:.0f}s")
    address = _service_address(kube, name)
    seen_restarts = _app_restarts(kube, name)
    load = ServiceLoad(*address).start()
    try:
        time.sleep(3)
        v2 = _publish(azurite, model_files["v2"], blob)
        changed_at = time.monotonic()
        _ready_with(kube, name, incluster_operator, version=v2, timeout=420)
        ready_at = time.monotonic()
        print(f"Ready on v2 under a 100m CPU limit {ready_at - changed_at:.0f}s after the change")
        time.sleep(5)
        seen_restarts.update(_app_restarts(kube, name))
    finally:
        load.stop()
    summary = load.summary()
    summary["restarts"] = seen_restarts
    assert seen_restarts and set(seen_restarts.values()) == {0}, seen_restarts
    v1_answer, v2_answer = _expected(model_files["v1"]), _expected(model_files["v2"])
    assert v1_answer != v2_answer
    answered = [(a.at, _labels(a.predictions)) for a in load.answers if a.status == 200]
    first_v2 = next(at for at, answer in answered if answer == v2_answer)
    last_v1 = max(at for at, answer in answered if answer == v1_answer)
    # A rolling update: while old and new pods are both Ready, both answer. Once the new pair is
    # Ready (every old pod replaced, its endpoint gone), the old model never answers again.
    summary["both_answered_seconds"] = round(max(0.0, last_v1 - first_v2), 2)
    print(f"good model change under load: {summary}")
    assert summary["failed"] == 0, summary
    assert summary["rate"] >= MIN_RATE, summary
    assert all(answer == v1_answer for at, answer in answered if at < first_v2)
    # One second for kube-proxy to apply the last endpoint change the Ready status already reflects.
    assert last_v1 < ready_at + 1.0, "v1 answered after the ModelApp was Ready on v2"
    assert all(answer == v2_answer for at, answer in answered if at > ready_at + 1.0)


def test_the_operator_runs_with_only_its_service_account(
    kube: KubeCluster, incluster_operator: InClusterOperator,
) -> None:
    pods = incluster_operator.pods()
    assert pods and all(pod["status"]["phase"] == "Running" for pod in pods)
    assert {pod["spec"]["serviceAccountName"] for pod in pods} == {"modelapp-operator"}
    account = f"system:serviceaccount:{OPERATOR_NAMESPACE}:modelapp-operator"

    def can(*args: str) -> bool:
        return kube.kubectl("auth", "can-i", f"--as={account}", *args, check=False).stdout.strip() == "yes"

    assert can("patch", "modelapps.modelapp.io", "--subresource=status", "-n", TENANT_NAMESPACE)
    assert not can("patch", "modelapps.modelapp.io", "-n", TENANT_NAMESPACE)  # it writes only their status
    assert not can("list", "secrets", "-n", TENANT_NAMESPACE)
    assert not can("get", "secrets", "-n", "kube-system")
    assert not can("create", "pods", "-n", TENANT_NAMESPACE)
