"""The Open Inference Protocol (KServe V2) REST API, spoken by three clients no one here wrote, against the app
as it runs in a pod: a real gunicorn process that downloads and verifies a published model from Azurite.

Each client (tritonclient[http] with JSON tensors, kserve's InferenceRESTClient with protocol v2, and the
protocol's generated open-inference-openapi client) checks health, metadata and infer and must get the
model's own answers. The `conform_*` functions are also what tests/pods/test_pods_oip.py runs through a
Service on real pods.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from modelapp_localstack import Azurite
from modelapp_serving.model_blob import normalize_etag
from modelapp_serving.publish import PublishedModel, publish_model
from modelapp_serving.sample_model import write_sample_models
from open_inference.openapi.client import OpenInferenceClient

from tests.integration.test_serving_process_health import serve, stop, wait_for

pytestmark = pytest.mark.integration

ROWS = np.asarray([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5], [5.9, 3.0, 4.2, 1.5]], dtype=np.float32)
MAX_REQUEST_BYTES = 65536


@dataclass(frozen=True)
class Served:
    """A model served over the protocol, and what it must answer for ROWS (its own predictions)."""

    base_url: str
    """http://host:port"""
    name: str
    version: str
    platform: str
    output: str
    output_datatype: str
    answers: list[Any]

    @property
    def host_port(self) -> str:
        return self.base_url.removeprefix("http://")


def own_answers(model_file: Path, rows: npt.NDArray[np.float32]) -> list[Any]:
    """What the model file itself predicts, with its own runtime (not through the app)."""
    if model_file.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        result: list[Any] = session.run(None, {session.get_inputs()[0].name: rows})[0].tolist()
        return result
    import skops.io

    estimator = skops.io.load(model_file, trusted=skops.io.get_untrusted_types(file=model_file))
    answers: list[Any] = estimator.predict(rows).tolist()
    return answers


# --- the three clients: each checks health, metadata and infer --------------------------------------------


def conform_tritonclient(served: Served) -> None:
    """NVIDIA's tritonclient[http] with JSON tensors (binary_data=False)."""
    import tritonclient.http as triton  # type: ignore[import-untyped]

    client = triton.InferenceServerClient(url=served.host_port, connection_timeout=10.0, network_timeout=10.0)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(served.name)
        assert client.is_model_ready(served.name, served.version)
        server = client.get_server_metadata()
        assert server["name"] == "modelapp"
        assert isinstance(server["extensions"], list)
        for metadata in (
            client.get_model_metadata(served.name),
            client.get_model_metadata(served.name, served.version),
        ):
            assert metadata["name"] == served.name
            assert metadata["versions"] == [served.version]
            assert metadata["platform"] == served.platform
            assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
            assert metadata["outputs"] == [{"name": served.output, "datatype": served.output_datatype, "shape": [-1]}]

        for rows in (ROWS, ROWS.astype(np.float64), ROWS[:1]):
            tensor = triton.InferInput("input", list(rows.shape), "FP32" if rows.dtype == np.float32 else "FP64")
            tensor.set_data_from_numpy(rows, binary_data=False)
            wanted = triton.InferRequestedOutput(served.output, binary_data=False)
            result = client.infer(served.name, [tensor], outputs=[wanted], request_id="triton-1")
            assert result.as_numpy(served.output).tolist() == served.answers[: len(rows)], rows
            response = result.get_response()
            assert response["id"] == "triton-1"
            assert response["model_name"] == served.name
            assert response["model_version"] == served.version
        # No outputs named: tritonclient asks for binary outputs, which this server answers as JSON.
        tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
        tensor.set_data_from_numpy(ROWS, binary_data=False)
        result = client.infer(served.name, [tensor], model_version=served.version)
        assert result.as_numpy(served.output).tolist() == served.answers

        with pytest.raises(triton.InferenceServerException, match="unknown model 'nothing'"):
            client.infer("nothing", [tensor])
        assert not client.is_model_ready("nothing")
    finally:
        client.close()


def conform_kserve(served: Served) -> None:
    """KServe's InferenceRESTClient with protocol v2. It has no metadata call: the metadata answers are read
    with httpx and validated by KServe's own V2 data models (kserve.protocol.rest.v2_datamodels)."""
    asyncio.run(_conform_kserve(served))


async def _conform_kserve(served: Served) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig  # type: ignore[import-untyped]
    from kserve.protocol.rest.v2_datamodels import (  # type: ignore[import-untyped]
        ModelMetadataResponse,
        ModelReadyResponse,
        ServerMetadataResponse,
    )

    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=10))
    try:
        assert await client.is_server_live(served.base_url) is True
        assert await client.is_server_ready(served.base_url) is True
        assert await client.is_model_ready(served.base_url, served.name) is True
        assert await client.is_model_ready(served.base_url, "nothing") is False

        async with httpx.AsyncClient(base_url=served.base_url, timeout=10) as http:
            server = ServerMetadataResponse.model_validate((await http.get("/v2")).json())
            assert server.name == "modelapp"
            metadata = ModelMetadataResponse.model_validate((await http.get(f"/v2/models/{served.name}")).json())
            assert metadata.name == served.name
            assert metadata.versions == [served.version]
            assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("input", "FP32", [-1, 4])]
            assert [(t.name, t.datatype) for t in metadata.outputs] == [(served.output, served.output_datatype)]
            ready = ModelReadyResponse.model_validate((await http.get(f"/v2/models/{served.name}/ready")).json())
            assert ready.ready is True

        # Nested data, flat data (row-major) and numpy data through the client's own conversion.
        nested = InferInput(name="input", shape=list(ROWS.shape), datatype="FP32", data=ROWS.tolist())
        flat = InferInput(name="input", shape=list(ROWS.shape), datatype="FP32", data=ROWS.ravel().tolist())
        from_numpy = InferInput(name="input", shape=list(ROWS.shape), datatype="FP64")
        from_numpy.set_data_from_numpy(ROWS.astype(np.float64), binary_data=False)
        for tensor in (nested, flat, from_numpy):
            request = InferRequest(model_name=served.name, infer_inputs=[tensor], request_id="kserve-1")
            response = await client.infer(served.base_url, request, model_name=served.name)
            assert response.model_name == served.name
            assert response.id == "kserve-1"
            (output,) = response.outputs
            assert output.name == served.output
            assert output.datatype == served.output_datatype
            assert output.shape == [len(ROWS)]
            assert output.as_numpy().tolist() == served.answers

        with pytest.raises(httpx.HTTPStatusError, match="unknown model 'nothing'"):
            request = InferRequest(model_name="nothing", infer_inputs=[nested])
            await client.infer(served.base_url, request, model_name="nothing")
    finally:
        await client.close()


def conform_open_inference(served: Served) -> None:
    """The protocol's own generated client (open-inference-openapi): pydantic models for every answer."""
    with httpx.Client(timeout=10) as http:
        _conform_open_inference(served, OpenInferenceClient(base_url=served.base_url, httpx_client=http))


def _conform_open_inference(served: Served, client: OpenInferenceClient) -> None:
    from open_inference.openapi.core.api_error import ApiError
    from open_inference.openapi.types.inference_request import InferenceRequest

    client.check_server_liveness()
    client.check_server_readiness()
    client.check_model_readiness(served.name)
    client.check_model_version_readiness(served.name, served.version)
    server = client.read_server_metadata()
    assert server.name == "modelapp"
    for metadata in (
        client.read_model_metadata(served.name),
        client.read_model_version_metadata(served.name, served.version),
    ):
        assert metadata.name == served.name
        assert metadata.versions == [served.version]
        assert metadata.platform == served.platform
        assert metadata.inputs is not None
        assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("input", "FP32", [-1, 4])]
        assert metadata.outputs is not None
        assert [(t.name, t.datatype, t.shape) for t in metadata.outputs] == [
            (served.output, served.output_datatype, [-1])
        ]

    request = InferenceRequest.parse_obj(
        {
            "id": "oip-1",
            "inputs": [{"name": "input", "shape": list(ROWS.shape), "datatype": "FP32", "data": ROWS.tolist()}],
            "outputs": [{"name": served.output}],
        }
    )
    for response in (
        client.model_infer(served.name, request=request),
        client.model_version_infer(served.name, served.version, request=request),
    ):
        assert response.model_name == served.name
        assert response.model_version == served.version
        assert response.id == "oip-1"
        (output,) = response.outputs
        assert (output.name, output.datatype, output.shape) == (served.output, served.output_datatype, [len(ROWS)])
        # The generated TensorData is a union of float, str and bool: integers come back as floats.
        assert output.data.__root__ == served.answers

    with pytest.raises(ApiError) as raised:
        client.model_infer("nothing", request=request)
    assert raised.value.status_code == 404
    assert raised.value.body == {"error": "unknown model 'nothing': this server serves " + repr(served.name)}


# --- the app as a process, on three models --------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    file: str
    format: str
    platform: str
    output_datatype: str
    model_name: str | None = None
    """MODELAPP_MODEL_NAME; None: the blob's file name rule."""
    worker_class: str = "asgi"


CASES = {
    # The sample ONNX export (int64 labels), with the default worker class (the ASGI fast path).
    "onnx": ModelCase("iris.onnx", "onnx", "onnxruntime_onnx", "INT64"),
    # The same, under gthread workers (the WSGI fast path).
    "onnx-gthread": ModelCase("iris.onnx", "onnx", "onnxruntime_onnx", "INT64", worker_class="gthread"),
    # The same classifier as skops (scikit-learn as the runtime).
    "skops": ModelCase("iris.skops", "skops", "scikit-learn", "INT64"),
    # A classifier trained on the species' names: its answers are strings (BYTES); named by MODELAPP_MODEL_NAME.
    "skops-strings": ModelCase("species.skops", "skops", "scikit-learn", "BYTES", model_name="iris-species"),
}


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import skops.io
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    directory = tmp_path_factory.mktemp("oip-models")
    write_sample_models(directory)
    iris = load_iris()
    species = LogisticRegression(max_iter=500, random_state=0)
    species.fit(iris.data.astype(np.float32), iris.target_names[iris.target])
    skops.io.dump(species, directory / "species.skops")
    return directory


WORKERS = 2


def _start(
    azurite: Azurite, published: PublishedModel, directory: Path, **overrides: str
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """The app as `modelapp-serve` runs it, WORKERS workers; /metrics summed over them."""
    overrides = {"MODELAPP_WORKERS": str(WORKERS), "PROMETHEUS_MULTIPROC_DIR": str(directory / "metrics"), **overrides}
    server, port, _, log_path = serve(azurite, published, directory, **overrides)
    return server, f"http://127.0.0.1:{port}", log_path


def _wait_until_every_worker_is_ready(server: subprocess.Popen[bytes], log_path: Path, timeout: float = 90) -> None:
    """Each worker loads the model itself; the kernel hands connections to any of them (SO_REUSEPORT)."""
    deadline = time.monotonic() + timeout
    while log_path.read_text().count("model ready:") < WORKERS:
        assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)


@pytest.fixture(scope="module", params=sorted(CASES))
def served(
    request: pytest.FixtureRequest, azurite: Azurite, sample_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    case = CASES[request.param]
    model_file = sample_dir / case.file
    url = f"{azurite.blob_endpoint}/models-{uuid.uuid4().hex[:12]}/{case.file}"
    published = publish_model(model_file, url, connection_string=azurite.connection_string, format=case.format)
    overrides = {"MODELAPP_MODEL_FORMAT": case.format, "MODELAPP_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}
    if case.model_name:
        overrides["MODELAPP_MODEL_NAME"] = case.model_name
    if case.worker_class != "asgi":
        overrides["MODELAPP_WORKER_CLASS"] = case.worker_class
    server, base_url, log_path = _start(azurite, published, tmp_path_factory.mktemp(request.param), **overrides)
    try:
        _wait_until_every_worker_is_ready(server, log_path)
        yield Served(
            base_url=base_url,
            name=case.model_name or Path(case.file).stem,
            version=normalize_etag(published.etag),
            platform=case.platform,
            output="label",
            output_datatype=case.output_datatype,
            answers=own_answers(model_file, ROWS),
        )
    finally:
        stop(server)
    log_text = log_path.read_text()
    assert "Traceback" not in log_text, log_text


def test_tritonclient_checks_health_metadata_and_infer(served: Served) -> None:
    conform_tritonclient(served)


def test_kserve_rest_client_checks_health_metadata_and_infer(served: Served) -> None:
    conform_kserve(served)


def test_open_inference_client_checks_health_metadata_and_infer(served: Served) -> None:
    conform_open_inference(served)


def test_the_answers_are_the_models_own(served: Served) -> None:
    """The same rows through /predict and through V2 infer give the same answers, the model file's own."""
    body = {"inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": ROWS.ravel().tolist()}]}
    status, answer = _request(served, "POST", f"/v2/models/{served.name}/infer", json.dumps(body).encode())
    assert status == 200
    assert answer["outputs"][0]["data"] == served.answers
    instances = json.dumps({"instances": ROWS.tolist()}).encode()
    predict = _request(served, "POST", "/predict", instances, {"Content-Type": "application/json"})
    assert predict == (200, {"predictions": served.answers})
    if served.output_datatype == "BYTES":
        assert set(served.answers) <= {"setosa", "versicolor", "virginica"}


# --- errors: 4xx as JSON {"error": "..."} and never a trace ------------------------------------------------


def _request(
    served: Served, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(f"{served.base_url}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        assert error.headers["Content-Type"] == "application/json"
        return error.code, json.loads(error.read())


def _infer_body(**tensor: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", **tensor}]}).encode()


@pytest.fixture(scope="module")
def onnx_served(azurite: Azurite, sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    url = f"{azurite.blob_endpoint}/models-{uuid.uuid4().hex[:12]}/iris.onnx"
    published = publish_model(sample_dir / "iris.onnx", url, connection_string=azurite.connection_string)
    directory = tmp_path_factory.mktemp("errors")
    server, base_url, log_path = _start(
        azurite, published, directory, MODELAPP_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES)
    )
    try:
        _wait_until_every_worker_is_ready(server, log_path)
        yield Served(base_url, "iris", normalize_etag(published.etag), "onnxruntime_onnx", "label", "INT64", [])
    finally:
        stop(server)
    log_text = log_path.read_text()
    assert "Traceback" not in log_text, log_text


SETOSA = [5.1, 3.5, 1.4, 0.2]


@pytest.mark.parametrize(
    ("case", "body", "status", "message"),
    [
        ("wrong datatype", _infer_body(datatype="BOOL", data=[True, False, True, True]), 400, "not BOOL"),
        ("unknown datatype", _infer_body(datatype="FLOAT", data=SETOSA), 400, "unknown datatype 'FLOAT'"),
        ("strings as FP32", _infer_body(data=["5.1", "3.5", "1.4", "0.2"]), 400, "must be JSON numbers"),
        ("fractions as INT64", _infer_body(datatype="INT64", data=SETOSA), 400, "must be integers"),
        ("booleans among numbers", _infer_body(data=[5.1, True, 1.4, 0.2]), 400, "must not hold booleans"),
        ("wrong shape", _infer_body(shape=[1, 3], data=SETOSA[:3]), 400, "takes shape [-1, 4]"),
        ("shape and data disagree", _infer_body(shape=[2, 4], data=SETOSA), 400, "holds 8 values; its data has 4"),
        ("ragged data", _infer_body(shape=[2, 4], data=[SETOSA, SETOSA[:3]]), 400, "ragged"),
        ("unknown input", _infer_body(name="x", data=SETOSA), 400, "unknown input 'x'"),
        ("no data", _infer_body(), 400, "has no JSON data"),
        ("beyond FP32", _infer_body(datatype="FP64", data=[1e300, 1, 1, 1]), 400, "within FP32 range"),
        ("malformed JSON", b'{"inputs": [', 400, "not valid JSON"),
        ("not an object", b"[1, 2]", 400, "must be a JSON object"),
        ("unknown output", json.dumps({"inputs": [], "outputs": [{"name": "p"}]}).encode(), 400, "unknown output"),
        ("oversize body", b" " * (MAX_REQUEST_BYTES + 1), 413, f"limit of {MAX_REQUEST_BYTES} bytes"),
    ],
)
def test_bad_infer_requests_are_4xx_json_errors(
    onnx_served: Served, case: str, body: bytes, status: int, message: str
) -> None:
    for path in ("/v2/models/iris/infer", f"/v2/models/iris/versions/{onnx_served.version}/infer"):
        answer = _request(onnx_served, "POST", path, body, {"Content-Type": "application/json"})
        assert answer[0] == status, (case, answer)
        assert list(answer[1]) == ["error"], answer
        assert message in answer[1]["error"], (case, answer)


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("POST", "/v2/models/nothing/infer", 404, "unknown model 'nothing': this server serves 'iris'"),
        ("GET", "/v2/models/nothing", 404, "unknown model 'nothing'"),
        ("GET", "/v2/models/nothing/ready", 404, "unknown model 'nothing'"),
        ("GET", "/v2/models/iris/versions/1", 404, "unknown version '1' of model 'iris'"),
        ("POST", "/v2/models/iris/versions/1/infer", 404, "unknown version '1'"),
        ("GET", "/v2/models/iris/infer", 405, "not allowed"),
        ("GET", "/v2/repository/index", 404, "not found"),
    ],
)
def test_unknown_models_versions_and_routes_are_json_errors(
    onnx_served: Served, method: str, path: str, status: int, message: str
) -> None:
    answer = _request(onnx_served, method, path, _infer_body(data=SETOSA) if method == "POST" else None)
    assert answer[0] == status, answer
    assert list(answer[1]) == ["error"]
    assert message in answer[1]["error"]


def test_binary_tensor_data_is_refused_with_a_400_that_says_so(onnx_served: Served) -> None:
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}
    ).encode()
    body = header + np.asarray(SETOSA, dtype=np.float32).tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    status, answer = _request(onnx_served, "POST", "/v2/models/iris/infer", body, headers)
    assert status == 400
    assert "binary tensor data extension is not supported" in answer["error"]


def test_the_version_may_be_given_with_its_quotes(onnx_served: Served) -> None:
    quoted = urllib.parse.quote(f'"{onnx_served.version}"')
    assert _request(onnx_served, "GET", f"/v2/models/iris/versions/{quoted}/ready") == (
        200,
        {"name": "iris", "ready": True},
    )
    status, answer = _request(onnx_served, "POST", f"/v2/models/iris/versions/{quoted}/infer", _infer_body(data=SETOSA))
    assert (status, answer["outputs"][0]["data"]) == (200, [0])


def test_v2_requests_are_counted_by_endpoint_template(onnx_served: Served) -> None:
    _request(onnx_served, "POST", "/v2/models/iris/infer", _infer_body(data=SETOSA))
    with urllib.request.urlopen(f"{onnx_served.base_url}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'endpoint="/v2/models/{model}/infer",method="POST",status="200"' in metrics


# --- not ready: the /readyz rule ----------------------------------------------------------------------------


def test_until_the_model_is_ready_v2_readiness_is_503_and_liveness_200(
    azurite: Azurite, sample_dir: Path, tmp_path: Path
) -> None:
    # (mypy reports an untyped module at its first import in a file only: these are the second ones.)
    import tritonclient.http as triton  # type: ignore[import-untyped,unused-ignore]
    from kserve import InferenceRESTClient, RESTConfig  # type: ignore[import-untyped,unused-ignore]
    from open_inference.openapi.client import OpenInferenceClient
    from open_inference.openapi.errors.service_unavailable_error import ServiceUnavailableError

    # A blob that is never there: the app retries the download and stays alive but not ready.
    url = f"{azurite.blob_endpoint}/models-{uuid.uuid4().hex[:12]}/iris.onnx"
    published = publish_model(sample_dir / "iris.onnx", url, connection_string=azurite.connection_string)
    missing = url.rsplit("/", 1)[0] + "/missing.onnx"
    server, base_url, log_path = _start(azurite, published, tmp_path, MODELAPP_MODEL_URL=missing)
    try:
        wait_for(f"{base_url}/readyz", 503, timeout=60)
        not_ready = Served(base_url, "missing", normalize_etag(published.etag), "", "label", "INT64", [])
        assert _request(not_ready, "GET", "/v2/health/live") == (200, {"live": True})
        status, ready = _request(not_ready, "GET", "/v2/health/ready")
        assert (status, ready["ready"]) == (503, False)
        for path in ("/v2/models/missing/ready", "/v2/models/missing", "/v2/models/missing/infer"):
            status, answer = _request(
                not_ready,
                "POST" if path.endswith("infer") else "GET",
                path,
                _infer_body(data=SETOSA) if path.endswith("infer") else None,
            )
            assert status == 503, (path, answer)
            assert answer["error"].startswith("model not ready: ")

        triton_client = triton.InferenceServerClient(url=not_ready.host_port)
        assert triton_client.is_server_live()
        assert not triton_client.is_server_ready()
        assert not triton_client.is_model_ready("missing")
        triton_client.close()

        async def kserve_checks() -> None:
            client = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=10))
            assert await client.is_server_live(base_url) is True
            assert await client.is_model_ready(base_url, "missing") is False
            with pytest.raises(httpx.HTTPStatusError, match="503"):
                await client.is_server_ready(base_url)
            await client.close()

        asyncio.run(kserve_checks())

        with httpx.Client(timeout=10) as http:
            oip_client = OpenInferenceClient(base_url=base_url, httpx_client=http)
            oip_client.check_server_liveness()
            with pytest.raises(ServiceUnavailableError):
                oip_client.check_server_readiness()
            with pytest.raises(ServiceUnavailableError):
                oip_client.check_model_readiness("missing")
    finally:
        stop(server)
    assert "Traceback" not in log_path.read_text()
