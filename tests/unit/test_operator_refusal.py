"""A stalled rollout's refusal: which pods are read, which message is taken, and where status shows it."""

from __future__ import annotations

from typing import Any

import pytest
from modelapp_operator.api.modelapp_types import parse_modelapp
from modelapp_operator.names import ANNOTATION_IMAGE_DIGEST, ANNOTATION_MODEL_VERSION, ConditionType, Reason
from modelapp_operator.plan.children import build_deployment
from modelapp_operator.plan.history import Rollback, RolloutPlan, rolled_back_condition, with_refusal
from modelapp_operator.plan.reconcile_plan import plan_reconcile, plan_refresh
from modelapp_operator.plan.refusal import (
    RECHECK_FIRST_SECONDS,
    RECHECK_MAX_SECONDS,
    REFUSAL_MAX_CHARS,
    needs_pod_check,
    next_recheck_delay,
    pod_selector,
    refusal_from_pods,
)
from modelapp_operator.plan.release import Release

from tests.unit.test_operator_reconcile_plan import IMAGE, MODEL, NOW, body, inputs, live

pytestmark = pytest.mark.unit

REFUSED = "sha256 mismatch: expected 1111, got 2222; refusing to load"


def deployment(ready: bool = False) -> dict[str, Any]:
    return live(build_deployment(parse_modelapp(body()), Release(IMAGE, MODEL)), ready=ready)


def pod(name: str, container: dict[str, Any], *, pair: tuple[str, str] | None = None) -> dict[str, Any]:
    digest, version = pair or (IMAGE.digest, MODEL.version)
    return {
        "metadata": {"name": name, "annotations": {ANNOTATION_IMAGE_DIGEST: digest, ANNOTATION_MODEL_VERSION: version}},
        "status": {"containerStatuses": [{"name": "app", **container}]},
    }


def terminated(message: str, key: str = "lastState") -> dict[str, Any]:
    return {key: {"terminated": {"exitCode": 3, "message": message}}}


def test_pods_are_read_only_while_the_rollout_is_not_complete() -> None:
    assert needs_pod_check(deployment(ready=False), 1)
    assert not needs_pod_check(deployment(ready=True), 1)
    assert not needs_pod_check(None, 1)


def test_the_selector_is_the_deployments_match_labels() -> None:
    labels = deployment()["spec"]["selector"]["matchLabels"]
    assert pod_selector(deployment()) == ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    assert pod_selector({"spec": {}}) is None


def test_the_refusal_is_the_app_containers_termination_message_of_the_current_pair() -> None:
    live_deployment = deployment()
    pods = [
        pod("iris-old", terminated("old pair refused"), pair=("sha256:" + "9" * 64, '"0x0"')),
        pod("iris-b", {"state": {"running": {}}}),
        pod("iris-c", terminated(f"  {REFUSED}\n", key="state")),
        pod("iris-d", terminated("later pod")),
    ]
    assert refusal_from_pods(live_deployment, pods) == f"pod iris-c: {REFUSED}"
    assert refusal_from_pods(live_deployment, pods[:2]) is None
    sidecar = pod("iris-e", {})
    sidecar["status"]["containerStatuses"] = [{"name": "proxy", **terminated("not the app")}]
    assert refusal_from_pods(live_deployment, [sidecar]) is None
    long = refusal_from_pods(live_deployment, [pod("iris-f", terminated("x" * 5000))])
    assert long is not None and len(long) == REFUSAL_MAX_CHARS and long.endswith("...")


def verified(status: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {c["type"]: c for c in status["conditions"]}[ConditionType.MODEL_VERIFIED]
    return found


def test_a_refusal_shows_in_model_verified_until_no_pod_refuses() -> None:
    app = parse_modelapp(body())
    first = plan_reconcile(inputs(app), NOW)
    status = first.status_update(live(first.apply[1], ready=False)).status
    settled = parse_modelapp(body(status))
    refused = plan_refresh(settled, status, deployment(), NOW, f"pod iris-c: {REFUSED}")
    assert refused is not None and refused.update is not None
    condition = verified(refused.update.status)
    assert (condition["status"], condition["reason"]) == ("False", Reason.MODEL_REFUSED)
    assert REFUSED in condition["message"]
    recovered = plan_refresh(settled, refused.update.status, deployment(ready=True), NOW)
    assert recovered is not None and recovered.update is not None
    assert verified(recovered.update.status)["status"] == "True"


def test_a_rollback_records_the_refusal_on_the_failed_entry_and_in_degraded() -> None:
    release = Release(IMAGE, MODEL)
    history = [
        {
            "revision": 3,
            "imageDigest": IMAGE.digest,
            "modelVersion": '"0x1"',
            "outcome": "Progressing",
            "rollbackOf": 2,
        },
        {"revision": 2, "imageDigest": IMAGE.digest, "modelVersion": '"0x2"', "outcome": "Failed"},
    ]
    rollout = RolloutPlan(release, history, [], Rollback(failed=history[1], restored=release))
    recorded = with_refusal(rollout, f"pod iris-c: {REFUSED}").history
    assert recorded[1]["refusal"] == f"pod iris-c: {REFUSED}" and "refusal" not in recorded[0]
    assert "refusal" not in history[1]  # a new history, the input unchanged
    condition = rolled_back_condition(recorded, 45)
    assert condition is not None and f"{Reason.MODEL_REFUSED}: pod iris-c: {REFUSED}" in condition.message


def test_a_progressing_rollout_without_a_refusal_is_looked_at_again_with_backoff() -> None:
    progressing = {"history": [{"revision": 2, "outcome": "Progressing"}], "conditions": []}
    assert next_recheck_delay(progressing, None) == RECHECK_FIRST_SECONDS
    assert next_recheck_delay(progressing, RECHECK_FIRST_SECONDS) == 2 * RECHECK_FIRST_SECONDS
    assert next_recheck_delay(progressing, RECHECK_MAX_SECONDS) == RECHECK_MAX_SECONDS
    refused = {**progressing, "conditions": [{"type": "ModelVerified", "status": "False", "reason": "ModelRefused"}]}
    assert next_recheck_delay(refused, None) is None  # already shown: Deployment events take over
    assert next_recheck_delay({"history": [{"revision": 2, "outcome": "Ready"}]}, 5.0) is None  # steady state
    assert next_recheck_delay(None, 5.0) is None
