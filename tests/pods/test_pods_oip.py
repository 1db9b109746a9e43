"""The Open Inference Protocol through a Service on real pods: the app image from Dockerfile.app, the model
downloaded and verified inside the pods, and three clients no one here wrote (tritonclient[http], kserve's
InferenceRESTClient, open-inference-openapi) checking health, metadata and infer, getting the model's own
answers. The checks are the process tier's (tests/integration/test_serving_oip_clients.py)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from modelapp_localstack import Azurite, KubeCluster
from modelapp_localstack.incluster import InClusterOperator
from modelapp_serving.model_blob import normalize_etag

from tests.integration.test_serving_oip_clients import (
    ROWS,
    Served,
    conform_kserve,
    conform_open_inference,
    conform_tritonclient,
    own_answers,
)
from tests.pods.conftest import Image
from tests.pods.test_real_pods import _running_on_v1, _service_address

pytestmark = pytest.mark.pods

# Both pods' workers each load the model; a Ready ModelApp has every pod Ready, which one worker's /readyz
# decides. The protocol's calls must not meet a worker still loading: ask until this many answers in a row
# say ready.
READY_IN_A_ROW = 20


def _every_worker_ready(base_url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < READY_IN_A_ROW:
        assert time.monotonic() < deadline, f"{base_url}/v2/health/ready never answered 200 {READY_IN_A_ROW} times"
        try:
            with urllib.request.urlopen(f"{base_url}/v2/health/ready", timeout=5) as response:
                in_a_row = in_a_row + 1 if response.status == 200 else 0
        except (urllib.error.URLError, OSError):
            in_a_row = 0
            time.sleep(0.5)


@pytest.fixture(scope="module")
def served_by_pods(
    kube: KubeCluster,
    azurite: Azurite,
    app_image: Image,
    incluster_operator: InClusterOperator,
    model_files: dict[str, Path],
) -> Served:
    """A ModelApp on the sample model, through its Service: the model's name in /v2 is the ModelApp's."""
    name, _, body = _running_on_v1(kube, azurite, app_image, incluster_operator, model_files["v1"], "oip")
    host, port = _service_address(kube, name)
    base_url = f"http://{host}:{port}"
    _every_worker_ready(base_url)
    return Served(
        base_url=base_url,
        name=name,
        version=normalize_etag(body["status"]["model"]["version"]),
        platform="onnxruntime_onnx",
        output="label",
        output_datatype="INT64",
        answers=own_answers(model_files["v1"], ROWS),
    )


def test_tritonclient_through_the_service(served_by_pods: Served) -> None:
    conform_tritonclient(served_by_pods)


def test_kserve_rest_client_through_the_service(served_by_pods: Served) -> None:
    conform_kserve(served_by_pods)


def test_open_inference_client_through_the_service(served_by_pods: Served) -> None:
    conform_open_inference(served_by_pods)
