"""The operator's metrics as a real Prometheus (the local stack's) scrapes them, read back with PromQL:
after a push and a new model version roll out, the change -> Ready histogram holds both observations;
after a blob service goes away, the poll error counter rises; webhooks and rollouts are counted."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient
from modelapp_localstack import Azurite, KubeCluster, Registry, Stack
from modelapp_localstack.azurite import start_azurite
from modelapp_localstack.cleanup import recording_into
from modelapp_localstack.operator import OperatorProcess
from modelapp_localstack.procs import free_port
from modelapp_localstack.prometheus import Prometheus

from tests.cluster import helpers
from tests.cluster.helpers import (
    App,
    StartOperator,
    apply,
    conditions,
    get,
    modelapp,
    prepare,
    publish_model,
)

pytestmark = pytest.mark.cluster

NAMESPACE_PREFIX = f"mx-{uuid.uuid4().hex[:6]}"
POLL_SECONDS = 1
JOB = "modelapp-operator"
T = TypeVar("T")


@pytest.fixture(scope="module")
def operator(
    start_operator: StartOperator,
    registry: Registry,
    azurite: Azurite,
    local_stack: Stack,
    prometheus: Prometheus,
    registry_notify_port: int,
    registry_notify_token: str,
) -> Iterator[OperatorProcess]:
    port = free_port()
    env = {
        "MODELAPP_POLL_INTERVAL_SECONDS": str(POLL_SECONDS),
        "MODELAPP_WATCH_ERROR_TTL_SECONDS": "0",
        "MODELAPP_RECEIVER_TOKEN": registry_notify_token,
        "MODELAPP_RECEIVER_PORT": str(registry_notify_port),
        "MODELAPP_RECEIVER_BIND": "127.0.0.1",  # where the stack's registry sends its notifications
        "MODELAPP_METRICS_PORT": str(port),
        "MODELAPP_METRICS_BIND": local_stack.host,
    }
    secrets = (registry.password, azurite.account_key, registry_notify_token)
    running = start_operator(f"{NAMESPACE_PREFIX}-*", env, secrets=secrets)
    try:
        prometheus.scrape(JOB, [f"{local_stack.host}:{port}"])
        wait_for("Prometheus to scrape the operator", lambda: prometheus.targets_up(JOB), running, timeout=30)
        yield running
    finally:
        prometheus.scrape(JOB, [])  # before start_operator stops the operator at the module's end


def wait_for(what: str, check: Callable[[], T | None], operator: OperatorProcess, timeout: float = 90) -> T:
    return helpers.wait_for(what, check, operator, timeout, interval=0.2)


def ready_with(kube: KubeCluster, app: App, digest: str, etag: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        body = get(kube, "modelapp", app)
        if body is None:
            return None
        status = body.get("status") or {}
        ready = (conditions(body).get("Ready") or {}).get("status") == "True"
        image, model = (status.get("image") or {}).get("digest"), (status.get("model") or {}).get("version")
        return body if ready and image == digest and model == etag else None

    return check


def scraped(
    prometheus: Prometheus, promql: str, operator: OperatorProcess, at_least: float, timeout: float = 30
) -> float:
    """The value of promql once Prometheus has scraped it at or above at_least."""

    def reached() -> float | None:
        value = prometheus.value(promql)
        return value if value is not None and value >= at_least else None

    return wait_for(f"{promql} >= {at_least}", reached, operator, timeout=timeout)


def counts(prometheus: Prometheus, metric: str, by: str) -> dict[str, float]:
    return {r["metric"].get(by, ""): float(r["value"][1]) for r in prometheus.query(f"sum by ({by}) ({metric})")}


def test_change_to_ready_histogram_has_the_rollouts(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    operator: OperatorProcess,
    prometheus: Prometheus,
) -> None:
    app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
    apply(kube, modelapp(app, azurite))
    wait_for("Ready", ready_with(kube, app, app.digest, app.model_etag), operator)
    count = "sum(modelapp_operator_change_to_ready_seconds_count)"
    before = prometheus.value(count) or 0.0

    pushed_at = time.monotonic()
    digest = registry.push_random_image(f"apps/{app.namespace}", "stable")
    wait_for("Ready with the pushed image", ready_with(kube, app, digest, app.model_etag), operator)
    push_seconds = time.monotonic() - pushed_at
    uploaded_at = time.monotonic()
    _, etag = publish_model(models, app.blob_name, f"model of {app.namespace} v2".encode())
    wait_for("Ready with the new model", ready_with(kube, app, digest, etag), operator)
    upload_seconds = time.monotonic() - uploaded_at

    assert scraped(prometheus, count, operator, before + 2) >= before + 2
    by_trigger = counts(prometheus, "modelapp_operator_change_to_ready_seconds_count", "trigger")
    sums = counts(prometheus, "modelapp_operator_change_to_ready_seconds_sum", "trigger")
    p50 = prometheus.value(
        "histogram_quantile(0.5, sum by (le) (modelapp_operator_change_to_ready_seconds_bucket))"
    )
    print(
        f"\nchange -> Ready as Prometheus recorded it: count by trigger {by_trigger}, sum by trigger "
        f"{ {k: round(v, 3) for k, v in sums.items()} }, p50 (bucket estimate) {p50}; as the test saw it: "
        f"push -> Ready {push_seconds:.2f}s, blob upload -> Ready {upload_seconds:.2f}s (poll every {POLL_SECONDS}s)"
    )
    assert set(by_trigger) <= {"webhook", "poll", "reconcile"}
    # Each observation is at most what the test measured from the push / upload (learned later than that).
    assert sum(sums.values()) <= push_seconds + upload_seconds + 1.0

    started = counts(prometheus, "modelapp_operator_rollouts_started_total", "cause")
    completed = counts(prometheus, "modelapp_operator_rollouts_completed_total", "cause")
    for cause in ("initial", "image", "model"):
        assert started.get(cause, 0) >= 1 and completed.get(cause, 0) >= 1, (cause, started, completed)
    webhooks = prometheus.query('modelapp_operator_webhook_requests_total{source="registry",status="202"}')
    assert webhooks and float(webhooks[0]["value"][1]) >= 1
    assert prometheus.value('sum(modelapp_operator_modelapps{condition="Ready",status="True"})') == 1
    assert prometheus.value("modelapp_operator_active") == 1
    assert (prometheus.value("sum(modelapp_operator_reconciles_total)") or 0) >= 1


def test_poll_errors_rise_while_a_blob_service_is_down(
    kube: KubeCluster,
    registry: Registry,
    azurite: Azurite,
    models: ContainerClient,
    local_stack: Stack,
    operator: OperatorProcess,
    prometheus: Prometheus,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A blob service of its own, so stopping it leaves the session's Azurite to the other tests.
    with recording_into(local_stack.ledger):
        outage = start_azurite(tmp_path_factory.mktemp("azurite-outage"), in_memory=True, host=local_stack.host)
    try:
        app = prepare(kube, registry, azurite, models, prefix=NAMESPACE_PREFIX)
        container = BlobServiceClient.from_connection_string(outage.connection_string).get_container_client("models")
        container.create_container()
        _, etag = publish_model(container, app.blob_name, b"model behind a failing blob service")
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "outage", "namespace": app.namespace},
                  "stringData": {"connectionString": outage.connection_string}}  # fmt: skip
        kube.kubectl("apply", "-f", "-", input=json.dumps(secret))
        body = modelapp(app, azurite)
        body["spec"]["model"] = {
            "blob": {"accountUrl": outage.blob_endpoint, "container": "models", "name": app.blob_name},
            "credentials": {"secretRef": {"name": "outage"}},
        }
        apply(kube, body)
        wait_for("Ready", ready_with(kube, app, app.digest, etag), operator)
        errors = 'sum(modelapp_operator_upstream_errors_total{kind="storage",trigger="poll"})'
        requests = 'sum(modelapp_operator_upstream_requests_total{kind="storage",trigger="poll"})'
        polled = scraped(prometheus, requests, operator, 1)
        before = prometheus.value(errors) or 0.0
    finally:
        outage.stop()
    # The storage SDK retries a refused connection with backoff: one failed poll takes about 18 s here.
    after = scraped(prometheus, errors, operator, before + 2, timeout=90)
    print(f"\npoll errors (storage) before the outage {before:g}, after {after:g}; poll requests before {polled:g}")
    assert after >= before + 2
