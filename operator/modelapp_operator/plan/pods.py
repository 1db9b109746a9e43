"""What the pods of the wanted pair say about it: which part failed, read from their own state.

Pure: no I/O. The kubelet keeps each container's state, its last termination (exit code, reason,
termination message) and restart count; probe failures are events. From them this names the part
that failed: the model (the app's refusal, `model refused (<kind>): ...`, modelapp_contract), the
image (a non-zero exit, with the last lines of its output), memory (OOMKilled), a probe (which one,
how often), the image pull, the pod's configuration, or scheduling. Only pods of the Deployment's
current template (its pair's annotations) count, and only pods whose app container is not ready.

Pods are read only while a rollout is not complete (a label-selector list, never in steady state),
on the status refresher's rechecks and while a problem is shown. What a pod says (its termination message,
its last lines, the kubelet's messages) is redacted before it enters a PodProblem, so a secret, a token or a
SAS URL a crashing container printed never reaches status, history or events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelapp_contract.redact import redact
from modelapp_contract.termination import Refusal, parse_refusal
from modelapp_operator.names import (
    ANNOTATION_IMAGE_DIGEST,
    ANNOTATION_MODEL_VERSION,
    POD_PROBLEM_REASONS,
    ConditionType,
    Reason,
)
from modelapp_operator.plan.children import CONTAINER_NAME
from modelapp_operator.plan.status import Condition, condition, rollout_state

PROBLEM_MAX_CHARS = 1024
OUTPUT_MAX_CHARS = 300
# Pods whose events are read to tell a probe's kill from a crash: a few are enough to name the cause.
EVENT_READS_MAX = 3
# A pod problem seen by a refresh has its pods looked at again, first after RECHECK_FIRST_SECONDS,
# doubling up to RECHECK_MAX_SECONDS, while the rollout is not complete: a pod that crash-loops or
# refuses its model changes nothing in the Deployment's status, so no Deployment event would follow.
RECHECK_FIRST_SECONDS = 5.0
RECHECK_MAX_SECONDS = 60.0

_PULL_WAITING = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
_START_WAITING = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreCreateHookError"}
)
_CRASH_LOOP = "CrashLoopBackOff"
# Most telling first: when pods disagree, the one that says most about the pair is shown.
_SEVERITY = (
    Reason.MODEL_REFUSED,
    Reason.OOM_KILLED,
    Reason.IMAGE_CRASHED,
    Reason.PROBE_FAILED,
    Reason.IMAGE_PULL_FAILED,
    Reason.POD_START_FAILED,
    Reason.UNSCHEDULABLE,
)


@dataclass(frozen=True)
class PodProblem:
    """Why one pod of the pair does not serve."""

    reason: str  # one of names.POD_PROBLEM_REASONS
    message: str
    refusal: Refusal | None = None  # the app's own refusal, when the model is the part that failed
    crash_looping: bool = False

    def __post_init__(self) -> None:
        # Every message is built from what the pod said: redacted here, once, whoever built it.
        object.__setattr__(self, "message", redact(self.message))


@dataclass(frozen=True)
class PodDiagnosis:
    """The pods of the wanted pair, judged: the problem to show, and how many pods share it."""

    problem: PodProblem
    pods: int  # pods of the pair whose app container is not ready
    refused: int  # of which refused the model
    crash_looping: bool  # any of them in CrashLoopBackOff

    @property
    def certain_refusal(self) -> bool:
        """Every not-ready pod of the pair refused the model: waiting out the deadline cannot help."""
        return self.refused > 0 and self.refused == self.pods

    @property
    def message(self) -> str:
        text = self.problem.message
        if self.pods > 1:
            text = f"{text} ({self.pods} pods of this pair not ready)"
        return text if len(text) <= PROBLEM_MAX_CHARS else text[: PROBLEM_MAX_CHARS - 3] + "..."


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


def _name(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("name") or "")


def pods_of_pair(deployment: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods running the Deployment's current template's pair, by name."""
    pair = _pair_annotations((deployment.get("spec") or {}).get("template") or {})
    if None in pair:
        return []
    return sorted((pod for pod in pods if _pair_annotations(pod) == pair), key=_name)


def _app_status(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER_NAME:
            return status  # type: ignore[no-any-return]
    return None


def _last_termination(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for key in ("state", "lastState"):
        terminated = (status.get(key) or {}).get("terminated")
        if terminated:
            return terminated  # type: ignore[no-any-return]
    return None


def _output(message: str) -> str:
    """The last lines of a container's output, on one line, bounded (the tail says most); redacted before it is
    cut, so a secret cut in half is still found."""
    text = " | ".join(line.strip() for line in redact(message).strip().splitlines() if line.strip())
    return text if len(text) <= OUTPUT_MAX_CHARS else "..." + text[-(OUTPUT_MAX_CHARS - 3) :]


def _restarts(status: Mapping[str, Any], crash_looping: bool) -> str:
    count = int(status.get("restartCount") or 0)
    parts = [f"restarted {count} time{'s' if count != 1 else ''}"] if count else []
    if crash_looping:
        parts.append(_CRASH_LOOP)
    return f"; {', '.join(parts)}" if parts else ""


@dataclass(frozen=True)
class ProbeFailures:
    """What a pod's events say about its probes: failures per probe, and which one had it killed."""

    counts: Mapping[str, int]  # "Liveness" / "Readiness" / "Startup" -> failures reported
    last_message: Mapping[str, str]
    killed_by: str | None  # the probe whose failure made the kubelet restart the container


def probe_failures(events: Sequence[Mapping[str, Any]]) -> ProbeFailures:
    """Read the kubelet's `Unhealthy` and `Killing` events of one pod (core/v1 Events)."""
    counts: dict[str, int] = {}
    last: dict[str, str] = {}
    killed_by: str | None = None
    for event in sorted(events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or "")):
        message = str(event.get("message") or "")
        count = int(event.get("count") or ((event.get("series") or {}).get("count")) or 1)
        if event.get("reason") == "Unhealthy":
            probe = message.split(" ", 1)[0]
            if probe in ("Liveness", "Readiness", "Startup"):
                counts[probe] = counts.get(probe, 0) + count
                last[probe] = message
        elif event.get("reason") == "Killing":
            for probe in ("liveness", "startup"):
                if f"failed {probe} probe" in message:
                    killed_by = probe.capitalize()
    return ProbeFailures(counts, last, killed_by)


def needs_events(status: Mapping[str, Any]) -> bool:
    """Whether a pod's events must be read to say why its app container restarted: it ended without
    an error of its own (exit 0, or a signal's 137/143) and without a refusal, as a probe's kill does."""
    terminated = _last_termination(status)
    if terminated is None or int(status.get("restartCount") or 0) == 0:
        return False
    if terminated.get("reason") == "OOMKilled" or parse_refusal(str(terminated.get("message") or "")):
        return False
    return int(terminated.get("exitCode") or 0) in (0, 137, 143)


def pods_needing_events(deployment: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of the pair's pods (at most EVENT_READS_MAX) whose events say which probe killed them."""
    names = []
    for pod in pods_of_pair(deployment, pods):
        status = _app_status(pod)
        if status is not None and not status.get("ready") and needs_events(status):
            names.append(_name(pod))
    return names[:EVENT_READS_MAX]


def judge_pod(pod: Mapping[str, Any], events: Sequence[Mapping[str, Any]] = ()) -> PodProblem | None:
    """Why this pod's app container does not serve, or None (ready, or still starting normally)."""
    name = _name(pod)
    status = _app_status(pod)
    if status is None:
        scheduled = next(
            (c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") == "PodScheduled"), None
        )
        if scheduled is not None and scheduled.get("status") == "False":
            detail = " ".join(str(scheduled.get("message") or scheduled.get("reason") or "").split())
            return PodProblem(Reason.UNSCHEDULABLE, f"pod {name} cannot be scheduled: {detail}")
        return None
    if status.get("ready"):
        return None
    waiting = (status.get("state") or {}).get("waiting") or {}
    waiting_reason = str(waiting.get("reason") or "")
    crash_looping = waiting_reason == _CRASH_LOOP
    waiting_message = " ".join(str(waiting.get("message") or "").split())
    if waiting_reason in _PULL_WAITING:
        return PodProblem(
            Reason.IMAGE_PULL_FAILED, f"pod {name} cannot pull its image ({waiting_reason}): {waiting_message}"
        )
    if waiting_reason in _START_WAITING:
        return PodProblem(
            Reason.POD_START_FAILED,
            f"pod {name}: container {CONTAINER_NAME} cannot start ({waiting_reason}): {waiting_message}",
        )
    terminated = _last_termination(status)
    if terminated is None:
        return None  # running, or created and starting: readiness and the startup probe are timing it
    restarts = _restarts(status, crash_looping)
    exit_code = int(terminated.get("exitCode") or 0)
    message = str(terminated.get("message") or "")
    refusal = parse_refusal(message)
    if refusal is not None:
        return PodProblem(
            Reason.MODEL_REFUSED,
            f"pod {name} refused the model ({refusal.kind}): {refusal.reason} (exit code {exit_code}{restarts})",
            refusal=refusal,
            crash_looping=crash_looping,
        )
    if terminated.get("reason") == "OOMKilled":
        return PodProblem(
            Reason.OOM_KILLED,
            f"pod {name}: container {CONTAINER_NAME} was killed for using more memory than its limit "
            f"(OOMKilled, exit code {exit_code}{restarts})",
            crash_looping=crash_looping,
        )
    probes = probe_failures(events)
    if probes.killed_by is not None and needs_events(status):
        probe = probes.killed_by
        return PodProblem(
            Reason.PROBE_FAILED,
            f"pod {name}: the kubelet restarted container {CONTAINER_NAME} after its {probe.lower()} probe failed "
            f"{probes.counts.get(probe, 0)} times ({probes.last_message.get(probe, 'no message')}){restarts}",
            crash_looping=crash_looping,
        )
    output = _output(message)
    return PodProblem(
        Reason.IMAGE_CRASHED,
        f"pod {name}: container {CONTAINER_NAME} exited with code {exit_code}"
        f"{f': {output}' if output else ''}{restarts}",
        crash_looping=crash_looping,
    )


def diagnose_pods(
    deployment: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    events: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> PodDiagnosis | None:
    """The problem of the Deployment's current pair's pods, or None when none of them shows one.
    events: the core/v1 Events of the pods `pods_needing_events` named, by pod name."""
    problems: list[PodProblem] = []
    not_ready = 0
    for pod in pods_of_pair(deployment, pods):
        status = _app_status(pod)
        if status is not None and status.get("ready"):
            continue
        not_ready += 1
        problem = judge_pod(pod, (events or {}).get(_name(pod), ()))
        if problem is not None:
            problems.append(problem)
    if not problems:
        return None
    shown = min(problems, key=lambda p: _SEVERITY.index(p.reason))
    return PodDiagnosis(
        problem=shown,
        pods=not_ready,
        refused=sum(1 for p in problems if p.refusal is not None),
        crash_looping=any(p.crash_looping for p in problems),
    )


def shown_problem(status: Mapping[str, Any] | None) -> Condition | None:
    """The problem read from the pods that the status shows (Degraded=True with a pod problem's reason)."""
    degraded = condition(status or {}, ConditionType.DEGRADED) or {}
    if degraded.get("status") != "True" or degraded.get("reason") not in POD_PROBLEM_REASONS:
        return None
    return Condition(ConditionType.DEGRADED, "True", str(degraded["reason"]), str(degraded.get("message") or ""))


def problem_shown(status: Mapping[str, Any] | None) -> bool:
    """Whether the status shows a problem read from the pods."""
    return shown_problem(status) is not None


def next_recheck_delay(
    status: Mapping[str, Any] | None, previous_delay: float | None, *, failed: bool = False
) -> float | None:
    """After a status refresh: seconds until the pods are looked at again, or None (Ready, or nothing
    rolled out yet). failed: the refresh itself failed (the API server away): try again with the same
    backoff, or a rollout that completes meanwhile waits for a Deployment event that may have been
    missed while the watch reconnected."""
    if not failed:
        if not status or not status.get("history"):
            return None
        ready = condition(status, ConditionType.READY) or {}
        if ready.get("status") == "True":
            return None
    if previous_delay is None:
        return RECHECK_FIRST_SECONDS
    return min(previous_delay * 2, RECHECK_MAX_SECONDS)
