"""A published ONNX model whose weights name a file of the pod (external data, `../../proc/self/environ`) is
refused by real pods before onnxruntime opens it, and the status says so: ModelRefused (ModelCannotLoad) with the
reason, and the pair is rolled back to the model before it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from modelapp_localstack import Azurite, KubeCluster
from modelapp_localstack.incluster import InClusterOperator

from tests.pods.conftest import Image
from tests.pods.test_pods_judged import _wait_showing_pods, delete_modelapp
from tests.pods.test_real_pods import _conditions, _get, _publish, _ready_with, _running_on_v1
from tests.unit.test_serving_onnx_external_data import TRAVERSAL, in_initializer, write

pytestmark = [pytest.mark.pods, pytest.mark.timeout(1200)]


def test_a_model_that_names_a_file_of_the_pod_is_refused_and_rolled_back(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    name, blob, first = _running_on_v1(kube, azurite, app_image, incluster_operator, model_files["v1"], "extdata")
    try:
        # Published as any model is, its sha256 in its metadata: only what it names is wrong.
        _publish(azurite, write(in_initializer(TRAVERSAL), tmp_path / "external.onnx"), blob)

        def rolled_back() -> dict[str, Any] | None:
            body = _get(kube, "modelapp", name)
            return body if _conditions(body).get("Degraded", {}).get("reason") == "RolledBack" else None

        body = _wait_showing_pods(kube, name, "the rollback", rolled_back, incluster_operator, timeout=300)
        history = body["status"]["history"]
        failed = next(entry for entry in history if entry["revision"] == history[0]["rollbackOf"])
        assert failed["reason"] == "ModelRefused", failed
        assert "ModelCannotLoad" in failed["refusal"] and "references external data" in failed["refusal"], failed
        _ready_with(kube, name, incluster_operator, version=first["status"]["model"]["version"], timeout=180)
    finally:
        delete_modelapp(kube, name)
