"""Replicas that follow load, without a client: spec.autoscaling parsed, the HPA rendered, applied when it
changed, deleted when it is no longer asked for; status.selector for the scale subresource; the CRD's scale
subresource and the reconcile's I/O shell on the in-memory client."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_operator.api.modelapp_types import SpecError, parse_modelapp
from modelapp_operator.names import API_VERSION, KIND, Reason
from modelapp_operator.plan.autoscaling import (
    HPA_KIND,
    REQUESTS_PER_SECOND_METRIC,
    build_hpa,
    hpa_needs_apply,
    plan_autoscaler,
    reads_autoscaler,
    scale_selector,
)
from modelapp_operator.plan.children import build_deployment
from modelapp_operator.plan.reconcile_plan import plan_invalid_spec, plan_reconcile

from tests.unit.test_operator_reconcile_plan import NOW, body, inputs, live
from tests.unit.test_operator_reconcile_shell import APP, Operator

pytestmark = pytest.mark.unit

CRD = Path(__file__).resolve().parents[2] / "crds" / "modelapp.yaml"
SELECTOR = "app.kubernetes.io/instance=iris,app.kubernetes.io/name=modelapp"


def autoscaled(autoscaling: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    app = body(status)
    app["spec"]["autoscaling"] = autoscaling
    return app


def with_hpa(found: Any, hpa: dict[str, Any] | None) -> Any:
    return dataclasses.replace(found, autoscaler=hpa)


def test_the_hpa_targets_the_modelapp_through_its_scale_subresource() -> None:
    app = parse_modelapp(autoscaled({"minReplicas": 2, "maxReplicas": 5, "targetCPUUtilizationPercentage": 60}))
    hpa = build_hpa(app)
    assert hpa is not None
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == "iris"
    assert hpa["metadata"]["ownerReferences"] == [app.owner_reference()]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": API_VERSION, "kind": KIND, "name": "iris"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["metrics"] == [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}
    ]
    assert "behavior" not in hpa["spec"]  # the HPA's own defaults


def test_cpu_is_the_default_target_and_requests_per_second_a_pods_metric() -> None:
    default = build_hpa(parse_modelapp(autoscaled({"maxReplicas": 3})))
    assert default is not None
    assert default["spec"]["minReplicas"] == 1
    assert default["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 80
    rps = build_hpa(parse_modelapp(autoscaled({"maxReplicas": 3, "targetRequestsPerSecond": 50})))
    assert rps is not None
    assert rps["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": REQUESTS_PER_SECOND_METRIC},
                "target": {"type": "AverageValue", "averageValue": "50"},
            },
        }
    ]
    slow_down = build_hpa(parse_modelapp(autoscaled({"maxReplicas": 3, "scaleDownStabilizationSeconds": 5})))
    assert slow_down is not None
    assert slow_down["spec"]["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 5}}


@pytest.mark.parametrize(
    ("autoscaling", "field"),
    [
        ({"minReplicas": 4, "maxReplicas": 3}, "spec.autoscaling"),
        ({"minReplicas": 1}, "spec.autoscaling.maxReplicas"),
        ({"maxReplicas": 101}, "spec.autoscaling.maxReplicas"),
        ({"maxReplicas": 3, "targetCPUUtilizationPercentage": 0}, "spec.autoscaling.targetCPUUtilizationPercentage"),
    ],
)
def test_a_bad_autoscaling_spec_names_its_field(autoscaling: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_modelapp(autoscaled(autoscaling))
    assert raised.value.field == field


def test_a_bad_autoscaling_spec_is_a_permanent_invalid_spec() -> None:
    raw = autoscaled({"minReplicas": 4, "maxReplicas": 3})
    with pytest.raises(SpecError) as raised:
        parse_modelapp(raw)
    plan = plan_invalid_spec(raw, str(raised.value), NOW)
    assert plan.failure is not None
    assert (plan.failure.reason, plan.failure.retry_after) == (Reason.INVALID_SPEC, None)
    assert "must not exceed maxReplicas" in plan.failure.message
    assert plan.apply == ()


def test_the_hpa_is_applied_with_the_children_then_only_when_it_changed() -> None:
    app = parse_modelapp(autoscaled({"maxReplicas": 4}))
    first = plan_reconcile(inputs(app), NOW)
    assert first.applied_kinds == ("Service", "Deployment", HPA_KIND)
    status = first.status_update(live(first.apply[1], ready=True)).status
    assert status["selector"] == SELECTOR
    assert status["horizontalPodAutoscaler"] == "iris"
    # The API server fills in behavior; our hash and the watched fields are unchanged: nothing to apply.
    answered = copy.deepcopy(first.apply[2])
    answered["spec"]["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": 300}}
    assert not hpa_needs_apply(answered, first.apply[2])
    edited = copy.deepcopy(answered)
    edited["spec"]["maxReplicas"] = 50  # someone edited our HPA: put it back
    assert hpa_needs_apply(edited, first.apply[2])
    app = parse_modelapp(autoscaled({"maxReplicas": 4}, status))
    deployment = live(first.apply[1], ready=True)
    again = plan_reconcile(with_hpa(inputs(app, deployment=deployment, service=first.apply[0]), answered), NOW)
    assert again.applied_kinds == ()


def test_the_deployment_runs_what_spec_replicas_says_which_the_hpa_moves() -> None:
    """A rollout renders spec.replicas, the count the HPA last wrote, never a fixed one of its own."""
    scaled = autoscaled({"maxReplicas": 6})
    scaled["spec"]["replicas"] = 5  # the HPA's last decision, through the scale subresource
    app = parse_modelapp(scaled)
    plan = plan_reconcile(inputs(app), NOW)
    assert plan.apply[1]["spec"]["replicas"] == 5


def test_removing_autoscaling_deletes_the_hpa_and_forgets_it() -> None:
    on = parse_modelapp(autoscaled({"maxReplicas": 4}))
    hpa = build_hpa(on)
    assert hpa is not None
    status = {"horizontalPodAutoscaler": "iris", "selector": SELECTOR}
    off = parse_modelapp(body(status))
    assert reads_autoscaler(off)  # the status says one was left: read it once more
    assert plan_autoscaler(off, hpa).delete
    plan = plan_reconcile(with_hpa(inputs(off), hpa), NOW)
    assert plan.delete_autoscaler
    assert HPA_KIND not in plan.applied_kinds
    update = plan.status_update(live(plan.apply[1], ready=True))
    assert "horizontalPodAutoscaler" not in update.status
    assert update.status["selector"] == SELECTOR
    # An app that never had autoscaling reads no HPA.
    assert not reads_autoscaler(parse_modelapp(body()))


def test_an_hpa_of_someone_elses_under_the_name_blocks_as_a_name_conflict() -> None:
    app = parse_modelapp(autoscaled({"maxReplicas": 4}))
    foreign = {"apiVersion": "autoscaling/v2", "kind": HPA_KIND, "metadata": {"name": "iris", "namespace": "ml"}}
    plan = plan_reconcile(with_hpa(inputs(app), foreign), NOW)
    assert plan.applied_kinds == ()
    assert plan.failure is not None
    assert plan.failure.reason == Reason.NAME_CONFLICT


def test_status_selector_matches_the_pods_the_deployment_selects() -> None:
    app = parse_modelapp(body())
    plan = plan_reconcile(inputs(app), NOW)
    labels = build_deployment(app, plan.release)["spec"]["selector"]["matchLabels"]  # type: ignore[arg-type]
    assert scale_selector(app) == ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def test_the_crd_has_a_scale_subresource_and_an_autoscaling_schema() -> None:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    autoscaling = schema["spec"]["properties"]["autoscaling"]
    assert autoscaling["required"] == ["maxReplicas"]
    assert set(autoscaling["properties"]) == {
        "minReplicas",
        "maxReplicas",
        "targetCPUUtilizationPercentage",
        "targetRequestsPerSecond",
        "scaleDownStabilizationSeconds",
    }
    assert {"selector", "horizontalPodAutoscaler"} <= set(schema["status"]["properties"])


async def test_the_reconcile_shell_creates_keeps_and_deletes_the_hpa() -> None:
    operator = Operator()
    await operator.created_and_ready()
    assert ("HorizontalPodAutoscaler", *APP) not in operator.kube.objects  # no autoscaling: none, and no GET
    assert operator.get(KIND)["status"]["selector"] == SELECTOR

    async def change(edit: Callable[[dict[str, Any]], None]) -> None:
        operator.kube.edit(KIND, *APP, edit)
        await operator.watch_event(KIND)
        await operator.clock.advance()

    await change(lambda app: app["spec"].update(autoscaling={"minReplicas": 1, "maxReplicas": 4}))
    hpa = operator.get(HPA_KIND)
    assert hpa["spec"]["scaleTargetRef"]["kind"] == KIND
    assert operator.kube.applies[-1] == (HPA_KIND, False)  # created without force: never taking someone else's
    assert operator.get(KIND)["status"]["horizontalPodAutoscaler"] == "iris"
    # The HPA scales the ModelApp (its scale subresource writes spec.replicas): the Deployment follows, the HPA
    # is not applied again.
    applies = len(operator.kube.applies)
    await change(lambda app: app["spec"].update(replicas=3))
    assert operator.get("Deployment")["spec"]["replicas"] == 3
    assert operator.kube.applies[applies:] == [("Deployment", True)]
    await change(lambda app: app["spec"].pop("autoscaling"))
    assert (HPA_KIND, *APP) not in operator.kube.objects
    assert "horizontalPodAutoscaler" not in operator.get(KIND)["status"]
    assert operator.get("Deployment")["spec"]["replicas"] == 3  # where the HPA left it
    await operator.close()
