"""The pure core of a reconcile: objects to apply, events to post and status to write, without a client."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from modelapp_operator.api.modelapp_types import ModelApp, parse_modelapp
from modelapp_operator.names import ConditionType, Reason
from modelapp_operator.plan.children import build_deployment, build_service
from modelapp_operator.plan.reconcile_plan import (
    ReconcileInputs,
    Resolution,
    plan_invalid_spec,
    plan_reconcile,
    plan_refresh,
    refresh_applies,
)
from modelapp_operator.plan.release import Release, ResolvedImage, ResolvedModel
from modelapp_operator.plan.status import Condition

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
DIGEST = "sha256:" + "1" * 64
SHA = "b" * 64
IMAGE = ResolvedImage(repository="127.0.0.1:5000/team/iris", digest=DIGEST, tag="1.0")
MODEL = ResolvedModel(
    url="http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx", version='"0x1"', sha256=SHA, format="onnx"
)
IMAGE_OK = Resolution(Condition(ConditionType.IMAGE_RESOLVED, "True", Reason.RESOLVED, "1.0 is ..."))
MODEL_OK = Resolution(Condition(ConditionType.MODEL_RESOLVED, "True", Reason.RESOLVED, "models/iris.onnx ..."))


def body(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"name": "iris", "namespace": "ml", "uid": "u1", "generation": generation},
        "spec": {
            "image": {"repository": "127.0.0.1:5000/team/iris", "tag": "1.0"},
            "model": {
                "blob": {
                    "accountUrl": "http://127.0.0.1:10000/devstoreaccount1",
                    "container": "models",
                    "name": "iris.onnx",
                },
                "credentials": {"secretRef": {"name": "storage"}},
            },
        },
        "status": status or {},
    }


def inputs(
    app: ModelApp,
    *,
    deployment: dict[str, Any] | None = None,
    service: dict[str, Any] | None = None,
    image: ResolvedImage | None = IMAGE,
    image_resolution: Resolution = IMAGE_OK,
) -> ReconcileInputs:
    return ReconcileInputs(app, image, image_resolution, MODEL, MODEL_OK, deployment, service)


def live(desired: dict[str, Any], *, ready: bool) -> dict[str, Any]:
    """The Deployment as the API server would return it: applied, and (when ready) rolled out."""
    deployment = {**desired, "metadata": {**desired["metadata"], "generation": 1}}
    if ready:
        deployment["status"] = {
            "observedGeneration": 1,
            "replicas": 1,
            "readyReplicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": 1,
        }
    return deployment


def test_first_reconcile_applies_both_children_and_announces_the_rollout() -> None:
    app = parse_modelapp(body())
    plan = plan_reconcile(inputs(app), NOW)
    assert plan.applied_kinds == ("Service", "Deployment")
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", Reason.ROLLOUT_STARTED)]
    assert plan.events[0].message.startswith("Deploying image 127.0.0.1:5000/team/iris@sha256:")
    assert plan.failure is None
    assert plan.release == Release(IMAGE, MODEL)
    # The API server's answer to the apply decides the rollout part of the status.
    update = plan.status_update(live(plan.apply[1], ready=False))
    assert update.changed
    conditions = {c["type"]: c for c in update.status["conditions"]}
    assert conditions[ConditionType.READY]["reason"] == Reason.ROLLING_OUT
    assert update.status["history"][0]["reason"] == Reason.INITIAL


def test_nothing_is_applied_when_the_children_are_as_desired() -> None:
    app = parse_modelapp(body())
    release = Release(IMAGE, MODEL)
    deployment = live(build_deployment(app, release), ready=True)
    first = plan_reconcile(inputs(app, deployment=deployment, service=build_service(app)), NOW)
    assert first.apply == () and first.events == ()
    update = first.status_update()
    assert {c["type"]: c["status"] for c in update.status["conditions"]}[ConditionType.READY] == "True"
    assert [e.reason for e in update.events] == [Reason.READY]
    # The next reconcile settles the history entry (Ready); the one after changes nothing.
    status = update.status
    for _ in range(2):
        settled = parse_modelapp(body(status))
        again = plan_reconcile(inputs(settled, deployment=deployment, service=build_service(settled)), NOW)
        assert again.apply == ()
        status = again.status_update().status
    assert status["history"][0]["outcome"] == "Ready"
    assert not again.status_update().changed


def test_a_child_owned_by_someone_else_blocks_everything() -> None:
    app = parse_modelapp(body())
    foreign = {"metadata": {"name": "iris", "namespace": "ml", "ownerReferences": []}}
    plan = plan_reconcile(inputs(app, service=foreign), NOW)
    assert plan.apply == () and plan.events == ()
    assert plan.failure is not None
    assert (plan.failure.reason, plan.failure.retry_after) == (Reason.NAME_CONFLICT, 60)


def test_a_resolution_failure_keeps_the_deployed_pair_and_asks_for_a_retry() -> None:
    app = parse_modelapp(body())
    failed = Resolution(
        Condition(ConditionType.IMAGE_RESOLVED, "False", Reason.REGISTRY_UNAVAILABLE, "cannot reach"), 30
    )
    plan = plan_reconcile(inputs(app, image=None, image_resolution=failed), NOW)
    assert plan.release is None and plan.applied_kinds == ("Service",)
    assert plan.failure is not None
    assert (plan.failure.reason, plan.failure.retry_after) == (Reason.REGISTRY_UNAVAILABLE, 30)


def test_an_invalid_spec_is_permanent_and_keeps_the_replica_summary() -> None:
    broken = body({"replicaSummary": "2/2"})
    broken["spec"]["replicas"] = -1
    plan = plan_invalid_spec(broken, "spec.replicas: too small", NOW)
    assert plan.apply == () and plan.failure is not None and plan.failure.retry_after is None
    update = plan.status_update()
    assert update.status["replicaSummary"] == "2/2"
    assert {c["type"]: c["reason"] for c in update.status["conditions"]}[ConditionType.READY] == Reason.INVALID_SPEC


def test_refresh_follows_the_live_deployment_and_notices_drift() -> None:
    app = parse_modelapp(body())
    first = plan_reconcile(inputs(app), NOW)
    status = first.status_update(live(first.apply[1], ready=False)).status
    assert refresh_applies(status)
    settled = parse_modelapp(body(status))
    rolled_out = live(build_deployment(settled, Release(IMAGE, MODEL)), ready=True)
    refresh = plan_refresh(settled, status, rolled_out, NOW)
    assert refresh is not None and refresh.update is not None and not refresh.drifted
    assert {c["type"]: c["status"] for c in refresh.update.status["conditions"]}[ConditionType.READY] == "True"
    scaled = {**rolled_out, "spec": {**rolled_out["spec"], "replicas": 5}}
    drifted = plan_refresh(settled, status, scaled, NOW)
    assert drifted is not None and drifted.drifted


def test_no_refresh_before_the_first_reconcile() -> None:
    assert not refresh_applies({})
