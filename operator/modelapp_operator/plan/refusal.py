"""Why the pods of a rolling-out pair refuse its model: the app's termination message.

Pure: no I/O. The app writes its refusal (sha256 mismatch, bad signature, unreadable model) to
/dev/termination-log and exits; the kubelet keeps it in the container's state. The operator looks
at pods only while a rollout is not complete (a cheap label-selector list, never in steady state),
and only at pods of the Deployment's current template (its pair's annotations).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from modelapp_operator.names import ANNOTATION_IMAGE_DIGEST, ANNOTATION_MODEL_VERSION, ConditionType, Outcome, Reason
from modelapp_operator.plan.children import CONTAINER_NAME
from modelapp_operator.plan.status import rollout_state

REFUSAL_MAX_CHARS = 512
# A pod that refuses its model changes nothing in the Deployment's status (it was never ready), so
# no Deployment event follows: a rollout still Progressing with no refusal found is looked at again,
# first after RECHECK_FIRST_SECONDS, doubling up to RECHECK_MAX_SECONDS (its deadline ends it anyway).
RECHECK_FIRST_SECONDS = 5.0
RECHECK_MAX_SECONDS = 60.0


def needs_pod_check(deployment: Mapping[str, Any] | None, desired_replicas: int) -> bool:
    """True while the Deployment's rollout is not complete (its new pods are not all Ready)."""
    state = rollout_state(deployment, desired_replicas)
    return state is not None and not state.complete


def pod_selector(deployment: Mapping[str, Any]) -> str | None:
    """The Deployment's matchLabels as a label selector (`k=v,k2=v2`); None without any."""
    labels = (((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
    if not isinstance(labels, Mapping) or not labels:
        return None
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _pair_annotations(obj: Mapping[str, Any]) -> tuple[Any, Any]:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_IMAGE_DIGEST), annotations.get(ANNOTATION_MODEL_VERSION)


def _terminated_message(status: Mapping[str, Any]) -> str | None:
    for key in ("state", "lastState"):
        terminated = (status.get(key) or {}).get("terminated") or {}
        message = str(terminated.get("message") or "").strip()
        if message:
            return message
    return None


def refusal_from_pods(deployment: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> str | None:
    """The app container's termination message in a pod of the Deployment's current pair (the first
    found, by pod name), prefixed with the pod's name; None when no such pod has one."""
    template = (deployment.get("spec") or {}).get("template") or {}
    pair = _pair_annotations(template)
    if None in pair:
        return None
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name") or "")):
        if _pair_annotations(pod) != pair:
            continue
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        for status in statuses:
            if status.get("name") != CONTAINER_NAME:
                continue
            message = _terminated_message(status)
            if message is not None:
                name = (pod.get("metadata") or {}).get("name")
                text = f"pod {name}: {' '.join(message.split())}"
                return text if len(text) <= REFUSAL_MAX_CHARS else text[: REFUSAL_MAX_CHARS - 3] + "..."
    return None


def refusal_shown(status: Mapping[str, Any] | None) -> bool:
    """Whether the status shows a pod's refusal of its model (ModelVerified=False, ModelRefused)."""
    for item in (status or {}).get("conditions") or []:
        if item.get("type") == ConditionType.MODEL_VERIFIED and item.get("reason") == Reason.MODEL_REFUSED:
            return True
    return False


def next_recheck_delay(status: Mapping[str, Any] | None, previous_delay: float | None) -> float | None:
    """After a status refresh: seconds until the pods are looked at again, or None (the newest history
    entry is not Progressing, or a refusal is already shown)."""
    if not status:
        return None
    history = status.get("history") or []
    if not history or not isinstance(history[0], Mapping) or history[0].get("outcome") != Outcome.PROGRESSING:
        return None
    if refusal_shown(status):
        return None
    if previous_delay is None:
        return RECHECK_FIRST_SECONDS
    return min(previous_delay * 2, RECHECK_MAX_SECONDS)
