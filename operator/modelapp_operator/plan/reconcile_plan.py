"""The pure core of one reconcile: from what was read, the objects to apply, the events to post, the status.

reconcile/reconciler.py reads (the ModelApp, what its image and model resolve to, its children),
calls `plan_reconcile` or `plan_refresh`, then only applies, posts and writes what the plan says.
No I/O here, so every decision is unit-tested without a client.

One input comes back from the I/O step: applying a Deployment changes what its status says
(a new generation its controller has not observed yet), so `ReconcilePlan.status_update` takes
the API server's answer to the apply and derives the rollout part of the status from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from modelapp_operator.api.modelapp_types import ModelApp
from modelapp_operator.names import BLOCKING_REASONS, ConditionType, Reason
from modelapp_operator.plan.autoscaling import HPA_KIND, plan_autoscaler, scale_selector
from modelapp_operator.plan.children import (
    build_candidate_service,
    build_deployment,
    build_service,
    candidate_name,
    is_owned_by,
    needs_apply,
    rendered_shadow_url,
    shadow_url,
    template_release_changed,
)
from modelapp_operator.plan.gate import (
    GateAction,
    GateDecision,
    GateFigures,
    GateInputs,
    current_gate_rejections,
    plan_gate,
)
from modelapp_operator.plan.gate import progress_text as gate_progress
from modelapp_operator.plan.history import (
    choose_release,
    deployed_pair,
    judge_history,
    plan_rollout,
    record_rejection,
    rolled_back_condition,
)
from modelapp_operator.plan.pods import PodDiagnosis, shown_problem
from modelapp_operator.plan.release import (
    Release,
    ResolvedImage,
    ResolvedModel,
    describe_pair,
    release_from_status,
    release_pair,
)
from modelapp_operator.plan.status import (
    Condition,
    Event,
    Observation,
    ScaleStatus,
    build_status,
    condition,
    rollout_state,
    transition_events,
    verified_condition,
)

BLOCKED_RETRY_SECONDS = 60.0
# A new Gated ModelApp's stable Deployment waits one reconcile for its candidate Service's address.
FIRST_ADDRESS_SECONDS = 0.5


@dataclass(frozen=True)
class Resolution:
    """How resolving one side (image or model) went: its condition, and when to retry a failure."""

    condition: Condition
    retry_after: float | None = None


@dataclass(frozen=True)
class ReconcileInputs:
    """What the read step found for a ModelApp whose spec parsed."""

    app: ModelApp
    image: ResolvedImage | None
    image_resolution: Resolution
    model: ResolvedModel | None
    model_resolution: Resolution
    deployment: Mapping[str, Any] | None  # the child Deployment as read (None: absent)
    service: Mapping[str, Any] | None
    # What the pods of the Deployment's current pair show (read while its rollout is not complete).
    pods: PodDiagnosis | None = None
    # The HorizontalPodAutoscaler as read (None: absent, or not read: plan/autoscaling.reads_autoscaler).
    autoscaler: Mapping[str, Any] | None = None
    # The release gate's candidate Deployment and Service as read, this tick's figures, a person's override.
    candidate_deployment: Mapping[str, Any] | None = None
    candidate_service: Mapping[str, Any] | None = None
    gate_figures: GateFigures = field(default_factory=GateFigures)
    gate_action: GateAction | None = None


@dataclass(frozen=True)
class Failure:
    """Why the reconcile did not finish, raised after the status says so; retry_after None: permanent."""

    reason: str
    message: str
    retry_after: float | None


@dataclass(frozen=True)
class StatusUpdate:
    status: dict[str, Any]
    changed: bool  # False: nothing to write
    events: tuple[Event, ...]  # posted after the write: transitions into failure, and Ready


@dataclass(frozen=True)
class ReconcilePlan:
    previous: Mapping[str, Any]  # the status as read
    observation: Observation  # its rollout from the Deployment as read
    now: datetime
    apply: tuple[dict[str, Any], ...] = ()  # in order: Service, then Deployment, then the HPA
    delete_autoscaler: bool = False  # the HPA is no longer wanted (spec.autoscaling removed): delete it
    events: tuple[Event, ...] = ()  # posted once the apply succeeded
    release: Release | None = None
    rolled_back: bool = False
    failure: Failure | None = None
    replica_summary: str | None = None  # overrides status.replicaSummary (an invalid spec keeps the old one)
    gate: GateDecision | None = None  # the release gate's step (its status replaces status.gate)

    @property
    def applied_kinds(self) -> tuple[str, ...]:
        return tuple(str(obj["kind"]) for obj in self.apply)

    def status_update(self, applied_deployment: Mapping[str, Any] | None = None) -> StatusUpdate:
        """The status to write; applied_deployment: the API server's answer to applying the Deployment."""
        obs = self.observation
        if applied_deployment is not None:
            obs = dataclasses.replace(obs, rollout=rollout_state(applied_deployment, obs.desired_replicas))
        gate = (self.gate.status or {}) if self.gate is not None else None  # {}: no gate to show
        return _status_update(self.previous, obs, self.now, self.replica_summary, gate)


def _status_update(
    previous: Mapping[str, Any],
    obs: Observation,
    now: datetime,
    replica_summary: str | None = None,
    gate: Mapping[str, Any] | None = None,
) -> StatusUpdate:
    status = build_status(previous, obs, now)
    if replica_summary is not None:
        status["replicaSummary"] = replica_summary
    # gate None: not decided here (a status refresh from a Deployment event): status.gate stays as it is.
    if gate:
        status["gate"] = {**gate, "progress": gate_progress(gate)}
    elif gate is not None:
        status.pop("gate", None)
    changed = dict(previous) != status
    return StatusUpdate(status, changed, tuple(transition_events(previous, status)) if changed else ())


def plan_invalid_spec(body: Mapping[str, Any], error: str, now: datetime) -> ReconcilePlan:
    """A spec that does not parse: say so in the status and stop until the spec changes."""
    previous: Mapping[str, Any] = body.get("status") or {}
    unknown = "not resolved: the spec is invalid"
    obs = Observation(
        generation=int((body.get("metadata") or {}).get("generation") or 0),
        desired_replicas=0,
        image=Condition(ConditionType.IMAGE_RESOLVED, "Unknown", Reason.INVALID_SPEC, unknown),
        model=Condition(ConditionType.MODEL_RESOLVED, "Unknown", Reason.INVALID_SPEC, unknown),
        release=release_from_status(previous),
        rollout=None,
        blocked=Condition(ConditionType.READY, "False", Reason.INVALID_SPEC, error),
    )
    return ReconcilePlan(
        previous=previous,
        observation=obs,
        now=now,
        failure=Failure(Reason.INVALID_SPEC, error, None),
        replica_summary=previous.get("replicaSummary", "0/0"),
    )


def name_conflict(inputs: ReconcileInputs) -> Condition | None:
    """Ready=False NameConflict when a child's name is taken by an object this ModelApp does not own."""
    app = inputs.app
    blocked: Condition | None = None
    for kind, name, existing in (
        ("Deployment", app.name, inputs.deployment),
        ("Service", app.name, inputs.service),
        (HPA_KIND, app.name, inputs.autoscaler),
        ("Deployment", candidate_name(app), inputs.candidate_deployment),
        ("Service", candidate_name(app), inputs.candidate_service),
    ):
        if existing is not None and not is_owned_by(existing, app):
            blocked = Condition(
                ConditionType.READY,
                "False",
                Reason.NAME_CONFLICT,
                f"{kind} {app.namespace}/{name} exists and is not owned by this ModelApp: "
                "the operator leaves it alone; rename the ModelApp or delete that object",
            )
    return blocked


def plan_reconcile(inputs: ReconcileInputs, now: datetime) -> ReconcilePlan:
    """Choose the pair, render the children that differ, the events of a rollout, and the status."""
    app = inputs.app
    blocked = name_conflict(inputs)
    deployment = inputs.deployment if blocked is None else None
    # The pods were read from the Deployment as read: they speak of the pair it runs. A rollback away
    # from that pair records what they showed on the failed history entry (plan_rollout).
    pods = inputs.pods
    # The release gate decides what the stable Deployment runs (a Rolling release: the wanted pair).
    generation = app.metadata.generation
    status_in = {**app.status, "failedPairs": current_gate_rejections(app.status.get("failedPairs") or [], generation)}
    gated = app.spec.release.gated and blocked is None
    gate = plan_gate(
        GateInputs(
            release_spec=app.spec.release,
            generation=generation,
            wanted=choose_release(app.spec, inputs.image, inputs.model, status_in),
            stable=release_from_status(app.status) if gated and deployment is not None else None,
            stable_deployment=deployment,
            candidate_deployment=inputs.candidate_deployment,
            replicas=app.spec.replicas,
            previous=app.status.get("gate") or {},
            figures=inputs.gate_figures,
            action=inputs.gate_action,
        ),
        now,
    )
    image, model = inputs.image, inputs.model
    if gated and gate.stable_release is not None:
        image, model = gate.stable_release.image, gate.stable_release.model
    if gate.rejected is not None:
        status_in["failedPairs"] = [gate.rejected, *status_in["failedPairs"]]
    rollout = plan_rollout(app.spec, image, model, status_in, deployment, now, pods)
    if gate.rejected is not None and gate.status is not None:
        rollout = dataclasses.replace(
            rollout, history=record_rejection(rollout.history, gate.rejected, str(gate.status.get("startedAt") or ""))
        )
    release = rollout.release
    if release is None or deployed_pair(inputs.deployment) != release_pair(release):
        pods = None
    apply: list[dict[str, Any]] = []
    events: list[Event] = [*gate.events] if blocked is None else []
    if blocked is None:
        desired_service = build_service(app, serve_candidate=gate.serve == "candidate")
        if needs_apply(inputs.service, desired_service):
            apply.append(desired_service)
        if gated:
            # Kept for the ModelApp's life (its address is the stable pods' shadow target); it goes with the
            # ModelApp (owner reference).
            desired_candidate_service = build_candidate_service(app)
            if needs_apply(inputs.candidate_service, desired_candidate_service):
                apply.append(desired_candidate_service)
        # No candidate wanted: an existing candidate Deployment is scaled to zero, not deleted, so the operator
        # needs no right to delete Deployments (its children go with the ModelApp, by owner reference).
        candidate_release = gate.candidate_release or (release if inputs.candidate_deployment is not None else None)
        if candidate_release is not None:
            desired_candidate = build_deployment(
                app, candidate_release, candidate=True, idle=gate.candidate_release is None
            )
            if needs_apply(inputs.candidate_deployment, desired_candidate):
                apply.append(desired_candidate)
        url = shadow_url(inputs.candidate_service) if gated else None
        defer = gated and app.spec.release.shadow is not None and url is None and inputs.deployment is None
        if defer:
            # A new Gated ModelApp: its stable pods are created once the candidate Service has an address to
            # shadow to (this reconcile creates the Service), rather than rolled again to add it.
            gate = dataclasses.replace(gate, recheck_after=FIRST_ADDRESS_SECONDS)
        if release is not None and not defer:
            desired = build_deployment(app, release, shadow_url=url)
            if needs_apply(inputs.deployment, desired):
                apply.append(desired)
                if rollout.rollback is not None:
                    events.append(_rollback_event(app, rollout.rollback.failed, release))
                if template_release_changed(inputs.deployment, desired):
                    events.append(
                        _rollout_started_event(inputs.deployment is None, rollout.rollback is not None, release)
                    )
    autoscaler = plan_autoscaler(app, inputs.autoscaler if blocked is None else None)
    if blocked is None and autoscaler.apply is not None:
        apply.append(autoscaler.apply)
    obs = Observation(
        generation=app.metadata.generation,
        desired_replicas=app.spec.replicas,
        image=inputs.image_resolution.condition,
        model=inputs.model_resolution.condition,
        release=release,
        rollout=rollout_state(deployment, app.spec.replicas),
        blocked=blocked,
        history=rollout.history if blocked is None else None,
        failed_pairs=rollout.failed_pairs if blocked is None else None,
        rolled_back=rolled_back_condition(rollout.history, app.spec.rollout.progress_deadline_seconds),
        verified=verified_condition(release, inputs.model_resolution.condition, _refusal(pods)),
        pod_problem=_problem_condition(pods),
        scale=ScaleStatus(scale_selector(app), autoscaler.name) if blocked is None else None,
    )
    return ReconcilePlan(
        previous=app.status,
        observation=obs,
        now=now,
        apply=tuple(apply),
        delete_autoscaler=blocked is None and autoscaler.delete,
        events=tuple(events),
        release=release,
        rolled_back=rollout.rollback is not None,
        failure=_failure(blocked, inputs.image_resolution, inputs.model_resolution),
        gate=gate if blocked is None else None,
    )


def _failure(blocked: Condition | None, image: Resolution, model: Resolution) -> Failure | None:
    if blocked is not None:
        return Failure(blocked.reason, blocked.message, BLOCKED_RETRY_SECONDS)
    delays = [r.retry_after for r in (image, model) if r.retry_after is not None]
    if not delays:
        return None
    failed = image if image.retry_after is not None else model
    return Failure(failed.condition.reason, failed.condition.message, min(delays))


def _rollback_event(app: ModelApp, failed: Mapping[str, Any], restored: Release) -> Event:
    failed_pair = describe_pair(str(failed.get("imageDigest")), str(failed.get("modelVersion")))
    message = (
        f"revision {failed.get('revision')} ({failed_pair}, image {failed.get('imageDigest')}) was not ready within "
        f"{app.spec.rollout.progress_deadline_seconds}s; rolled back to "
        f"{describe_pair(restored.image.digest, restored.model.version)}"
    )
    return Event("Warning", Reason.ROLLED_BACK, message)


def _rollout_started_event(first: bool, rollback: bool, release: Release) -> Event:
    verb = "Deploying" if first else "Rolling back to" if rollback else "Rolling out"
    message = (
        f"{verb} image {release.image.reference} with model version "
        f"{release.model.version} (sha256 {release.model.sha256[:12]})"
    )
    return Event("Normal", Reason.ROLLOUT_STARTED, message)


# --- status refresh from a child Deployment event ---------------------------------------------------


def refresh_applies(previous: Mapping[str, Any]) -> bool:
    """Whether a Deployment event may refresh the status: not before our first reconcile, nor while
    a person must act (InvalidSpec, NameConflict)."""
    ready = condition(previous, ConditionType.READY) or {}
    return ready.get("reason") not in BLOCKING_REASONS and bool(previous.get("conditions"))


@dataclass(frozen=True)
class RefreshPlan:
    """What a Deployment event changes: the rollout part of the status, or a rollback to run."""

    rollback_from: Mapping[str, Any] | None = None  # the history entry that missed its deadline: reconcile fully
    update: StatusUpdate | None = None
    drifted: bool = False  # the Deployment was edited behind our back: request a reconcile after the write


def plan_refresh(
    app: ModelApp,
    previous: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    now: datetime,
    pods: PodDiagnosis | None = None,
    *,
    pods_read: bool = True,
) -> RefreshPlan | None:
    """The status from the live Deployment, without resolving anything; None: not ours to refresh.

    pods: what the pods of the Deployment's current pair show (plan/pods.py), named in Ready and
    Degraded (and ModelVerified=False ModelRefused for a refusal) until the rollout completes or the
    pair changes. pods_read False: the pods were not looked at this time, so a problem shown stays."""
    if deployment is not None and not is_owned_by(deployment, app):
        return None
    history, failed_pairs, failed = judge_history(app.spec, previous, deployment, now, pods)
    if failed is not None:
        return RefreshPlan(rollback_from=failed)
    obs = Observation(
        generation=int(previous.get("observedGeneration") or app.metadata.generation),
        desired_replicas=app.spec.replicas,
        image=_recorded(previous, ConditionType.IMAGE_RESOLVED),
        model=_recorded(previous, ConditionType.MODEL_RESOLVED),
        release=release_from_status(previous),
        rollout=rollout_state(deployment, app.spec.replicas),
        history=history,
        failed_pairs=failed_pairs,
        rolled_back=rolled_back_condition(history, app.spec.rollout.progress_deadline_seconds),
        verified=_refreshed_verified(previous, _refusal(pods), pods_read),
        # A refresh that did not look at the pods keeps the problem the status shows.
        pod_problem=_problem_condition(pods) if pods_read else shown_problem(previous),
    )
    reconciled = previous.get("observedGeneration") == app.metadata.generation
    release = obs.release
    drifted = (
        reconciled
        and deployment is not None
        and release is not None
        and needs_apply(deployment, build_deployment(app, release, shadow_url=rendered_shadow_url(deployment)))
    )
    return RefreshPlan(update=_status_update(previous, obs, now), drifted=drifted)


def _refusal(pods: PodDiagnosis | None) -> str | None:
    """What ModelVerified=False ModelRefused says: the pods' problem when the model is the part that failed."""
    return pods.message if pods is not None and pods.problem.refusal is not None else None


def _problem_condition(pods: PodDiagnosis | None) -> Condition | None:
    if pods is None:
        return None
    return Condition(ConditionType.DEGRADED, "True", pods.problem.reason, pods.message)


def _refreshed_verified(previous: Mapping[str, Any], refusal: str | None, pods_read: bool) -> Condition | None:
    """ModelVerified on a refresh: refused while a pod refuses; back to what the reconcile verified
    once none does; else unchanged (None)."""
    if refusal is not None:
        return Condition(ConditionType.MODEL_VERIFIED, "False", Reason.MODEL_REFUSED, refusal)
    if not pods_read or (condition(previous, ConditionType.MODEL_VERIFIED) or {}).get("reason") != Reason.MODEL_REFUSED:
        return None
    return verified_condition(release_from_status(previous), _recorded(previous, ConditionType.MODEL_RESOLVED))


def _recorded(previous: Mapping[str, Any], type_: str) -> Condition:
    """A resolution condition as the last reconcile wrote it (a refresh resolves nothing)."""
    item = condition(previous, type_) or {}
    status = item.get("status")
    return Condition(
        type_,
        status if status in ("True", "False") else "Unknown",
        str(item.get("reason") or "Unknown"),
        str(item.get("message") or ""),
    )
