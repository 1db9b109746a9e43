"""Prometheus metrics: plain registry, or prometheus_client multiprocess mode under gunicorn.

Multiprocess mode is chosen by prometheus_client itself when PROMETHEUS_MULTIPROC_DIR is set at import
time; then every worker writes its values to files there and /metrics aggregates them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

from modelapp_serving.shadow_header import served_pair

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The gate's p99 limit is read from these: finer where limits are usually set (10-500 ms).
SHADOW_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        # One registry per app, so tests can build many apps in one process.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "modelapp_http_requests",
            "HTTP requests by endpoint, method and status code.",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "modelapp_http_request_duration_seconds",
            "Time to handle a request, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "modelapp_model_info",
            "1 for the model this worker serves (labels: format, sha256, etag).",
            ["format", "sha256", "etag"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "modelapp_model_ready",
            "1 when the model is verified and loaded (the minimum over live workers).",
            multiprocess_mode="livemin",
            registry=self.registry,
        )
        self.model_ready.set(0)
        self.app_info = Gauge(
            "modelapp_app_info",
            "1 for the pair this pod serves: its image digest and its model version (ETag), as the operator set them.",
            ["image_digest", "model_version"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )

        # The release gate's shadow traffic (shadow.py): what the operator reads from the stable pods.
        self.shadow_comparisons = Counter(
            "modelapp_shadow_comparisons",
            "Requests also sent to the candidate pair, by the pair it named and outcome "
            "(agreed, disagreed, error, timeout).",
            ["candidate", "outcome"],
            registry=self.registry,
        )
        self.shadow_latency = Histogram(
            "modelapp_shadow_latency_seconds",
            "Time the candidate pair took to answer a shadowed request.",
            ["candidate"],
            buckets=SHADOW_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.shadow_dropped = Counter(
            "modelapp_shadow_dropped",
            "Requests not sent to the candidate: overloaded (every slot busy) or unreachable (none listening).",
            ["reason"],
            registry=self.registry,
        )

    def mark_pair(self, image: str | None, model_version: str | None) -> None:
        """image: `repository@sha256:...` (MODELAPP_IMAGE); model_version: the pinned ETag. Unknown: ""."""
        self.app_info.labels(*served_pair(image, model_version)).set(1)

    def mark_model_ready(self, format_name: str, sha256: str, etag: str) -> None:
        self.model_info.labels(format_name, sha256, etag).set(1)
        self.model_ready.set(1)

    def render(self) -> bytes:
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
