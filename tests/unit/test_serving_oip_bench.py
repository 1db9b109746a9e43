"""The serving benchmark's V2 side (bench/serving_rps.py --protocols): like compared with like by protocol, and
one V2 body every V2 server takes, ModelApp's included."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from modelapp_serving.config import ModelFormat, ServingConfig
from modelapp_serving.model import load_model_file
from modelapp_serving.web import create_app

from tests.unit.test_bench_serving import bench, make_spec, result

pytestmark = pytest.mark.unit


def spec(name: str, *, api: str, runtime: str = "onnx", is_modelapp: bool = False) -> Any:
    made = make_spec(name, is_modelapp=is_modelapp, versions={})
    return dataclasses.replace(made, api=api, runtime=runtime, key="mlserver" if name == "MLServer" else made.key)


def test_each_modelapp_protocol_is_compared_with_the_peers_of_that_protocol() -> None:
    summaries = [
        bench.ServerSummary(spec("ModelApp [onnx]", api="v1", is_modelapp=True), [result(6000, 4.0)]),
        bench.ServerSummary(spec("ModelApp V2 [onnx]", api="v2", is_modelapp=True), [result(5000, 4.0)]),
        bench.ServerSummary(spec("KServe [onnx]", api="v1"), [result(3000, 5.0)]),
        bench.ServerSummary(spec("KServe V2 [onnx]", api="v2"), [result(2000, 6.0)]),
        bench.ServerSummary(spec("KServe V2 [sklearn]", api="v2", runtime="sklearn"), [result(4000, 1.0)]),
        bench.ServerSummary(spec("MLServer", api="v2", runtime="sklearn"), [result(1000, 9.0)]),
    ]
    found = {c["modelapp"]: c for c in bench.comparisons(summaries)}
    assert found["ModelApp [onnx]"]["best_peer"] == "KServe [onnx]"
    assert found["ModelApp V2 [onnx]"]["best_peer"] == "KServe V2 [onnx]"  # not KServe V1, nor another runtime
    assert found["ModelApp V2 [onnx]"]["api"] == "v2"
    assert found["ModelApp V2 [onnx]"]["ratio"] == 2.5
    assert found["ModelApp V2 [onnx]"]["met"] is True


def test_without_kserve_v2_mlserver_is_the_v2_peer() -> None:
    summaries = [
        bench.ServerSummary(spec("ModelApp V2 [onnx]", api="v2", is_modelapp=True), [result(1200, 4.0)]),
        bench.ServerSummary(spec("KServe [onnx]", api="v1"), [result(3000, 5.0)]),
        bench.ServerSummary(spec("MLServer", api="v2", runtime="sklearn"), [result(1000, 9.0)]),
    ]
    (comparison,) = bench.comparisons(summaries)
    assert (comparison["best_peer"], comparison["met"]) == ("MLServer", False)


def test_protocols_are_parsed_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.parse_args([]).protocol_list == ["v1", "v2"]
    assert bench.parse_args(["--protocols", "v2"]).protocol_list == ["v2"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--protocols", "v3"])
    assert "--protocols: v1, v2 or both" in capsys.readouterr().err


def test_the_v2_specs_measure_the_infer_endpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "RUN_DIR", tmp_path)
    monkeypatch.setattr(bench, "distribution_versions", lambda python, names: {})
    files = bench.write_model_files(tmp_path / "models")
    ours = bench.modelapp_spec(files, 2, 8000, "onnx", "asgi", 1, api="v2")
    assert (ours.name, ours.key, ours.api) == ("ModelApp V2 asgi [onnx]", "modelapp-v2-asgi-onnx", "v2")
    assert ours.predict_url == "http://127.0.0.1:8000/v2/models/iris/infer"
    assert ours.env["MODELAPP_MODEL_NAME"] == "iris"
    assert ours.body == bench.V2_BODY
    kserve = bench.kserve_spec(files, 2, 8001, tmp_path, "onnx", api="v2")
    assert (kserve.name, kserve.key, kserve.api) == ("KServe V2 [onnx]", "kserve-v2-onnx", "v2")
    assert kserve.predict_url == "http://127.0.0.1:8001/v2/models/iris/infer"
    assert kserve.ready_url == "http://127.0.0.1:8001/v2/models/iris/ready"
    assert bench.modelapp_spec(files, 2, 8002, "onnx", "asgi", 1).predict_url.endswith("/predict")

    # The one V2 body is what ModelApp itself takes, and the answer is read where every V2 server puts it.
    model = load_model_file(files.onnx, ModelFormat.ONNX, allow_pickle=False)
    client = create_app(ServingConfig(model=None, model_name=bench.MODEL_NAME), model=model).test_client()
    response = client.post("/v2/models/iris/infer", data=bench.V2_BODY)
    assert response.status_code == 200
    assert bench.read_v2_prediction(response.get_json()) == files.expected_prediction
