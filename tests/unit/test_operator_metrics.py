"""The operator's metrics: reconcile tracking, rollouts by cause, state gauges, change -> Ready, upstream
requests by trigger, webhook requests by source, the config of the port, and the app's pair info."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from modelapp_operator.config import ConfigError, OperatorConfig
from modelapp_operator.metrics import OperatorMetrics, serve
from modelapp_operator.names import ANNOTATION_IMAGE_DIGEST, ANNOTATION_MODEL_VERSION
from modelapp_operator.reconcile.reconciler import TemporaryReconcileError
from modelapp_operator.watch.keys import ImageKey, ModelKey
from modelapp_serving.metrics import ServingMetrics
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.unit

APP = ("ml", "iris")
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fresh() -> tuple[OperatorMetrics, Clock]:
    clock = Clock()
    return OperatorMetrics(CollectorRegistry(), clock=clock), clock


def value(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def deployment(digest: str, version: str, env: str = "a") -> dict[str, Any]:
    return {"spec": {"template": {
        "metadata": {"annotations": {ANNOTATION_IMAGE_DIGEST: digest, ANNOTATION_MODEL_VERSION: version}},
        "spec": {"containers": [{"name": "app", "env": [{"name": "X", "value": env}]}]},
    }}}  # fmt: skip


def status(ready: str, digest: str = D1, version: str = '"0x1"', degraded: str = "False") -> dict[str, Any]:
    return {
        "image": {"digest": digest},
        "model": {"version": version},
        "conditions": [{"type": "Ready", "status": ready}, {"type": "Degraded", "status": degraded}],
    }


def test_reconcile_counts_duration_errors_and_queue() -> None:
    metrics, _ = fresh()
    with metrics.reconcile() as tracked:
        assert value(metrics, "modelapp_operator_reconciles_waiting") == 1
        tracked.started()
        assert value(metrics, "modelapp_operator_reconciles_waiting") == 0
        assert value(metrics, "modelapp_operator_reconciles_in_flight") == 1
    with pytest.raises(TemporaryReconcileError), metrics.reconcile() as tracked:
        tracked.started()
        raise TemporaryReconcileError("RegistryUnavailable", "down", delay=5)
    with pytest.raises(RuntimeError), metrics.reconcile() as tracked:
        tracked.started()
        raise RuntimeError("bug")
    with pytest.raises(asyncio.CancelledError), metrics.reconcile():
        raise asyncio.CancelledError  # cancelled while waiting: neither run nor error
    assert value(metrics, "modelapp_operator_reconciles_total") == 3
    assert value(metrics, "modelapp_operator_reconcile_duration_seconds_count") == 3
    assert value(metrics, "modelapp_operator_reconcile_errors_total", reason="RegistryUnavailable") == 1
    assert value(metrics, "modelapp_operator_reconcile_errors_total", reason="Unexpected") == 1
    assert value(metrics, "modelapp_operator_reconciles_in_flight") == 0
    assert value(metrics, "modelapp_operator_reconciles_waiting") == 0


@pytest.mark.parametrize(
    ("before", "after", "cause"),
    [
        (None, deployment(D1, '"0x1"'), "initial"),
        (deployment(D1, '"0x1"'), deployment(D2, '"0x1"'), "image"),
        (deployment(D1, '"0x1"'), deployment(D1, '"0x2"'), "model"),
        (deployment(D1, '"0x1"'), deployment(D2, '"0x2"'), "both"),
        (deployment(D1, '"0x1"'), deployment(D1, '"0x1"', env="b"), "spec"),
    ],
)
def test_rollouts_by_cause_complete_when_ready(before: Any, after: Any, cause: str) -> None:
    metrics, _ = fresh()
    metrics.rollout_applied(APP, before, after)
    assert value(metrics, "modelapp_operator_rollouts_started_total", cause=cause) == 1
    metrics.status_observed(APP, status("False"))
    assert value(metrics, "modelapp_operator_rollouts_completed_total", cause=cause) == 0
    metrics.status_observed(APP, status("True"))
    metrics.status_observed(APP, status("True"))  # counted once
    assert value(metrics, "modelapp_operator_rollouts_completed_total", cause=cause) == 1


def test_unchanged_template_is_no_rollout_and_a_rollback_counts_the_failed_cause() -> None:
    metrics, _ = fresh()
    metrics.rollout_applied(APP, deployment(D1, '"0x1"'), deployment(D1, '"0x1"'))
    metrics.rollout_applied(APP, deployment(D1, '"0x1"'), None)
    assert metrics.registry.get_sample_value("modelapp_operator_rollouts_started_total", {"cause": "spec"}) is None
    metrics.rollout_applied(APP, deployment(D2, '"0x1"'), deployment(D1, '"0x1"'), rollback=True)
    assert value(metrics, "modelapp_operator_rollouts_rolled_back_total", cause="image") == 1
    assert value(metrics, "modelapp_operator_rollouts_started_total", cause="rollback") == 1


def test_modelapps_by_condition_follow_the_latest_status_and_deletion() -> None:
    metrics, _ = fresh()
    metrics.status_observed(APP, status("False"))
    metrics.status_observed(("ml", "other"), status("True"))
    assert value(metrics, "modelapp_operator_modelapps", condition="Ready", status="False") == 1
    assert value(metrics, "modelapp_operator_modelapps", condition="Ready", status="True") == 1
    metrics.status_observed(APP, status("True", degraded="True"))
    assert value(metrics, "modelapp_operator_modelapps", condition="Ready", status="False") == 0
    assert value(metrics, "modelapp_operator_modelapps", condition="Ready", status="True") == 2
    assert value(metrics, "modelapp_operator_modelapps", condition="Degraded", status="True") == 1
    metrics.forget(APP)
    assert value(metrics, "modelapp_operator_modelapps", condition="Ready", status="True") == 1
    assert value(metrics, "modelapp_operator_modelapps", condition="Degraded", status="True") == 0


def test_change_to_ready_from_first_sight_until_ready_with_that_version() -> None:
    metrics, clock = fresh()
    metrics.status_observed(APP, status("True"))  # Ready on the old pair: nothing pending
    metrics.change_learned([APP], "image", D2, "reconcile")  # a reconcile's own read
    clock.now += 1
    metrics.change_learned([APP], "model", "0x2", "poll")
    clock.now += 2
    metrics.status_observed(APP, status("True", D2, '"0x1"'))  # image Ready, model not yet
    assert value(metrics, "modelapp_operator_change_to_ready_seconds_sum", trigger="reconcile") == 3
    assert metrics.pending_changes(APP) == 1
    clock.now += 4
    metrics.status_observed(APP, status("False", D2, '"0x2"'))
    metrics.status_observed(APP, status("True", D2, '"0x2"'))
    assert value(metrics, "modelapp_operator_change_to_ready_seconds_sum", trigger="poll") == 6
    assert value(metrics, "modelapp_operator_change_to_ready_seconds_count", trigger="poll") == 1
    assert metrics.pending_changes(APP) == 0


def test_a_superseded_or_stale_change_is_never_observed() -> None:
    metrics, clock = fresh()
    metrics.change_learned([APP], "image", D1, "reconcile")
    metrics.change_learned([APP], "image", D2, "reconcile")  # pushed again before the first was Ready
    metrics.status_observed(APP, status("True", D1))
    assert metrics.pending_changes(APP) == 1
    clock.now += 7200
    metrics.status_observed(APP, status("True", D1))
    assert metrics.pending_changes(APP) == 0
    assert value(metrics, "modelapp_operator_change_to_ready_seconds_count", trigger="reconcile") == 0


def test_upstream_requests_by_kind_endpoint_and_trigger() -> None:
    metrics, _ = fresh()
    image = ImageKey("registry.example:5000", "apps/iris", "stable", "")
    model = ModelKey("https://acct.blob.core.windows.net", "models", "iris.onnx", "operator-identity")
    metrics.upstream_request(image, False, "reconcile")
    metrics.upstream_request(model, True, "poll")
    metrics.upstream_request(image, False, "webhook")
    labels = {"kind": "registry", "endpoint": "registry.example:5000"}
    assert value(metrics, "modelapp_operator_upstream_requests_total", **labels, trigger="reconcile") == 1
    assert value(metrics, "modelapp_operator_upstream_requests_total", **labels, trigger="webhook") == 1
    storage = {"kind": "storage", "endpoint": "acct", "trigger": "poll"}
    assert value(metrics, "modelapp_operator_upstream_errors_total", **storage) == 1


def test_metrics_port_setting() -> None:
    assert OperatorConfig.from_env({}).metrics_port == 8083
    assert OperatorConfig.from_env({"MODELAPP_METRICS_PORT": "9100"}).metrics_port == 9100
    for off in ("0", "off", "OFF"):
        assert OperatorConfig.from_env({"MODELAPP_METRICS_PORT": off}).metrics_port is None
    with pytest.raises(ConfigError, match="MODELAPP_METRICS_PORT"):
        OperatorConfig.from_env({"MODELAPP_METRICS_PORT": "70000"})


def test_served_over_http() -> None:
    metrics, _ = fresh()
    metrics.set_active(True)
    port = serve(metrics, 0, "127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    assert "modelapp_operator_active 1.0" in text
    assert 'modelapp_operator_modelapps{condition="Ready",status="True"} 0.0' in text


def test_app_exports_the_pair_it_serves() -> None:
    metrics = ServingMetrics()
    metrics.mark_pair(f"registry.example/apps/iris@{D1}", '"0x8DC"')
    text = metrics.render().decode()
    assert f'modelapp_app_info{{image_digest="{D1}",model_version="0x8DC"}} 1.0' in text


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    root = Path(__file__).resolve().parents[2] / "deploy" / "components"
    exported = exported_metric_names()
    dashboard = json.loads((root / "grafana-dashboard" / "modelapp-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    alerts = (root / "alerts" / "prometheusrule.yaml").read_text()
    assert expressions
    for text in [*expressions, alerts]:
        used = set(re.findall(r"\bmodelapp_[a-z_]+", text))
        assert used, text
        assert used <= exported, (used - exported, text)


def exported_metric_names() -> set[str]:
    """Every series name the operator and the app can export, histogram and counter suffixes included."""
    names: set[str] = set()
    for registry in (OperatorMetrics(CollectorRegistry()).registry, ServingMetrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names
