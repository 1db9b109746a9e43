"""The Flask application factory: /predict, /healthz, /readyz, /version, /metrics and the Open Inference
Protocol's REST endpoints under /v2 (oip.py; docs/serving-api.md).

Every error is JSON `{"error": "...", "status": N}` (under /v2 the protocol's `{"error": "..."}`); no trace
ever reaches a client. A well-formed `POST /predict` or `POST /v2/models/<name>/infer` is answered by a plain
WSGI fast path that skips Flask's request and response objects (app time per request ~110 us -> 20-35 us,
bench/serving/profile_predict.py); anything it does not answer itself goes to Flask, so error responses come
from one place.
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
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from modelapp_serving import __version__
from modelapp_serving.config import ServingConfig
from modelapp_serving.metrics import ServingMetrics
from modelapp_serving.model import LoadedModel
from modelapp_serving.oip import BINARY_HEADER, OipApi, OipError, served_model_name, server_metadata
from modelapp_serving.oip import error_body as oip_error_body
from modelapp_serving.predict import BadInput, parse_features, predictions_body
from modelapp_serving.shadow_header import pair_header
from modelapp_serving.state import ModelInfo, ModelState, model_info_from_config, start_background_load

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from modelapp_serving.shadow import Shadow

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

EXTENSION_KEY = "modelapp"
JSON_MIMETYPE = "application/json"
KNOWN_ENDPOINTS = frozenset(
    {"/predict", "/healthz", "/readyz", "/version", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready"}
)
# The metrics' endpoint label for the model's /v2 endpoints: the name and version are not label values.
V2_INFER_ENDPOINT = "/v2/models/{model}/infer"
V2_MODEL_READY_ENDPOINT = "/v2/models/{model}/ready"
V2_MODEL_METADATA_ENDPOINT = "/v2/models/{model}"
_OK_BODY = b'{"status":"ok"}'
_INTERNAL_ERROR_V2 = oip_error_body("internal error")
# Requests with these headers go to Flask: chunked bodies, and binary tensor data (which it refuses).
_FLASK_ANSWERS_HEADERS = frozenset({b"transfer-encoding", b"inference-header-content-length"})


class ServingExtension:
    """What the app keeps beside Flask: its config, model state and metrics."""

    def __init__(self, config: ServingConfig, state: ModelState, metrics: ServingMetrics, oip: OipApi) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.oip = oip
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

    oip = OipApi(served_model_name(config), state)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    app.extensions[EXTENSION_KEY] = ServingExtension(config, state, metrics, oip)
    _install_error_handlers(app)
    _install_routes(app, state, metrics, config.image)
    _install_oip_routes(app, state, oip)
    fast_path = PredictFastPath(app.wsgi_app, state, config.max_request_bytes, oip)
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


def _request_body() -> bytes:
    """The request body, refused with a 413 past MAX_CONTENT_LENGTH. werkzeug refuses a longer Content-Length
    itself, but cuts a body without one (chunked) at the limit silently, which then read as "not valid JSON";
    one more byte from the server's own stream (which ends where the body ends) says whether it went on."""
    body = request.get_data(cache=False)
    limit = request.max_content_length
    if (
        request.content_length is None
        and limit is not None
        and len(body) >= limit
        and request.environ["wsgi.input"].read(1)
    ):
        raise RequestEntityTooLarge()
    return body


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
            features = parse_features(_request_body(), model)
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


def _install_oip_routes(app: Flask, state: ModelState, oip: OipApi) -> None:
    """The Open Inference Protocol's REST endpoints (oip.py): health, metadata, readiness and infer."""

    def not_ready() -> Response:
        return v2_error_response(f"model not ready: {state.reason}", 503, {"Retry-After": "5"})

    @app.get("/v2")
    def v2_server_metadata() -> Response:
        return json_response(server_metadata(), 200)

    @app.get("/v2/health/live")
    def v2_live() -> Response:
        return Response(b'{"live":true}', mimetype=JSON_MIMETYPE)

    @app.get("/v2/health/ready")
    def v2_ready() -> Response:
        if state.ready:
            return Response(b'{"ready":true}', mimetype=JSON_MIMETYPE)
        return json_response({"ready": False, "error": f"model not ready: {state.reason}"}, 503, {"Retry-After": "5"})

    @app.get("/v2/models/<model_name>")
    @app.get("/v2/models/<model_name>/versions/<model_version>")
    def v2_model_metadata(model_name: str, model_version: str | None = None) -> Response:
        oip.check_model(model_name, model_version)
        served = oip.served()
        if served is None:
            return not_ready()
        return json_response(served.metadata(), 200)

    @app.get("/v2/models/<model_name>/ready")
    @app.get("/v2/models/<model_name>/versions/<model_version>/ready")
    def v2_model_ready(model_name: str, model_version: str | None = None) -> Response:
        oip.check_model(model_name, model_version)
        if state.ready:
            return json_response({"name": model_name, "ready": True}, 200)
        reason = f"model not ready: {state.reason}"
        return json_response({"name": model_name, "ready": False, "error": reason}, 503, {"Retry-After": "5"})

    @app.post("/v2/models/<model_name>/infer")
    @app.post("/v2/models/<model_name>/versions/<model_version>/infer")
    def v2_infer(model_name: str, model_version: str | None = None) -> Response:
        oip.check_model(model_name, model_version)
        served = oip.served()
        if served is None:
            return not_ready()
        if BINARY_HEADER in request.headers:
            raise OipError(
                "the binary tensor data extension is not supported: send the tensors as JSON "
                "(tritonclient: binary_data=False)"
            )
        return Response(served.infer(_request_body()), mimetype=JSON_MIMETYPE)


def v2_error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(oip_error_body(message), status=status, mimetype=JSON_MIMETYPE, headers=headers)


def _is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(OipError)
    def oip_error(error: OipError) -> Response:
        return v2_error_response(error.message, error.status)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = error.description or error.name
        if status == 413:
            message = f"the body is larger than the limit of {app.config['MAX_CONTENT_LENGTH']} bytes"
        valid_methods = getattr(error, "valid_methods", None)
        headers = {"Allow": ", ".join(valid_methods)} if valid_methods else None
        if _is_v2(request.path):
            return v2_error_response(message, status, headers)
        return error_response(message, status, headers)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        if _is_v2(request.path):
            return v2_error_response("internal error", 500)
        return error_response("internal error", 500)


class PredictFastPath:
    """WSGI: answers a well-formed `POST /predict` or `POST /v2/models/<name>/infer` without Flask; hands
    everything else to `fallback`.

    Only the success path and the unexpected-error 500 are answered here. Not ready, not JSON (/predict), no
    or a too large Content-Length, chunked bodies, binary tensor data (infer) and bad input all go to Flask
    (with the body put back), so every 4xx/503 is exactly the one the Flask route gives.
    """

    def __init__(self, fallback: WSGIApplication, state: ModelState, max_request_bytes: int, oip: OipApi) -> None:
        self.fallback = fallback
        self._state = state
        self._max_request_bytes = max_request_bytes
        self._oip = oip

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        model = self._state.model
        if model is None or environ.get("REQUEST_METHOD") != "POST" or "HTTP_TRANSFER_ENCODING" in environ:
            return self.fallback(environ, start_response)
        path = environ.get("PATH_INFO")
        answer: Callable[[bytes], bytes]
        if path == "/predict":
            # The same mimetype rule as werkzeug's Request.mimetype (the part before ";", stripped, lowercase).
            mimetype = environ.get("CONTENT_TYPE", "").partition(";")[0].strip(" \t").lower()
            if mimetype != JSON_MIMETYPE and not mimetype.endswith("+json"):
                return self.fallback(environ, start_response)
            answer, internal_error = _predict_answer(model), error_body("internal error", 500)
        else:
            served = self._oip.served()
            if served is None or path not in served.infer_paths or "HTTP_INFERENCE_HEADER_CONTENT_LENGTH" in environ:
                return self.fallback(environ, start_response)
            answer, internal_error = served.infer, _INTERNAL_ERROR_V2
        length_text = environ.get("CONTENT_LENGTH", "")
        if not (length_text.isascii() and length_text.isdigit()) or not 0 < int(length_text) <= self._max_request_bytes:
            return self.fallback(environ, start_response)
        length = int(length_text)
        body: bytes = environ["wsgi.input"].read(length)
        try:
            if len(body) != length:
                raise BadInput("the body is shorter than its Content-Length")
            payload = answer(body)
        except (BadInput, OipError):
            # Flask parses it again and gives the 400 (or the 400 for a short body) with its usual message.
            environ["wsgi.input"] = io.BytesIO(body)
            return self.fallback(environ, start_response)
        except Exception:
            log.exception("unhandled error on POST %s", path)
            return _respond(start_response, "500 INTERNAL SERVER ERROR", internal_error)
        return _respond(start_response, "200 OK", payload)


def _predict_answer(model: LoadedModel) -> Callable[[bytes], bytes]:
    def answer(body: bytes) -> bytes:
        return predictions_body(model.predict(parse_features(body, model)))

    return answer


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
            # endpoint is one of KNOWN_ENDPOINTS, the V2_*_ENDPOINT templates or "other": a bounded set.
            histogram = self._latency_histograms[endpoint] = self._metrics.latency.labels(endpoint)
        histogram.observe(seconds)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = self._clock()
        endpoint = endpoint_label(environ.get("PATH_INFO", ""))
        status_code = "000"

        def recording_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal status_code
            status_code = status[:3]
            return start_response(status, headers, exc_info)

        try:
            return self._wrapped(environ, recording_start_response)
        finally:
            self.count(endpoint, environ.get("REQUEST_METHOD", ""), status_code, self._clock() - started)


def endpoint_label(path: str) -> str:
    """The metrics' endpoint label of a path: itself when known, the model's /v2 endpoints as templates."""
    if path in KNOWN_ENDPOINTS:
        return path
    if path.startswith("/v2/models/"):
        if path.endswith("/infer"):
            return V2_INFER_ENDPOINT
        if path.endswith("/ready"):
            return V2_MODEL_READY_ENDPOINT
        return V2_MODEL_METADATA_ENDPOINT
    return "other"


def create_asgi_app(config: ServingConfig | None = None, *, model: LoadedModel | None = None) -> AsgiPredictApp:
    """The same app for an ASGI server (gunicorn with uvicorn workers, MODELAPP_WORKER_CLASS=asgi).

    `POST /predict` and `POST /v2/models/<name>/infer` are answered on the event loop by `AsgiPredictApp`;
    everything else (and every request the fast path does not answer itself) goes to the Flask app through
    a2wsgi, so error responses, /readyz, /metrics and /version are exactly the WSGI app's."""
    flask_app = create_app(config, model=model)
    serving = get_serving(flask_app)
    metrics = flask_app.wsgi_app
    assert isinstance(metrics, MetricsMiddleware)
    shadow: Shadow | None = None
    if serving.config.shadow is not None:
        from modelapp_serving.shadow import Shadow  # noqa: PLC0415 - only a pod that shadows imports aiohttp

        shadow = Shadow(serving.config.shadow, serving.metrics)
    model_spec = serving.config.model
    return AsgiPredictApp(
        flask_app,
        serving.state,
        serving.config.max_request_bytes,
        metrics,
        serving.oip,
        shadow=shadow,
        pair=pair_header(serving.config.image, model_spec.etag if model_spec else None),
    )


class AsgiPredictApp:
    """ASGI: a well-formed `POST /predict` or V2 infer answered without threads or Flask; the rest through a2wsgi.

    The WSGI fast path under gunicorn's gthread workers spent about three quarters of each request in the
    server (writing the response, waking the poll loop through a pipe, handing the connection between
    threads; bench/serving_rps.py --py-spy). One event loop per worker with httptools' parser does that
    work without thread hand-overs; the model is CPU-bound and tiny per request, so it runs on the loop.
    """

    def __init__(
        self,
        flask_app: Flask,
        state: ModelState,
        max_request_bytes: int,
        metrics: MetricsMiddleware,
        oip: OipApi,
        *,
        shadow: Shadow | None = None,
        pair: tuple[bytes, bytes] | None = None,
    ) -> None:
        # a2wsgi types scopes and messages as TypedDicts; this class passes them on as it got them.
        fallback = WSGIMiddleware(_input_terminated(flask_app))  # type: ignore[arg-type]
        self._fallback: Callable[[Any, Any, Any], Awaitable[None]] = fallback
        self._state = state
        self._max_request_bytes = max_request_bytes
        self._metrics = metrics
        self._oip = oip
        self._shadow = shadow
        # The pair this pod serves on every fast-path answer: a shadowing stable pod counts per candidate pair.
        self._extra_headers = [pair] if pair is not None else []

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self._shadow)
            return
        model = self._state.model
        if scope["type"] != "http" or model is None or scope["method"] != "POST":
            await self._fallback(scope, receive, send)
            return
        path = scope["path"]
        answer: Callable[[bytes], bytes]
        if path == "/predict":
            answer, endpoint, internal_error = _predict_answer(model), path, error_body("internal error", 500)
        else:
            served = self._oip.served()
            if served is None or path not in served.infer_paths:
                await self._fallback(scope, receive, send)
                return
            answer, endpoint, internal_error = served.infer, V2_INFER_ENDPOINT, _INTERNAL_ERROR_V2
        started = time.perf_counter()
        content_type, length_text, refused = b"", b"", False
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                length_text = value
            elif key in _FLASK_ANSWERS_HEADERS:
                refused = True
        # The same mimetype rule as werkzeug's Request.mimetype (the part before ";", stripped, lowercase).
        mimetype = content_type.partition(b";")[0].strip(b" \t").lower()
        if (
            refused
            or (endpoint == "/predict" and mimetype != b"application/json" and not mimetype.endswith(b"+json"))
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
            payload = answer(body)
            status = 200
        except (BadInput, OipError):
            # Flask parses it again and gives the 400 with its usual message (the metrics count it there).
            await self._fallback(scope, _replay(body), send)
            return
        except Exception:
            log.exception("unhandled error on POST %s", path)
            payload, status = internal_error, 500
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    *self._extra_headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        self._metrics.count(endpoint, "POST", str(status), time.perf_counter() - started)
        if self._shadow is not None and status == 200 and endpoint == "/predict":
            # After the user's answer is sent: shadowing never delays it (shadow.py).
            self._shadow.offer(body, payload)


def _input_terminated(app: WSGIApplication) -> WSGIApplication:
    """a2wsgi's `wsgi.input` ends where the ASGI request body ends, but a2wsgi does not say so: werkzeug then reads
    nothing of a body without Content-Length (chunked), and a chunked /predict got "not valid JSON". Said, werkzeug
    reads it up to MAX_CONTENT_LENGTH (and `_request_body` answers 413 past it), as under gunicorn's own workers.
    A body with a Content-Length is still read as long as that says (a shorter one is a 400)."""

    def terminated(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if "CONTENT_LENGTH" not in environ:
            environ["wsgi.input_terminated"] = True
        return app(environ, start_response)

    return terminated


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _lifespan(receive: Receive, send: Send, shadow: Shadow | None) -> None:
    """Nothing to start (the model loads in the background as under WSGI); at shutdown, the shadow's
    comparisons under way finish (each within its timeout) and its connections close."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if shadow is not None:
                await shadow.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
