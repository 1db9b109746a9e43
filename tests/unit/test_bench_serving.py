"""The pure helpers of bench/serving_rps.py: wrk output, server entries, medians, the markdown report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.unit

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "serving_rps.py"


def _load_bench() -> ModuleType:
    # bench/ is not a package: load the script by path (registered first, as dataclasses need).
    spec = importlib.util.spec_from_file_location("serving_rps", BENCH_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def wrk_line(requests: int = 30_000, duration_us: int = 10_000_000, **overrides: int) -> str:
    summary = {
        "requests": requests,
        "duration_us": duration_us,
        "bytes": 123,
        "errors_connect": 0,
        "errors_read": 0,
        "errors_write": 0,
        "errors_status": 0,
        "errors_timeout": 0,
        "latency_p50_us": 2500,
        "latency_p90_us": 4000,
        "latency_p99_us": 12345,
        "latency_max_us": 50000,
        "latency_mean_us": 2600.5,
        **overrides,
    }
    return "WRK_JSON " + json.dumps(summary)


def test_wrk_summary_is_read_from_its_line_among_wrk_output() -> None:
    stdout = f"Running 10s test @ http://127.0.0.1:1/predict\n  2 threads and 8 connections\n{wrk_line()}\n"
    result = bench.parse_wrk_summary(stdout)
    assert result.requests == 30_000
    assert result.requests_per_s == pytest.approx(3000.0)
    assert (result.p50_ms, result.p90_ms, result.p99_ms) == (2.5, 4.0, 12.345)
    assert result.errors == 0


def test_wrk_errors_of_every_kind_are_summed() -> None:
    line = wrk_line(errors_connect=1, errors_read=2, errors_write=3, errors_status=4, errors_timeout=5)
    assert bench.parse_wrk_summary(line).errors == 15


def test_zero_duration_gives_zero_rate_not_a_crash() -> None:
    assert bench.parse_wrk_summary(wrk_line(duration_us=0)).requests_per_s == 0.0


def test_missing_wrk_summary_is_an_error_showing_the_output() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)no WRK_JSON line.*connection refused"):
        bench.parse_wrk_summary("unable to connect: connection refused\n")


def test_wrk_argv_passes_the_body_file_to_the_script() -> None:
    load = bench.LoadSettings(threads=2, connections=8, duration_s=10, warmup_s=2)
    argv = load.wrk_argv("http://127.0.0.1:1/predict", Path("bench-body.json"), 3)
    assert argv[:5] == ["wrk", "-t2", "-c8", "-d3s", "--timeout=5s"]
    assert argv[-3:] == ["http://127.0.0.1:1/predict", "--", "bench-body.json"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("modelapp", ("modelapp", None, 1, False)),
        ("kserve", ("kserve", None, 1, False)),
        (" MLServer ", ("mlserver", None, 1, False)),
        ("modelapp:sync", ("modelapp", "sync", 1, False)),
        ("modelapp:gthread:4+reuse-port", ("modelapp", "gthread", 4, True)),
        ("modelapp:gthread", ("modelapp", "gthread", 1, False)),
    ],
)
def test_server_entries_parse(entry: str, expected: tuple[str, str | None, int, bool]) -> None:
    parsed = bench.parse_server_entry(entry)
    assert (parsed.kind, parsed.worker_class, parsed.threads, parsed.reuse_port) == expected


@pytest.mark.parametrize(
    "entry", ["modelapp+reuse-port", "kserve+reuse-port", "modelapp:gthread:0", "modelapp:async", "torchserve"]
)
def test_bad_server_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match=r"modelapp|server|reuse-port|gthread"):
        bench.parse_server_entry(entry)


def test_gunicorn_defaults_are_read_from_the_printed_config() -> None:
    defaults = bench.parse_gunicorn_defaults("gthread 4 True\n")
    assert defaults == bench.GunicornDefaults("gthread", 4, True)
    assert bench.parse_gunicorn_defaults("sync 1 False").reuse_port is False


def test_collapsed_stacks_split_idle_from_busy_samples() -> None:
    text = "\n".join(
        [
            "worker;Worker.run;EpollSelector.select 60",
            "worker;MetricsMiddleware.__call__;PredictFastPath.__call__;OnnxModel.predict 20",
            "worker;MetricsMiddleware.__call__;PredictFastPath.__call__ 10",
            "worker;Response.write 10",
            "not a sample line",
        ]
    )
    shares = dict(bench.summarize_collapsed_stacks(text))
    assert shares[bench.IDLE_LABEL] == pytest.approx(60.0)
    assert shares["model predict (onnxruntime / estimator)"] == pytest.approx(50.0)
    assert shares["gunicorn: write the response"] == pytest.approx(25.0)
    wsgi_label = next(label for label in shares if label.startswith("WSGI around the app"))
    assert shares[wsgi_label] == pytest.approx(25.0)


def make_spec(name: str, *, is_modelapp: bool, versions: dict[str, str]) -> Any:
    return bench.ServerSpec(
        name=name,
        key=name.lower().replace(" ", "-"),
        protocol="V1",
        processes="2 workers",
        model_file="iris.onnx",
        argv=["true"],
        predict_url="http://127.0.0.1:1/predict",
        ready_url="http://127.0.0.1:1/readyz",
        body=b"{}",
        read_prediction=lambda document: document,
        versions=versions,
        is_modelapp=is_modelapp,
    )


def result(requests_per_s: float, p99_ms: float, errors: int = 0) -> Any:
    return bench.LoadResult(
        requests=int(requests_per_s * 10),
        requests_per_s=requests_per_s,
        p50_ms=1.0,
        p90_ms=2.0,
        p99_ms=p99_ms,
        errors=errors,
    )


def test_summary_takes_medians_and_sums_errors() -> None:
    spec = make_spec("KServe", is_modelapp=False, versions={})
    summary = bench.ServerSummary(spec, [result(100, 9.0, 1), result(300, 3.0), result(200, 5.0, 2)])
    assert summary.requests_per_s == 200
    assert summary.p99_ms == 5.0
    assert summary.errors == 3


def build_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, summaries: list[Any]) -> str:
    monkeypatch.setattr(bench, "_wrk_version", lambda: "wrk 4.1.0")
    files = []
    for name in ("iris.onnx", "iris.skops", "iris.joblib"):
        path = tmp_path / name
        path.write_bytes(name.encode())
        files.append(path)
    model_files = bench.ModelFiles(onnx=files[0], skops=files[1], joblib=files[2], expected_prediction=0)
    report: str = bench.build_report(
        summaries,
        command=".venv/bin/python bench/serving_rps.py",
        load=bench.LoadSettings(threads=2, connections=8, duration_s=10, warmup_s=2),
        rounds=3,
        model_files=model_files,
        load_before=(1.5, 1.0, 1.0),
        load_after=(2.5, 1.0, 1.0),
        elapsed_s=200.0,
    )
    return report


def test_report_has_one_row_per_server_and_the_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app_versions = {"modelapp": "0.1.0", "flask": "3"}
    ours = make_spec("ModelApp", is_modelapp=True, versions=app_versions)
    variant = make_spec("ModelApp sync", is_modelapp=True, versions=app_versions)
    kserve = make_spec("KServe", is_modelapp=False, versions={"kserve": "0.21.0"})
    mlserver = make_spec("MLServer", is_modelapp=False, versions={"mlserver": "1.7.1"})
    report = build_report(
        tmp_path,
        monkeypatch,
        [
            bench.ServerSummary(ours, [result(5000, 4.0)] * 3),
            bench.ServerSummary(variant, [result(2500, 20.0)] * 3),
            bench.ServerSummary(kserve, [result(2000, 10.0)] * 3),
            bench.ServerSummary(mlserver, [result(800, 30.0)] * 3),
        ],
    )
    assert "Command: `.venv/bin/python bench/serving_rps.py`" in report
    assert "| ModelApp | V1 | 2 workers | iris.onnx | 5,000 | 1.00 | 4.00 | 5,000 / 5,000 / 5,000 | 0 |" in report
    assert "| KServe | V1 | 2 workers | iris.onnx | 2,000 |" in report
    assert "- ModelApp / best peer (KServe): **2.50x** req/s, p99 4.00 ms vs 10.00 ms" in report
    assert "met**." in report.split("- ModelApp / best peer")[1].splitlines()[0]
    assert "**not met**" in report.split("- ModelApp sync / best peer")[1].splitlines()[0]
    assert report.count("- ModelApp: modelapp 0.1.0, flask 3") == 1  # variants share one versions line
    assert "- load generator: wrk 4.1.0" in report


def test_faster_but_worse_p99_does_not_meet_the_goal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = make_spec("ModelApp", is_modelapp=True, versions={})
    kserve = make_spec("KServe", is_modelapp=False, versions={})
    report = build_report(
        tmp_path,
        monkeypatch,
        [bench.ServerSummary(ours, [result(4000, 12.0)]), bench.ServerSummary(kserve, [result(2000, 10.0)])],
    )
    assert "**2.00x** req/s" in report
    assert "**not met**" in report


def test_report_without_peers_has_no_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = make_spec("ModelApp", is_modelapp=True, versions={})
    report = build_report(tmp_path, monkeypatch, [bench.ServerSummary(ours, [result(4000, 12.0)])])
    assert "best peer" not in report
