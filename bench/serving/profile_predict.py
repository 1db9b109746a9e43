"""Where ModelApp's /predict and V2 infer spend their CPU inside one worker: per-stage microseconds, no network.

Calls the Flask app's WSGI entry directly with a prepared environ (what gunicorn hands it), so the numbers
are the app's own cost per request, without the HTTP server. Compare with the req/s that
`bench/serving_rps.py` measures to see how much of a request is the server around the app.

    .venv/bin/python bench/serving/profile_predict.py [--format onnx|skops] [--cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT / "app") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "app"))

from modelapp_serving import sample_model  # noqa: E402
from modelapp_serving.config import ModelFormat, ServingConfig  # noqa: E402
from modelapp_serving.model import load_model_file  # noqa: E402
from modelapp_serving.predict import parse_features, predictions_body  # noqa: E402
from modelapp_serving.web import create_app, get_serving  # noqa: E402

BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()
# The serving benchmark's V2 body (bench/serving_rps.py V2_BODY).
V2_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
).encode()
V2_INFER = "/v2/models/iris/infer"


def wsgi_environ(method: str, path: str, body: bytes = b"") -> dict[str, Any]:
    """The environ gunicorn builds for a small keep-alive request."""
    return {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_HOST": "127.0.0.1:8080",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def _start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], object]:
    return lambda data: None


def microseconds_per_call(call: Callable[[], object], repeat: int) -> float:
    for _ in range(min(500, repeat)):
        call()
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/serving/profile_predict.py", description=__doc__)
    parser.add_argument("--format", choices=("onnx", "skops"), default="onnx", help="model file (default onnx)")
    parser.add_argument("--repeat", type=int, default=20_000, help="calls per stage (default 20000)")
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as directory:
        files = sample_model.write_sample_models(Path(directory))
        path = files.onnx if args.format == "onnx" else files.skops
        model = load_model_file(path, ModelFormat(args.format), allow_pickle=False)
    app = create_app(ServingConfig(model=None, model_name="iris"), model=model)
    wsgi = app  # the full stack gunicorn calls, metrics middleware included
    metrics = get_serving(app).metrics
    served = get_serving(app).oip.served()
    assert served is not None
    features = parse_features(BODY, model)

    def predict_request() -> None:
        chunks: Iterable[bytes] = wsgi(wsgi_environ("POST", "/predict", BODY), _start_response)
        b"".join(chunks)

    def infer_request() -> None:
        chunks: Iterable[bytes] = wsgi(wsgi_environ("POST", V2_INFER, V2_BODY), _start_response)
        b"".join(chunks)

    def healthz_request() -> None:
        b"".join(wsgi(wsgi_environ("GET", "/healthz"), _start_response))

    def record_metrics() -> None:
        metrics.requests.labels("/predict", "POST", "200").inc()
        metrics.latency.labels("/predict").observe(0.001)

    stages: list[tuple[str, Callable[[], object]]] = [
        ("POST /predict through the whole WSGI app", predict_request),
        ("GET /healthz through the whole WSGI app (Flask floor)", healthz_request),
        ("  parse_features (json.loads + checks)", lambda: parse_features(BODY, model)),
        (f"  model.predict ({args.format})", lambda: model.predict(features)),
        ("  predictions_body (json.dumps)", lambda: predictions_body([0])),
        (f"POST {V2_INFER} through the whole WSGI app", infer_request),
        (
            f"  ServedModel.infer (json.loads + checks + model.predict + json.dumps), {args.format}",
            lambda: served.infer(V2_BODY),
        ),
        ("  metrics: counter inc + histogram observe", record_metrics),
    ]
    print(f"| stage ({args.format}, {args.repeat} calls each) | us per call |")
    print("| --- | ---: |")
    for label, call in stages:
        print(f"| {label} | {microseconds_per_call(call, args.repeat):.1f} |")

    if args.cprofile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.repeat):
            predict_request()
        profiler.disable()
        report = io.StringIO()
        pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(20)
        print(report.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
