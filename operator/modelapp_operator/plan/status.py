"""The ModelApp's status: conditions from what one reconcile observed, the status stanza, and events.

Pure: no I/O. Ready, Progressing and Degraded are derived from the resolutions and the live
Deployment; lastTransitionTime moves only when a condition's status changes; events are
posted for transitions into failure and for Ready.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from modelapp_operator.names import (
    DEPLOYMENT_DEADLINE_EXCEEDED,
    DEPLOYMENT_PROGRESSING,
    DEPLOYMENT_REPLICA_FAILURE,
    POD_PROBLEM_REASONS,
    ConditionType,
    Reason,
)
from modelapp_operator.plan.release import Release, pin_fields

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


def timestamp(now: datetime) -> str:
    """The form of every time the operator writes into status: 2024-05-01T12:00:00Z."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str) -> datetime | None:
    """A time as `timestamp` wrote it; None for anything else."""
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RolloutState:
    """How far the Deployment is, from its own status."""

    replicas: int
    ready_replicas: int
    updated_replicas: int
    available_replicas: int
    complete: bool
    deadline_exceeded: bool
    replica_failure: str | None  # message of the ReplicaFailure condition, e.g. a pod admission error


def rollout_state(deployment: Mapping[str, Any] | None, desired_replicas: int) -> RolloutState | None:
    if deployment is None:
        return None
    metadata = deployment.get("metadata") or {}
    status = deployment.get("status") or {}
    replicas = int(status.get("replicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    observed = int(status.get("observedGeneration") or 0) >= int(metadata.get("generation") or 0)
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    progressing = conditions.get(DEPLOYMENT_PROGRESSING) or {}
    deadline_exceeded = progressing.get("reason") == DEPLOYMENT_DEADLINE_EXCEEDED
    failure = conditions.get(DEPLOYMENT_REPLICA_FAILURE) or {}
    replica_failure = (
        (str(failure.get("message") or "") or DEPLOYMENT_REPLICA_FAILURE) if failure.get("status") == "True" else None
    )
    complete = (
        observed
        and updated == desired_replicas
        and replicas == desired_replicas
        and available == desired_replicas
        and ready >= desired_replicas
    )
    return RolloutState(
        replicas=replicas,
        ready_replicas=ready,
        updated_replicas=updated,
        available_replicas=available,
        complete=complete,
        # Only a verdict on the current template counts: until the controller has observed a new
        # template, the condition still describes the previous one.
        deadline_exceeded=deadline_exceeded and observed and not complete,
        replica_failure=replica_failure,
    )


@dataclass(frozen=True)
class ScaleStatus:
    """What the scale subresource and the autoscaler need in status (a reconcile knows it; a refresh keeps it)."""

    selector: str  # status.selector: the pods' label selector (labelSelectorPath of the CRD's scale subresource)
    autoscaler: str | None = None  # status.horizontalPodAutoscaler: the HPA the operator owns (None: none)


@dataclass(frozen=True)
class Observation:
    """What one reconcile found: the input of build_status."""

    generation: int
    desired_replicas: int
    image: Condition  # ImageResolved
    model: Condition  # ModelResolved
    release: Release | None  # the pair the Deployment runs (or will, once rolled)
    rollout: RolloutState | None
    blocked: Condition | None = None  # a Ready=False reason that stops everything (InvalidSpec, NameConflict)
    # Revision history and failed pairs to write (None: keep what status has).
    history: Sequence[Mapping[str, Any]] | None = None
    failed_pairs: Sequence[Mapping[str, Any]] | None = None
    rolled_back: Condition | None = None  # Degraded=True RolledBack (see rolled_back_condition)
    verified: Condition | None = None  # ModelVerified (None: keep what status has)
    # What the pods of the wanted pair show (plan/pods.py), as a Degraded=True condition: it names the part
    # that failed in Ready and Degraded while the rollout is not complete.
    pod_problem: Condition | None = None
    scale: ScaleStatus | None = None  # None: keep what status has


def derive_conditions(obs: Observation) -> list[Condition]:
    """Ready, Progressing and Degraded from what was observed; then the two resolution conditions."""
    resolution_failures = [c for c in (obs.image, obs.model) if c.status == "False"]
    rollout = obs.rollout
    if obs.blocked is not None:
        ready = Condition(ConditionType.READY, "False", obs.blocked.reason, obs.blocked.message)
        progressing = Condition(ConditionType.PROGRESSING, "False", obs.blocked.reason, obs.blocked.message)
        degraded = Condition(ConditionType.DEGRADED, "True", obs.blocked.reason, obs.blocked.message)
    elif obs.release is None or rollout is None:
        failure = resolution_failures[0] if resolution_failures else None
        reason = failure.reason if failure else Reason.PENDING
        message = failure.message if failure else "waiting for the image and the model to resolve"
        ready = Condition(ConditionType.READY, "False", reason, message)
        progressing = Condition(ConditionType.PROGRESSING, "True" if failure is None else "False", reason, message)
        degraded = Condition(ConditionType.DEGRADED, "True" if failure else "False", reason, message if failure else "")
    else:
        summary = (
            f"{rollout.updated_replicas} updated, {rollout.ready_replicas} ready of "
            f"{obs.desired_replicas} desired; image {obs.release.image.short_digest}, "
            f"model {obs.release.model.version}"
        )
        problem = obs.pod_problem if not rollout.complete else None
        if rollout.complete:
            ready = Condition(ConditionType.READY, "True", Reason.AVAILABLE, summary)
            progressing = Condition(ConditionType.PROGRESSING, "False", Reason.ROLLOUT_COMPLETE, summary)
        elif problem is not None:
            ready = Condition(ConditionType.READY, "False", problem.reason, problem.message)
            stalled = rollout.deadline_exceeded
            progressing = Condition(
                ConditionType.PROGRESSING,
                "False" if stalled else "True",
                Reason.PROGRESS_DEADLINE_EXCEEDED if stalled else Reason.ROLLING_OUT,
                summary,
            )
        elif rollout.deadline_exceeded:
            ready = Condition(ConditionType.READY, "False", Reason.PROGRESS_DEADLINE_EXCEEDED, summary)
            progressing = Condition(ConditionType.PROGRESSING, "False", Reason.PROGRESS_DEADLINE_EXCEEDED, summary)
        elif rollout.replica_failure is not None:
            ready = Condition(ConditionType.READY, "False", Reason.REPLICA_FAILURE, rollout.replica_failure)
            progressing = Condition(ConditionType.PROGRESSING, "True", Reason.ROLLING_OUT, summary)
        else:
            ready = Condition(ConditionType.READY, "False", Reason.ROLLING_OUT, summary)
            progressing = Condition(ConditionType.PROGRESSING, "True", Reason.ROLLING_OUT, summary)
        if problem is not None:
            degraded = Condition(ConditionType.DEGRADED, "True", problem.reason, problem.message)
        elif rollout.deadline_exceeded:
            degraded = Condition(ConditionType.DEGRADED, "True", Reason.PROGRESS_DEADLINE_EXCEEDED, summary)
        elif rollout.replica_failure is not None:
            degraded = Condition(ConditionType.DEGRADED, "True", Reason.REPLICA_FAILURE, rollout.replica_failure)
        elif obs.rolled_back is not None:
            degraded = obs.rolled_back
        elif resolution_failures:
            failure = resolution_failures[0]
            degraded = Condition(
                ConditionType.DEGRADED, "True", failure.reason, f"still running the deployed pair: {failure.message}"
            )
        else:
            degraded = Condition(ConditionType.DEGRADED, "False", Reason.AS_EXPECTED, "")
    return [ready, progressing, degraded, obs.image, obs.model, *([obs.verified] if obs.verified else [])]


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    current: Sequence[Condition],
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """Render conditions; lastTransitionTime moves only when a condition's status changes."""
    by_type = {c.get("type"): c for c in previous}
    stamp = timestamp(now)
    merged: list[dict[str, Any]] = []
    current_types = {c.type for c in current}
    # Conditions this observation does not decide (ModelVerified on a refresh) are kept as they were.
    kept = [
        dict(c)
        for c in previous
        if c.get("type") == ConditionType.MODEL_VERIFIED and c.get("type") not in current_types
    ]
    for condition in current:
        before = by_type.get(condition.type) or {}
        changed = before.get("status") != condition.status or not before.get("lastTransitionTime")
        merged.append(
            {
                "type": condition.type,
                "status": condition.status,
                "reason": condition.reason,
                "message": condition.message[:4096],
                "lastTransitionTime": stamp if changed else before["lastTransitionTime"],
                "observedGeneration": generation,
            }
        )
    return merged + kept


def build_status(previous: Mapping[str, Any], obs: Observation, now: datetime) -> dict[str, Any]:
    """The full status stanza for a ModelApp. Fields not set by this observation are kept."""
    status: dict[str, Any] = {k: v for k, v in previous.items() if k not in ("conditions",)}
    status["observedGeneration"] = obs.generation
    status["conditions"] = merge_conditions(
        previous.get("conditions") or [], derive_conditions(obs), obs.generation, now
    )
    if obs.release is not None:
        image, model = obs.release.image, obs.release.model
        status["image"] = {
            k: v
            for k, v in {
                "repository": image.repository,
                "tag": image.tag,
                "digest": image.digest,
                "shortDigest": image.short_digest,
                "reference": image.reference,
            }.items()
            if v is not None
        }
        status["model"] = {
            k: v
            for k, v in {
                "url": model.url,
                "version": model.version,
                "sha256": model.sha256,
                "format": model.format,
                "size": model.size,
                "lastModified": model.last_modified,
                **pin_fields(model),
                "verifiedBy": model.verified_by,
                "signer": model.signer,
            }.items()
            if v is not None
        }
    if obs.history is not None:
        status["history"] = [dict(entry) for entry in obs.history]
    if obs.failed_pairs is not None:
        status["failedPairs"] = [dict(item) for item in obs.failed_pairs]
    rollout = obs.rollout
    ready_replicas = rollout.ready_replicas if rollout else 0
    status["replicas"] = rollout.replicas if rollout else 0
    status["readyReplicas"] = ready_replicas
    status["updatedReplicas"] = rollout.updated_replicas if rollout else 0
    status["replicaSummary"] = f"{ready_replicas}/{obs.desired_replicas}"
    if obs.scale is not None:
        status["selector"] = obs.scale.selector
        if obs.scale.autoscaler is not None:
            status["horizontalPodAutoscaler"] = obs.scale.autoscaler
        else:
            status.pop("horizontalPodAutoscaler", None)
    return status


def status_changed(previous: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return dict(previous) != dict(new)


def condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for item in status.get("conditions") or []:
        if item.get("type") == type_:
            return item  # type: ignore[no-any-return]
    return None


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def transition_events(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Event]:
    """Events for a status change: a Warning for each condition that turned into a failure (or
    failed with a new reason), a Normal `Ready` when Ready turns True. Unchanged conditions and
    the expected in-between states (Pending, RollingOut) post nothing."""
    events: list[Event] = []
    for type_ in (
        ConditionType.IMAGE_RESOLVED,
        ConditionType.MODEL_RESOLVED,
        ConditionType.MODEL_VERIFIED,
        ConditionType.DEGRADED,
        ConditionType.READY,
    ):
        old, new = condition(before, type_) or {}, condition(after, type_) or {}
        if (old.get("status"), old.get("reason")) == (new.get("status"), new.get("reason")):
            continue
        message = str(new.get("message", ""))
        failed = new.get("status") == ("True" if type_ == ConditionType.DEGRADED else "False")
        if type_ == ConditionType.DEGRADED and new.get("reason") == Reason.ROLLED_BACK:
            continue  # reconcile posts RolledBack itself, once per rollback
        if type_ == ConditionType.READY and new.get("status") == "True":
            events.append(Event("Normal", Reason.READY, message))
        elif failed and not (
            # Expected in-between states; and a pod problem is posted once, by its Degraded transition.
            type_ == ConditionType.READY
            and (new.get("reason") in (Reason.ROLLING_OUT, Reason.PENDING) or new.get("reason") in POD_PROBLEM_REASONS)
        ):
            events.append(Event("Warning", str(new.get("reason")), message))
    return events


_SIGNATURE_REASONS = frozenset(
    {Reason.SIGNATURE_MISSING, Reason.SIGNATURE_INVALID, Reason.SIGNATURE_KEY_NOT_FOUND, Reason.MODEL_CHECKSUM_MISMATCH}
)


def verified_condition(release: Release | None, model: Condition, refusal: str | None = None) -> Condition:
    """ModelVerified: how the sha256 of the model that runs was established and what it is pinned to;
    False when the resolved version failed verification (signature, checksum) or a pod refused it."""
    if model.status == "False" and model.reason in _SIGNATURE_REASONS:
        return Condition(ConditionType.MODEL_VERIFIED, "False", model.reason, model.message)
    if refusal is not None:
        return Condition(ConditionType.MODEL_VERIFIED, "False", Reason.MODEL_REFUSED, refusal)
    if release is None:
        return Condition(ConditionType.MODEL_VERIFIED, "Unknown", Reason.NOT_VERIFIED, "no model resolved yet")
    m = release.model
    where = f"pinned to {m.pin.describe()}" if m.pin.pinned else f"pinned by ETag {m.version} only (no snapshot)"
    if m.verified_by == "signature":
        reason, how = Reason.SIGNATURE_VERIFIED, f"from its signature, verified with key {m.signer}"
    elif m.verified_by == "spec":
        reason, how = Reason.SHA256_PINNED, "from spec.model.sha256"
    else:
        reason, how = Reason.SHA256_FROM_METADATA, "from the blob's own metadata (whoever can write the blob vouches)"
    message = f"sha256 {m.sha256} {how}; {where}; every pod checks the bytes against it before loading"
    return Condition(ConditionType.MODEL_VERIFIED, "True", reason, message)
