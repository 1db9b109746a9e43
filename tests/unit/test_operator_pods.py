"""Pods judged fairly: which part failed, read from the pods' own state, and where status shows it."""

from __future__ import annotations

from typing import Any

import pytest
from modelapp_contract.termination import EXIT_MODEL_REFUSED, Refusal, RefusalKind
from modelapp_operator.api.modelapp_types import parse_modelapp
from modelapp_operator.names import ANNOTATION_IMAGE_DIGEST, ANNOTATION_MODEL_VERSION, ConditionType, Outcome, Reason
from modelapp_operator.plan.children import build_deployment
from modelapp_operator.plan.history import judge_history, rolled_back_condition
from modelapp_operator.plan.pods import (
    PROBLEM_MAX_CHARS,
    RECHECK_FIRST_SECONDS,
    RECHECK_MAX_SECONDS,
    diagnose_pods,
    needs_pod_check,
    next_recheck_delay,
    pod_selector,
    pods_needing_events,
    problem_shown,
)
from modelapp_operator.plan.reconcile_plan import plan_reconcile, plan_refresh
from modelapp_operator.plan.release import Release

from tests.unit.test_operator_reconcile_plan import IMAGE, MODEL, NOW, body, inputs, live

pytestmark = pytest.mark.unit

REFUSAL = Refusal(RefusalKind.CANNOT_LOAD, "cannot load the onnx model: [ONNXRuntimeError] INVALID_PROTOBUF").message()


def deployment(ready: bool = False) -> dict[str, Any]:
    return live(build_deployment(parse_modelapp(body()), Release(IMAGE, MODEL)), ready=ready)


def pod(name: str, container: dict[str, Any], *, pair: tuple[str, str] | None = None, **status: Any) -> dict[str, Any]:
    digest, version = pair or (IMAGE.digest, MODEL.version)
    return {
        "metadata": {"name": name, "annotations": {ANNOTATION_IMAGE_DIGEST: digest, ANNOTATION_MODEL_VERSION: version}},
        "status": {"containerStatuses": [{"name": "app", "ready": False, **container}], **status},
    }


def ended(
    exit_code: int, message: str = "", *, reason: str = "Error", restarts: int = 1, looping: bool = True
) -> dict[str, Any]:
    """A container that ended: waiting in CrashLoopBackOff with its last termination, as the kubelet shows it."""
    return {
        "restartCount": restarts,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}} if looping else {"running": {}},
        "lastState": {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}},
    }


def test_pods_are_read_only_while_the_rollout_is_not_complete() -> None:
    assert needs_pod_check(deployment(ready=False), 1)
    assert not needs_pod_check(deployment(ready=True), 1)
    assert not needs_pod_check(None, 1)


def test_the_selector_is_the_deployments_match_labels() -> None:
    labels = deployment()["spec"]["selector"]["matchLabels"]
    assert pod_selector(deployment()) == ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    assert pod_selector({"spec": {}}) is None


def test_an_image_that_exits_3_is_blamed_on_the_image_never_the_model() -> None:
    found = diagnose_pods(deployment(), [pod("iris-a", ended(3, "starting\nboom\n", restarts=4))])
    assert found is not None
    assert found.problem.reason == Reason.IMAGE_CRASHED
    assert "exited with code 3: starting | boom" in found.message
    assert "restarted 4 times, CrashLoopBackOff" in found.message
    assert found.crash_looping and not found.certain_refusal and found.problem.refusal is None


def test_a_refusal_names_the_model_and_its_kind_and_is_certain_when_every_pod_refused() -> None:
    pods = [pod("iris-a", ended(EXIT_MODEL_REFUSED, REFUSAL)), pod("iris-b", ended(EXIT_MODEL_REFUSED, REFUSAL))]
    found = diagnose_pods(deployment(), pods)
    assert found is not None and found.problem.reason == Reason.MODEL_REFUSED
    assert "refused the model (ModelCannotLoad): cannot load the onnx model" in found.message
    assert f"exit code {EXIT_MODEL_REFUSED}" in found.message
    assert found.certain_refusal and found.refused == found.pods == 2
    starting = pod("iris-c", {"state": {"running": {}}})
    assert not diagnose_pods(deployment(), [*pods, starting]).certain_refusal  # type: ignore[union-attr]


def test_only_pods_of_the_current_pair_and_its_app_container_count() -> None:
    old = pod("iris-old", ended(1, "old pair"), pair=("sha256:" + "9" * 64, '"0x0"'))
    ready = pod("iris-ready", {"ready": True, **ended(1, "crashed once, fine now", looping=False)})
    sidecar = pod("iris-side", {})
    sidecar["status"]["containerStatuses"] = [{"name": "proxy", **ended(1, "not the app")}]
    starting = pod("iris-new", {"state": {"waiting": {"reason": "ContainerCreating"}}})
    assert diagnose_pods(deployment(), [old, ready, sidecar, starting]) is None


@pytest.mark.parametrize(
    ("container", "status", "reason", "text"),
    [
        (ended(137, reason="OOMKilled"), {}, Reason.OOM_KILLED, "more memory than its limit"),
        (
            {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image x"}}},
            {},
            Reason.IMAGE_PULL_FAILED,
            "cannot pull its image (ImagePullBackOff): Back-off pulling image x",
        ),
        (
            {"state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}}},
            {},
            Reason.POD_START_FAILED,
            'cannot start (CreateContainerConfigError): secret "s" not found',
        ),
    ],
)
def test_each_part_has_its_reason(container: dict[str, Any], status: dict[str, Any], reason: str, text: str) -> None:
    found = diagnose_pods(deployment(), [pod("iris-a", container, **status)])
    assert found is not None and found.problem.reason == reason and text in found.message


def test_an_unschedulable_pod_says_why() -> None:
    unscheduled = pod("iris-a", {})
    unscheduled["status"] = {
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes"}]
    }
    found = diagnose_pods(deployment(), [unscheduled])
    assert found is not None and found.problem.reason == Reason.UNSCHEDULABLE and "0/2 nodes" in found.message


def test_a_probes_kill_is_told_from_a_crash_by_the_kubelets_events() -> None:
    killed = pod("iris-a", ended(0, restarts=2))
    assert pods_needing_events(deployment(), [killed, pod("iris-b", ended(3, "boom"))]) == ["iris-a"]
    events = [
        {"reason": "Unhealthy", "message": "Startup probe failed: HTTP probe failed with statuscode: 503", "count": 24},
        {"reason": "Killing", "message": "Container app failed startup probe, will be restarted", "count": 2},
    ]
    found = diagnose_pods(deployment(), [killed], {"iris-a": events})
    assert found is not None and found.problem.reason == Reason.PROBE_FAILED
    assert "startup probe failed 24 times (Startup probe failed: HTTP probe failed" in found.message
    without_events = diagnose_pods(deployment(), [killed])
    assert without_events is not None and without_events.problem.reason == Reason.IMAGE_CRASHED


def test_a_long_output_is_bounded_keeping_its_tail() -> None:
    found = diagnose_pods(deployment(), [pod("iris-a", ended(1, "x" * 5000 + "\nthe last line"))])
    assert found is not None and len(found.message) <= PROBLEM_MAX_CHARS and "the last line" in found.message


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_a_crash_loop_shows_degraded_and_ready_with_the_part_that_failed_and_clears_when_ready() -> None:
    app = parse_modelapp(body())
    first = plan_reconcile(inputs(app), NOW)
    status = first.status_update(live(first.apply[1], ready=False)).status
    settled = parse_modelapp(body(status))
    crashing = diagnose_pods(deployment(), [pod("iris-a", ended(3, "boom", restarts=3))])
    refreshed = plan_refresh(settled, status, deployment(), NOW, crashing)
    assert refreshed is not None and refreshed.update is not None
    shown = conditions(refreshed.update.status)
    assert (shown["Degraded"]["status"], shown["Degraded"]["reason"]) == ("True", Reason.IMAGE_CRASHED)
    assert (shown["Ready"]["status"], shown["Ready"]["reason"]) == ("False", Reason.IMAGE_CRASHED)
    assert shown[ConditionType.MODEL_VERIFIED]["status"] != "False"  # never blamed on the model
    assert problem_shown(refreshed.update.status)
    assert [e.reason for e in refreshed.update.events] == [Reason.IMAGE_CRASHED]  # once, not per condition
    # A Deployment event that did not look at the pods keeps what was shown; a ready rollout clears it.
    kept = plan_refresh(settled, refreshed.update.status, deployment(), NOW, None, pods_read=False)
    assert kept is not None and kept.update is not None and not kept.update.changed
    recovered = plan_refresh(settled, refreshed.update.status, deployment(ready=True), NOW)
    assert recovered is not None and recovered.update is not None
    assert conditions(recovered.update.status)["Degraded"]["status"] == "False"


def test_a_refusal_shows_in_model_verified_until_no_pod_refuses() -> None:
    app = parse_modelapp(body())
    first = plan_reconcile(inputs(app), NOW)
    status = first.status_update(live(first.apply[1], ready=False)).status
    settled = parse_modelapp(body(status))
    refusing = diagnose_pods(
        deployment(), [pod("iris-a", {"state": {"running": {}}}), pod("iris-b", ended(4, REFUSAL))]
    )
    refused = plan_refresh(settled, status, deployment(), NOW, refusing)
    assert refused is not None and refused.update is not None and refused.rollback_from is None
    verified = conditions(refused.update.status)[ConditionType.MODEL_VERIFIED]
    assert (verified["status"], verified["reason"]) == ("False", Reason.MODEL_REFUSED)
    assert "ModelCannotLoad" in verified["message"]
    recovered = plan_refresh(settled, refused.update.status, deployment(ready=True), NOW)
    assert recovered is not None and recovered.update is not None
    assert conditions(recovered.update.status)[ConditionType.MODEL_VERIFIED]["status"] == "True"


def history_with_a_ready_pair() -> dict[str, Any]:
    return {
        "history": [
            {
                "revision": 2,
                "imageDigest": IMAGE.digest,
                "modelVersion": MODEL.version,
                "outcome": Outcome.PROGRESSING,
                "startedAt": "2026-01-01T00:00:00Z",
            },
            {
                "revision": 1,
                "imageDigest": IMAGE.digest,
                "modelVersion": '"0x0"',
                "outcome": Outcome.READY,
                "startedAt": "2026-01-01T00:00:00Z",
                "modelSha256": "1" * 64,
                "imageRepository": IMAGE.repository,
                "modelUrl": MODEL.url,
                "modelFormat": MODEL.format,
            },
        ]
    }


def test_a_certain_refusal_fails_the_entry_at_once_with_its_reason_and_rolls_back() -> None:
    spec = parse_modelapp(body()).spec
    refusing = diagnose_pods(deployment(), [pod("iris-a", ended(EXIT_MODEL_REFUSED, REFUSAL))])
    history, failed_pairs, failed = judge_history(spec, history_with_a_ready_pair(), deployment(), NOW, refusing)
    assert failed is not None and failed["revision"] == 2  # long before the progress deadline
    assert history[0]["outcome"] == Outcome.FAILED and history[0]["reason"] == Reason.MODEL_REFUSED
    assert "ModelCannotLoad" in history[0]["refusal"] and history[0]["failure"] == refusing.message  # type: ignore[union-attr]
    assert failed_pairs[0]["revision"] == 2
    # A crash is not certain: the entry waits for the Deployment's deadline, then keeps the crash's reason.
    crashing = diagnose_pods(deployment(), [pod("iris-a", ended(3, "boom"))])
    _, _, not_yet = judge_history(spec, history_with_a_ready_pair(), deployment(), NOW, crashing)
    assert not_yet is None
    stalled = deployment()
    stalled["status"] = {
        "observedGeneration": 1,
        "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}],
    }
    history, _, failed = judge_history(spec, history_with_a_ready_pair(), stalled, NOW, crashing)
    assert failed is not None and history[0]["reason"] == Reason.IMAGE_CRASHED
    rolled_back = [{"revision": 3, "rollbackOf": 2, "imageDigest": IMAGE.digest, "modelVersion": '"0x0"'}, *history]
    condition = rolled_back_condition(rolled_back, 600)
    assert condition is not None and f"{Reason.IMAGE_CRASHED}: pod iris-a" in condition.message


def test_pods_are_looked_at_again_with_backoff_until_ready() -> None:
    rolling = {
        "history": [{"revision": 2, "outcome": "Progressing"}],
        "conditions": [{"type": "Ready", "status": "False"}],
    }
    assert next_recheck_delay(rolling, None) == RECHECK_FIRST_SECONDS
    assert next_recheck_delay(rolling, RECHECK_FIRST_SECONDS) == 2 * RECHECK_FIRST_SECONDS
    assert next_recheck_delay(rolling, RECHECK_MAX_SECONDS) == RECHECK_MAX_SECONDS
    steady = {"history": [{"revision": 2, "outcome": "Ready"}], "conditions": [{"type": "Ready", "status": "True"}]}
    assert next_recheck_delay(steady, 5.0) is None
    assert next_recheck_delay(None, 5.0) is None
