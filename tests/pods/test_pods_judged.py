"""Pods judged fairly (issue 19), with real containers: a slow start is never killed, and the status names
the part that failed (the image, the model), from the pods' own state, while it happens and in history.

CPU pressure is covered by test_real_pods.py's model change under load (a 100m CPU limit, no restart)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.incluster import TENANT_NAMESPACE, InClusterOperator

from tests.pods.conftest import Image
from tests.pods.load import SAMPLE_ROWS
from tests.pods.test_real_pods import (
    _app_restarts,
    _conditions,
    _expected,
    _get,
    _labels,
    _modelapp,
    _pods,
    _post,
    _publish,
    _ready_with,
    _running_on_v1,
    _service_address,
    _wait,
)

# The first test of a session pays for the stack and the images (fixtures) within its time-out.
pytestmark = [pytest.mark.pods, pytest.mark.timeout(1200)]

CRASH_EXIT_CODE = 3
BIG_MODEL_MIB = 300


def delete_modelapp(kube: KubeCluster, name: str) -> None:
    """Free the node for the next test (the garbage collector removes the children)."""
    kube.kubectl("delete", "modelapp", name, "-n", TENANT_NAMESPACE, "--wait=false", check=False)


def _wait_showing_pods(
    kube: KubeCluster,
    name: str,
    what: str,
    check: Callable[[], dict[str, Any] | None],
    operator: InClusterOperator,
    timeout: float,
) -> dict[str, Any]:
    """_wait, and on a time-out the ModelApp's status and its pods' container states: what the operator saw."""
    try:
        return _wait(what, check, operator, timeout=timeout)
    except AssertionError as error:
        states = {pod["metadata"]["name"]: pod["status"].get("containerStatuses") for pod in _pods(kube, name)}
        status = json.dumps(_get(kube, "modelapp", name).get("status"), indent=1)
        raise AssertionError(f"{what}: not seen\n--- status ---\n{status}\n--- pods ---\n{states}\n{error}") from None


@pytest.fixture(scope="module")
def crashing_image(real_stack: Stack, registry: Registry, app_image: Image) -> Image:
    """The app image with an entrypoint that prints "boom" and exits 3: a broken image, not a model."""
    from modelapp_localstack import images

    buildah = real_stack.buildah()
    archive = images.project_image("app", buildah)
    images.load_image(buildah, archive)
    container = buildah.from_image(archive.name)
    try:
        entrypoint = json.dumps(["/bin/sh", "-c", f"echo boom >&2; exit {CRASH_EXIT_CODE}"])
        buildah.config(container, ["--entrypoint", entrypoint])
        buildah.commit(container, "localhost/modelapp-crashing:test")
    finally:
        buildah.remove(container)
    repository = f"{registry.host}/modelapp/crashing"
    digest = buildah.push("localhost/modelapp-crashing:test", registry, f"{repository}:v1")
    return Image(repository, "v1", digest)


@pytest.fixture
def cleanup(kube: KubeCluster) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        delete_modelapp(kube, name)


def test_an_image_that_exits_is_named_as_the_crash_never_the_model(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    crashing_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
    cleanup: list[str],
) -> None:
    name, _, first = _running_on_v1(kube, azurite, app_image, incluster_operator, model_files["v1"], "crash")
    cleanup.append(name)
    deadline = 30
    patch = {
        "spec": {
            "image": {"repository": crashing_image.repository, "tag": None, "digest": crashing_image.digest},
            "rollout": {"progressDeadlineSeconds": deadline},
        }
    }
    kube.kubectl("patch", "modelapp", name, "-n", TENANT_NAMESPACE, "--type=merge", "-p", json.dumps(patch))
    started = time.monotonic()

    def crash_shown() -> dict[str, Any] | None:
        body = _get(kube, "modelapp", name)
        degraded = _conditions(body).get("Degraded") or {}
        return body if degraded.get("status") == "True" and degraded.get("reason") == "ImageCrashed" else None

    # While the new pods crash-loop: Degraded=True names the image, with its exit code and output.
    shown = _wait_showing_pods(kube, name, "Degraded=True ImageCrashed", crash_shown, incluster_operator, timeout=150)
    print(f"crash shown after {time.monotonic() - started:.0f}s: {_conditions(shown)['Degraded']['message']}")
    conditions = _conditions(shown)
    assert f"exited with code {CRASH_EXIT_CODE}" in conditions["Degraded"]["message"], conditions
    assert "boom" in conditions["Degraded"]["message"], conditions
    assert conditions["Ready"]["reason"] == "ImageCrashed", conditions
    assert conditions["ModelVerified"]["status"] == "True", conditions  # the model is not blamed

    def rolled_back() -> dict[str, Any] | None:
        body = _get(kube, "modelapp", name)
        return body if _conditions(body).get("Degraded", {}).get("reason") == "RolledBack" else None

    body = _wait_showing_pods(kube, name, "the rollback", rolled_back, incluster_operator, timeout=deadline + 300)
    print(f"rolled back after {time.monotonic() - started:.0f}s")
    history = body["status"]["history"]
    failed = next(entry for entry in history if entry["revision"] == history[0]["rollbackOf"])
    assert failed["outcome"] == "Failed" and failed["reason"] == "ImageCrashed", failed
    assert f"exited with code {CRASH_EXIT_CODE}" in failed["failure"] and "refusal" not in failed, failed
    assert "ImageCrashed" in _conditions(body)["Degraded"]["message"]
    assert "ModelRefused" not in json.dumps(body["status"]), body["status"]
    _ready_with(kube, name, incluster_operator, version=first["status"]["model"]["version"], timeout=120)


def test_bytes_that_are_not_a_model_are_refused_and_rolled_back_before_the_deadline(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
    tmp_path: Path,
    cleanup: list[str],
) -> None:
    name, blob, first = _running_on_v1(kube, azurite, app_image, incluster_operator, model_files["v1"], "junk")
    cleanup.append(name)
    deadline = 600
    patch = {"spec": {"rollout": {"progressDeadlineSeconds": deadline}}}
    kube.kubectl("patch", "modelapp", name, "-n", TENANT_NAMESPACE, "--type=merge", "-p", json.dumps(patch))
    _ready_with(kube, name, incluster_operator, timeout=60)
    # Published as a model would be: its metadata states the true sha256, so only loading it fails.
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"these bytes are not an ONNX model\n" * 64)
    junk_etag = _publish(azurite, junk, blob)
    started = time.monotonic()

    def rolled_back() -> dict[str, Any] | None:
        body = _get(kube, "modelapp", name)
        return body if _conditions(body).get("Degraded", {}).get("reason") == "RolledBack" else None

    # Every new pod refused it: waiting cannot help, so the pair is rolled back at once, and the rollback's
    # Degraded condition and the failed history entry name the model and the runtime's reason.
    body = _wait_showing_pods(kube, name, "the rollback", rolled_back, incluster_operator, timeout=300)
    elapsed = time.monotonic() - started
    degraded = _conditions(body)["Degraded"]["message"]
    print(f"rolled back {elapsed:.0f}s after the junk was published (deadline {deadline}s): {degraded}")
    assert "ModelRefused" in degraded and "ModelCannotLoad" in degraded, degraded
    assert elapsed < deadline / 2, "a refusal every pod agrees on must not wait for the deadline"
    history = body["status"]["history"]
    failed = next(entry for entry in history if entry["revision"] == history[0]["rollbackOf"])
    assert failed["modelVersion"].strip('"') == junk_etag.strip('"'), failed
    assert failed["outcome"] == "Failed" and failed["reason"] == "ModelRefused", failed
    assert "ModelCannotLoad" in failed["refusal"], failed
    # The app exits non-zero on a refusal (4: gunicorn's "App failed to load").
    assert "exit code 4" in failed["failure"], failed
    _ready_with(kube, name, incluster_operator, version=first["status"]["model"]["version"], timeout=180)


def _big_model(small: Path, target: Path, mib: int) -> Path:
    """The small model plus `mib` MiB of random weights no node reads: the same answers, a big file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(small))
    weights = np.random.default_rng(0).random(mib * 1024 * 1024 // 4, dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weights, name="unused_weights"))
    onnx.save(model, str(target))
    return target


def test_a_model_of_several_hundred_mib_becomes_ready_without_a_restart(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
    tmp_path: Path,
    cleanup: list[str],
) -> None:
    big = _big_model(model_files["v1"], tmp_path / "big.onnx", BIG_MODEL_MIB)
    size_mib = big.stat().st_size / 2**20
    name = f"big-{uuid.uuid4().hex[:5]}"
    cleanup.append(name)
    blob = f"{name}/model.onnx"
    etag = _publish(azurite, big, blob)
    resources = {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "3Gi"}}
    body = _modelapp(name, app_image, azurite, blob, replicas=1, resources=resources)
    started = time.monotonic()
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    _ready_with(kube, name, incluster_operator, version=etag, timeout=420)
    print(f"{size_mib:.0f} MiB model Ready after {time.monotonic() - started:.0f}s")
    restarts = _app_restarts(kube, name)
    assert restarts and set(restarts.values()) == {0}, restarts
    answer = _post(_service_address(kube, name), "/predict", {"instances": SAMPLE_ROWS})
    assert _labels(answer["predictions"]) == _expected(model_files["v1"])
