"""The Flask application factory: /predict, /healthz, /readyz, /version, /metrics.

Every error is JSON `{"error": "...", "status": N}`; no trace ever reaches a client.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

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
    _install_routes(app, state, metrics)
    app.wsgi_app = _MetricsMiddleware(app.wsgi_app, metrics)  # type: ignore[method-assign]

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


def _install_routes(app: Flask, state: ModelState, metrics: ServingMetrics) -> None:
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
            {"version": __version__, "model": info.as_json() if info else None, "ready": state.ready}, 200
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


class _MetricsMiddleware:
    """Counts and times every request at the WSGI level (cheaper than Flask hooks)."""

    def __init__(self, wrapped: WSGIApplication, metrics: ServingMetrics) -> None:
        self._wrapped = wrapped
        self._metrics = metrics
        self._clock: Callable[[], float] = time.perf_counter

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
            self._metrics.requests.labels(endpoint, environ.get("REQUEST_METHOD", ""), status_code).inc()
            self._metrics.latency.labels(endpoint).observe(self._clock() - started)
