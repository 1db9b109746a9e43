"""The Flask application factory: /predict, /healthz, /readyz, /version, /metrics.

Every error is JSON `{"error": "...", "status": N}`; no trace ever reaches a client.
A well-formed `POST /predict` is answered by a plain WSGI fast path that skips Flask's request and response
objects (app time per request ~110 us -> 20-35 us, bench/serving/profile_predict.py); anything it does not
answer itself goes to Flask, so error responses come from one place.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from a2wsgi import WSGIMiddleware
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from modelapp_serving import __version__
from modelapp_serving.config import ServingConfig
from modelapp_serving.metrics import ServingMetrics
from modelapp_serving.model import LoadedModel
from modelapp_serving.predict import BadInput, parse_features, predictions_body
from modelapp_serving.state import ModelInfo, ModelState, model_info_from_config, start_background_load

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

EXTENSION_KEY = "modelapp"
JSON_MIMETYPE = "application/json"
KNOWN_ENDPOINTS = frozenset({"/predict", "/healthz", "/readyz", "/version", "/metrics"})
_OK_BODY = b'{"status":"ok"}'


class ServingExtension:
    """What the app keeps beside Flask: its config, model state and metrics."""

    def __init__(self, config: ServingConfig, state: ModelState, metrics: ServingMetrics) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.predict_fast_path: PredictFastPath | None = None


def get_serving(app: Flask) -> ServingExtension:
    extension: ServingExtension = app.extensions[EXTENSION_KEY]
    return extension


def create_app(
    config: ServingConfig | None = None,
    *,
    model: LoadedModel | None = None,
    model_info: ModelInfo | None = None,
    load_in_background: bool = True,
) -> Flask:
    """Build the app. Without `model`, a background thread fetches, verifies and loads `config.model`.

    `model` (an in-memory model, for tests and tools) makes the app ready at once. With
    `load_in_background=False` the app stays not ready until someone calls `state.set_ready`.
    """
    config = ServingConfig.from_env() if config is None else config
    metrics = ServingMetrics()
    state = ModelState(model_info or model_info_from_config(config))
    metrics.mark_pair(config.image, config.model.etag if config.model is not None else None)

    def publish_ready(ready_state: ModelState) -> None:
        info = ready_state.info
        if info is not None:
            metrics.mark_model_ready(info.format, info.sha256, info.etag)
        else:
            metrics.model_ready.set(1)

    state.on_ready(publish_ready)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    app.extensions[EXTENSION_KEY] = ServingExtension(config, state, metrics)
    _install_error_handlers(app)
    _install_routes(app, state, metrics, config.image)
    fast_path = PredictFastPath(app.wsgi_app, state, config.max_request_bytes)
    get_serving(app).predict_fast_path = fast_path
    app.wsgi_app = MetricsMiddleware(fast_path, metrics)  # type: ignore[method-assign]

    if model is not None:
        state.set_ready(model)
    elif config.model is not None and load_in_background:
        start_background_load(state, config)
    elif config.model is None:
        state.set_waiting("no model configured", failed=True)
    return app


def json_response(payload: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, mimetype=JSON_MIMETYPE, headers=headers)


def error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message, "status": status}, status, headers)


def error_body(message: str, status: int) -> bytes:
    return json.dumps({"error": message, "status": status}, separators=(",", ":")).encode()


def _install_routes(app: Flask, state: ModelState, metrics: ServingMetrics, image: str | None = None) -> None:
    def not_ready() -> Response:
        return error_response(f"model not ready: {state.reason}", 503, {"Retry-After": "5"})

    @app.post("/predict")
    def predict() -> Response:
        model = state.model
        if model is None:
            return not_ready()
        mimetype = request.mimetype
        if mimetype != JSON_MIMETYPE and not mimetype.endswith("+json"):
            return error_response("the body must be JSON (Content-Type: application/json)", 415)
        try:
            features = parse_features(request.get_data(cache=False), model)
        except BadInput as error:
            return error_response(str(error), 400)
        return Response(predictions_body(model.predict(features)), mimetype=JSON_MIMETYPE)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(_OK_BODY, mimetype=JSON_MIMETYPE)

    @app.get("/readyz")
    def readyz() -> Response:
        if state.ready:
            return json_response({"ready": True}, 200)
        return json_response({"ready": False, "reason": state.reason, "failed": state.failed}, 503)

    @app.get("/version")
    def version() -> Response:
        info = state.info
        return json_response(
            {"version": __version__, "image": image, "model": info.as_json() if info else None, "ready": state.ready},
            200,
        )

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        return Response(metrics.render(), mimetype=None, content_type=metrics.content_type)


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            message = f"the body is larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes"
        valid_methods = getattr(error, "valid_methods", None)
        headers = {"Allow": ", ".join(valid_methods)} if valid_methods else None
        return error_response(message, status, headers)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response("internal error", 500)


class PredictFastPath:
    """WSGI: answers a well-formed `POST /predict` without Flask; hands everything else to `fallback`.

    Only the success path and the unexpected-error 500 are answered here. Not ready, not JSON, no or a
    too large Content-Length, chunked bodies and bad input all go to Flask (with the body put back), so
    every 4xx/503 is exactly the one the Flask route gives.
    """

    def __init__(self, fallback: WSGIApplication, state: ModelState, max_request_bytes: int) -> None:
        self.fallback = fallback
        self._state = state
        self._max_request_bytes = max_request_bytes

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        model = self._state.model
        if (
            model is None
            or environ.get("PATH_INFO") != "/predict"
            or environ.get("REQUEST_METHOD") != "POST"
            or "HTTP_TRANSFER_ENCODING" in environ
        ):
            return self.fallback(environ, start_response)
        # The same mimetype rule as werkzeug's Request.mimetype (the part before ";", stripped, lowercase).
        mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip(" \t").lower()
        length_text = environ.get("CONTENT_LENGTH", "")
        if (
            (mimetype != JSON_MIMETYPE and not mimetype.endswith("+json"))
            or not (length_text.isascii() and length_text.isdigit())
            or not 0 < int(length_text) <= self._max_request_bytes
        ):
            return self.fallback(environ, start_response)
        length = int(length_text)
        body: bytes = environ["wsgi.input"].read(length)
        try:
            if len(body) != length:
                raise BadInput("the body is shorter than its Content-Length")
            payload = predictions_body(model.predict(parse_features(body, model)))
        except BadInput:
            # Flask parses it again and gives the 400 (or the 400 for a short body) with its usual message.
            environ["wsgi.input"] = io.BytesIO(body)
            return self.fallback(environ, start_response)
        except Exception:
            log.exception("unhandled error on POST /predict")
            return _respond(start_response, "500 INTERNAL SERVER ERROR", error_body("internal error", 500))
        return _respond(start_response, "200 OK", payload)


def _respond(start_response: StartResponse, status: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", JSON_MIMETYPE), ("Content-Length", str(len(body)))])
    return [body]


class MetricsMiddleware:
    """Counts and times every request at the WSGI level (cheaper than Flask hooks).

    Metric children are looked up once per label set: `labels()` takes a lock and hashes the labels.
    """

    # Methods are client input: only this many label sets are remembered, the rest are looked up each time.
    MAX_CACHED_LABEL_SETS = 256

    def __init__(self, wrapped: WSGIApplication, metrics: ServingMetrics) -> None:
        self._wrapped = wrapped
        self._metrics = metrics
        self._clock: Callable[[], float] = time.perf_counter
        self._request_counters: dict[tuple[str, str, str], Any] = {}
        self._latency_histograms: dict[str, Any] = {}

    def count(self, endpoint: str, method: str, status_code: str, seconds: float) -> None:
        key = (endpoint, method, status_code)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._metrics.requests.labels(endpoint, method, status_code)
            if len(self._request_counters) < self.MAX_CACHED_LABEL_SETS:
                self._request_counters[key] = counter
        counter.inc()
        histogram = self._latency_histograms.get(endpoint)
        if histogram is None:
            # endpoint is one of KNOWN_ENDPOINTS or "other": a bounded set.
            histogram = self._latency_histograms[endpoint] = self._metrics.latency.labels(endpoint)
        histogram.observe(seconds)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = self._clock()
        path = environ.get("PATH_INFO", "")
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        status_code = "000"

        def recording_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal status_code
            status_code = status[:3]
            return start_response(status, headers, exc_info)

        try:
            return self._wrapped(environ, recording_start_response)
        finally:
            self.count(endpoint, environ.get("REQUEST_METHOD", ""), status_code, self._clock() - started)


def create_asgi_app(config: ServingConfig | None = None, *, model: LoadedModel | None = None) -> AsgiPredictApp:
    """The same app for an ASGI server (gunicorn with uvicorn workers, MODELAPP_WORKER_CLASS=asgi).

    `POST /predict` is answered on the event loop by `AsgiPredictApp`; everything else (and every /predict
    the fast path does not answer itself) goes to the Flask app through a2wsgi, so error responses,
    /readyz, /metrics and /version are exactly the WSGI app's."""
    flask_app = create_app(config, model=model)
    serving = get_serving(flask_app)
    metrics = flask_app.wsgi_app
    assert isinstance(metrics, MetricsMiddleware)
    return AsgiPredictApp(flask_app, serving.state, serving.config.max_request_bytes, metrics)


class AsgiPredictApp:
    """ASGI: a well-formed `POST /predict` answered without threads or Flask; the rest through a2wsgi.

    The WSGI fast path under gunicorn's gthread workers spent about three quarters of each request in the
    server (writing the response, waking the poll loop through a pipe, handing the connection between
    threads; bench/serving_rps.py --py-spy). One event loop per worker with httptools' parser does that
    work without thread hand-overs; the model is CPU-bound and tiny per request, so it runs on the loop.
    """

    def __init__(self, flask_app: Flask, state: ModelState, max_request_bytes: int, metrics: MetricsMiddleware) -> None:
        # a2wsgi types scopes and messages as TypedDicts; this class passes them on as it got them.
        self._fallback: Callable[[Any, Any, Any], Awaitable[None]] = WSGIMiddleware(flask_app)  # type: ignore[arg-type]
        self._state = state
        self._max_request_bytes = max_request_bytes
        self._metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        model = self._state.model
        if scope["type"] != "http" or model is None or scope["path"] != "/predict" or scope["method"] != "POST":
            await self._fallback(scope, receive, send)
            return
        started = time.perf_counter()
        content_type, length_text, chunked = b"", b"", False
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                length_text = value
            elif key == b"transfer-encoding":
                chunked = True
        # The same mimetype rule as werkzeug's Request.mimetype (the part before ";", stripped, lowercase).
        mimetype = content_type.partition(b";")[0].strip(b" \t").lower()
        if (
            chunked
            or (mimetype != b"application/json" and not mimetype.endswith(b"+json"))
            or not (length_text.isascii() and length_text.isdigit())
            or not 0 < int(length_text) <= self._max_request_bytes
        ):
            await self._fallback(scope, receive, send)
            return
        length = int(length_text)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False) or len(body) > length:
                break
        try:
            if len(body) != length:
                raise BadInput("the body is not as long as its Content-Length")
            payload = predictions_body(model.predict(parse_features(body, model)))
            status = 200
        except BadInput:
            # Flask parses it again and gives the 400 with its usual message (the metrics count it there).
            await self._fallback(scope, _replay(body), send)
            return
        except Exception:
            log.exception("unhandled error on POST /predict")
            payload, status = error_body("internal error", 500), 500
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        self._metrics.count("/predict", "POST", str(status), time.perf_counter() - started)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop: the model loads in the background as under WSGI."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
