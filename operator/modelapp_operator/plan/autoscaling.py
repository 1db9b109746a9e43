"""Replicas that follow load: the ModelApp's scale subresource and the HorizontalPodAutoscaler of spec.autoscaling.

Pure: no I/O. The HPA targets the ModelApp itself (its scale subresource: spec.replicas, status.replicas,
status.selector), not the Deployment, so one number says how many pods run whoever moves it (`kubectl
scale modelapp`, this HPA, KEDA, a person's edit), and the Deployment keeps a single writer: the operator
renders its replicas from spec.replicas on every apply, and a rollout or a rollback runs as many pods as
the HPA last asked for. An HPA aimed at the Deployment would share that field with the operator's
server-side apply, and every rollout would reset the count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelapp_operator.api.modelapp_types import ModelApp
from modelapp_operator.names import API_VERSION, KIND
from modelapp_operator.plan.children import _with_applied_hash, applied_hash, child_metadata, selector_labels

HPA_API_VERSION = "autoscaling/v2"
HPA_KIND = "HorizontalPodAutoscaler"
# The app's request counter (modelapp_serving.metrics: modelapp_http_requests_total) as a metrics adapter
# serves its rate per pod (prometheus-adapter's usual rule turns `<name>_total` into `<name>_per_second`).
REQUESTS_PER_SECOND_METRIC = "modelapp_http_requests_per_second"


def scale_selector(app: ModelApp) -> str:
    """status.selector: the label selector of the app's pods, as the scale subresource serves it (the HPA
    reads the pods' metrics through it)."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(app).items()))


def build_hpa(app: ModelApp) -> dict[str, Any] | None:
    """The autoscaling/v2 HorizontalPodAutoscaler of spec.autoscaling, or None when autoscaling is off."""
    autoscaling = app.spec.autoscaling
    if autoscaling is None:
        return None
    metrics: list[dict[str, Any]] = []
    if autoscaling.cpu_target is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": autoscaling.cpu_target},
                },
            }
        )
    if autoscaling.target_requests_per_second is not None:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": REQUESTS_PER_SECOND_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(autoscaling.target_requests_per_second)},
                },
            }
        )
    spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": app.name},
        "minReplicas": autoscaling.min_replicas,
        "maxReplicas": autoscaling.max_replicas,
        "metrics": metrics,
    }
    if autoscaling.scale_down_stabilization_seconds is not None:
        spec["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": autoscaling.scale_down_stabilization_seconds}}
    return _with_applied_hash(
        {"apiVersion": HPA_API_VERSION, "kind": HPA_KIND, "metadata": child_metadata(app), "spec": spec}
    )


def hpa_needs_apply(existing: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether desired must be applied over existing: it changed since we applied it, or someone edited
    the bounds, the target or the metrics (the API server fills in the rest of behavior itself)."""
    if existing is None or applied_hash(existing) != applied_hash(desired):
        return True

    def watched(obj: Mapping[str, Any]) -> tuple[Any, ...]:
        spec = obj.get("spec") or {}
        return (spec.get("scaleTargetRef"), spec.get("minReplicas"), spec.get("maxReplicas"), spec.get("metrics"))

    return watched(existing) != watched(desired)


@dataclass(frozen=True)
class AutoscalerPlan:
    """What a reconcile does about the HPA: apply this object, delete the one it left, or nothing."""

    apply: dict[str, Any] | None = None
    delete: bool = False
    name: str | None = None  # status.horizontalPodAutoscaler after this reconcile (None: there is none)


def plan_autoscaler(app: ModelApp, existing: Mapping[str, Any] | None) -> AutoscalerPlan:
    """existing: the HPA as read (None: absent, or not read because neither spec nor status names one)."""
    desired = build_hpa(app)
    if desired is None:
        return AutoscalerPlan(delete=existing is not None)
    return AutoscalerPlan(apply=desired if hpa_needs_apply(existing, desired) else None, name=app.name)


def reads_autoscaler(app: ModelApp) -> bool:
    """Whether the reconcile must read the HPA: autoscaling is on, or the status says one was left to delete.
    Apps without autoscaling pay no request for it."""
    return app.spec.autoscaling is not None or bool(app.status.get("horizontalPodAutoscaler"))
