"""The release gate's decisions (spec.release.strategy Gated, issue 20): which pair each Deployment runs,
which one the Service sends users to, and the gate's status. Pure: figures in, decision out.

A new pair W (image digest, model version) that differs from the stable pair S runs as a *candidate*
beside it (Deployment `<name>-candidate`, Service `<name>-candidate`); users keep being answered by S
only. Its checks (plan/release_gate.py: the test set, shadow agreement, health) are judged on every
tick. Pass: the user-facing Service's selector switches to the candidate's pods in one step; after
`drainSeconds` the stable Deployment is rolled to W while it serves nothing, and once it is Ready on W
the selector switches back (both sides now answer with W) and the candidate is scaled to zero. Fail,
time-out or `modelapp abort`: the candidate is scaled to zero, S is untouched, and W is recorded as a
failed pair (reason GateRejected) that is not tried again until the pair or the spec (its generation)
changes.

Why the stable Deployment is rolled to W rather than the Service staying on the candidate: the stable
Deployment keeps its name, history, scale subresource, autoscaler and rollback as for a Rolling
release, so the gate adds two states instead of a second set of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from modelapp_operator.api.modelapp_types import ModelApp
from modelapp_operator.api.release_spec import ReleaseSpec
from modelapp_operator.names import ANNOTATION_GATE_ACTION, ANNOTATION_GATE_ACTION_BY, Reason
from modelapp_operator.plan.history import deployed_pair
from modelapp_operator.plan.release import Pair, Release, describe_pair, entry_pair, pin_fields, release_pair
from modelapp_operator.plan.release_gate import (
    AgreementThreshold,
    CheckResult,
    CheckState,
    HealthThreshold,
    ShadowFigures,
    judge_agreement,
    judge_health,
    overall,
)
from modelapp_operator.plan.status import Event, parse_timestamp, rollout_state, timestamp

# While a gate decides, its ModelApp is reconciled this often (the figures are read each time).
GATE_TICK_SECONDS = 2.0
# Shadow counts are judged from this long after the candidate is Ready: more than twice the app's shadow
# time-out (MODELAPP_SHADOW_TIMEOUT_SECONDS, 2 s), so requests sent to its starting pods are not counted.
SETTLE_SECONDS = 5.0


class GatePhase(StrEnum):
    TESTING = "Testing"  # the candidate runs beside the stable pair; its checks are being judged
    AWAITING_PROMOTION = "AwaitingPromotion"  # checks passed, promotion Manual: waits for `modelapp promote`
    PROMOTING = "Promoting"  # users are answered by the candidate; the stable Deployment follows it
    PROMOTED = "Promoted"
    REJECTED = "Rejected"


DECIDING = (GatePhase.TESTING, GatePhase.AWAITING_PROMOTION)

Serve = Literal["stable", "candidate"]


@dataclass(frozen=True)
class GateAction:
    """A person's override, from the ModelApp's annotations (`modelapp promote|abort` writes them)."""

    action: Literal["promote", "abort"]
    pair: str  # the candidate it is meant for ("<digest>/<version>"): an action for an older one is ignored
    by: str


@dataclass(frozen=True)
class GateFigures:
    """What the reconcile read this tick (clients/app_metrics.py, clients/candidate.py)."""

    shadow: ShadowFigures | None = None  # summed over the stable pods; None: not read
    test_set: CheckResult | None = None  # the test set's verdict, once it ran against the ready candidate


@dataclass(frozen=True)
class GateInputs:
    release_spec: ReleaseSpec
    generation: int
    wanted: Release | None  # the pair the spec resolves to (plan/history.choose_release)
    stable: Release | None  # the pair the stable Deployment runs (None: none yet, nothing to gate against)
    stable_deployment: Mapping[str, Any] | None
    candidate_deployment: Mapping[str, Any] | None
    replicas: int
    previous: Mapping[str, Any]  # status.gate as read ({}: none)
    figures: GateFigures = field(default_factory=GateFigures)
    action: GateAction | None = None


@dataclass(frozen=True)
class GateDecision:
    stable_release: Release | None  # what the stable Deployment runs
    candidate_release: Release | None = None  # None: no candidate (an existing one is deleted)
    serve: Serve = "stable"  # whose pods the user-facing Service selects
    status: dict[str, Any] | None = None  # status.gate (None: leave it out)
    events: tuple[Event, ...] = ()
    rejected: dict[str, Any] | None = None  # a failedPairs entry for the rejected candidate
    recheck_after: float | None = None  # reconcile again after this many seconds
    result: str | None = None  # passed, rejected, aborted, overridden (promoted by hand): counted once, when decided


def pair_label(pair: Pair) -> str:
    """How the app's ModelApp-Pair header and its shadow metrics name a pair: "<digest>/<version>"."""
    return f"{pair[0]}/{pair[1]}"


def plan_gate(inputs: GateInputs, now: datetime) -> GateDecision:
    """Decide the gate's step for this reconcile (see the module's docstring)."""
    spec, wanted, stable = inputs.release_spec, inputs.wanted, inputs.stable
    previous = dict(inputs.previous)
    if not spec.gated or stable is None or wanted is None:
        # Rolling, or nothing running yet to gate against: the wanted pair goes straight to the stable Deployment.
        return GateDecision(stable_release=wanted, status=previous or None)
    candidate_of_previous = _gate_pair(previous)
    if release_pair(wanted) == release_pair(stable):
        return _settle(inputs, previous, candidate_of_previous, now)
    if candidate_of_previous != release_pair(wanted) or previous.get("phase") not in (*DECIDING, GatePhase.PROMOTING):
        return _start(inputs, wanted, stable, previous, now)
    phase = previous.get("phase")
    if phase == GatePhase.PROMOTING:
        return _promoting(inputs, wanted, stable, previous, now)
    return _decide(inputs, wanted, stable, previous, now)


def _gate_pair(gate: Mapping[str, Any]) -> Pair | None:
    candidate = gate.get("candidate")
    return entry_pair(candidate) if isinstance(candidate, Mapping) else None


def _candidate_record(release: Release) -> dict[str, Any]:
    """The candidate pair, with the immutable model version it runs: the next reconcile pins the same one
    (plan/history.known_pin) instead of taking another snapshot, which would roll the candidate's pods."""
    pins = {f"model{k[0].upper()}{k[1:]}": v for k, v in pin_fields(release.model).items()}
    return {"imageDigest": release.image.digest, "modelVersion": release.model.version, "modelUrl": release.model.url,
            **pins}  # fmt: skip


def _settle(inputs: GateInputs, previous: dict[str, Any], gate_pair: Pair | None, now: datetime) -> GateDecision:
    """The stable Deployment runs the wanted pair. During a promotion: serve from the candidate until the
    stable Deployment is Ready on it, then switch back and let the candidate go."""
    stable = inputs.stable
    assert stable is not None
    if previous.get("phase") != GatePhase.PROMOTING or gate_pair != release_pair(stable):
        # A rejected candidate's verdict stays shown until the next gate; a deciding one was replaced by
        # a change back to the stable pair.
        if previous.get("phase") in DECIDING:
            previous.update(phase=GatePhase.REJECTED, message="replaced: the wanted pair is the stable one again")
            previous["finishedAt"] = timestamp(now)
        return GateDecision(stable_release=stable, status=previous or None)
    state = rollout_state(inputs.stable_deployment, inputs.replicas)
    if state is None or not state.complete:
        waiting = "the stable Deployment is rolling to the promoted pair; users are answered by the candidate"
        previous["message"] = waiting
        return GateDecision(
            stable_release=stable,
            candidate_release=stable,
            serve="candidate",
            status=previous,
            recheck_after=GATE_TICK_SECONDS,
        )
    previous.update(phase=GatePhase.PROMOTED, finishedAt=timestamp(now), message=previous.get("verdict", "promoted"))
    event = Event(
        "Normal", Reason.GATE_PROMOTED, f"{_describe(stable)} serves every user; the candidate is scaled to zero"
    )
    return GateDecision(stable_release=stable, status=previous, events=(event,))


def _start(
    inputs: GateInputs, wanted: Release, stable: Release, previous: Mapping[str, Any], now: datetime
) -> GateDecision:
    """A new candidate: it replaces any earlier one (its pods are re-rendered with the new pair)."""
    replaced = _gate_pair(previous)
    note = ""
    if previous.get("phase") in DECIDING and replaced is not None:
        note = f" (replaces candidate {describe_pair(*replaced)})"
    checks = [_pending(name, "waiting for the candidate to be Ready") for name in _check_names(inputs.release_spec)]
    gate = {
        "phase": GatePhase.TESTING,
        "candidate": _candidate_record(wanted),
        "startedAt": timestamp(now),
        "checks": [_check_status(c) for c in checks],
        "message": "waiting for the candidate to be Ready",
    }
    message = f"testing candidate {_describe(wanted)} beside the stable {_describe(stable)}{note}"
    return GateDecision(
        stable_release=stable,
        candidate_release=wanted,
        status=gate,
        events=(Event("Normal", Reason.GATE_STARTED, message),),
        recheck_after=GATE_TICK_SECONDS,
    )


def _decide(
    inputs: GateInputs, wanted: Release, stable: Release, previous: dict[str, Any], now: datetime
) -> GateDecision:
    """Testing or AwaitingPromotion: judge the checks, apply a person's action, reject or promote."""
    spec = inputs.release_spec
    action = (
        inputs.action if inputs.action is not None and inputs.action.pair == pair_label(release_pair(wanted)) else None
    )
    if action is not None and action.action == "abort":
        return _reject(inputs, wanted, stable, previous, now, f"aborted by {action.by}", "aborted", by=action.by)
    if previous.get("phase") == GatePhase.AWAITING_PROMOTION:
        if action is not None:
            return _promote(inputs, wanted, stable, previous, now, by=action.by)
        return GateDecision(stable_release=stable, candidate_release=wanted, status=previous)
    shadow = inputs.figures.shadow
    ready = candidate_ready(inputs.candidate_deployment, inputs.replicas, previous)
    if shadow is not None and ready:
        # Counted from SETTLE_SECONDS after the whole candidate is Ready: shadowed requests sent while its pods
        # were starting time out up to the stable pods' shadow time-out later, and are not its verdict.
        since = parse_timestamp(str(previous.get("baselineAt") or ""))
        if since is None or (now - since).total_seconds() < SETTLE_SECONDS:
            previous["baseline"] = shadow.record()
            previous.setdefault("baselineAt", timestamp(now))
    checks = judge_checks(inputs, previous, ready)
    elapsed = (now - (parse_timestamp(str(previous.get("startedAt") or "")) or now)).total_seconds()
    verdict = overall(checks, elapsed, spec.timeout_seconds)
    previous.update(checks=[_check_status(c) for c in checks], message=verdict.message)
    if action is not None:  # promote: a person takes the decision over the checks
        previous["verdict"] = verdict.message
        return _promote(inputs, wanted, stable, previous, now, by=action.by)
    if verdict.state is CheckState.FAILED:
        return _reject(inputs, wanted, stable, previous, now, verdict.message, "rejected")
    if verdict.state is CheckState.PENDING:
        return GateDecision(
            stable_release=stable,
            candidate_release=wanted,
            status=previous,
            recheck_after=GATE_TICK_SECONDS,
        )
    previous["verdict"] = verdict.message
    if spec.promotion == "Manual":
        previous.update(phase=GatePhase.AWAITING_PROMOTION, message=f"checks passed ({verdict.message}); waiting for "
                        "`modelapp promote`")  # fmt: skip
        event = Event("Normal", Reason.GATE_PASSED, f"candidate {_describe(wanted)} passed: {verdict.message}; "
                      "waiting for `modelapp promote`")  # fmt: skip
        return GateDecision(
            stable_release=stable, candidate_release=wanted, status=previous, events=(event,), result="passed"
        )
    return _promote(inputs, wanted, stable, previous, now, by=None)


def _promote(
    inputs: GateInputs, wanted: Release, stable: Release, previous: dict[str, Any], now: datetime, *, by: str | None
) -> GateDecision:
    previous.update(phase=GatePhase.PROMOTING, switchedAt=timestamp(now))
    if by is not None:
        previous["decidedBy"] = by
    why = f"promoted by {by}" if by is not None else f"passed: {previous.get('verdict', '')}"
    previous["message"] = f"{why}; users are answered by the candidate"
    event = Event("Normal", Reason.GATE_PASSED, f"candidate {_describe(wanted)} {why}; the Service now selects it")
    result = "overridden" if by is not None else "passed"
    return dataclasses.replace(_promoting(inputs, wanted, stable, previous, now), events=(event,), result=result)


def _promoting(
    inputs: GateInputs, wanted: Release, stable: Release, previous: dict[str, Any], now: datetime
) -> GateDecision:
    """Switched: the old stable pods finish what they were sent for `drainSeconds`, then the stable
    Deployment rolls to the promoted pair (the candidate answers meanwhile)."""
    switched = parse_timestamp(str(previous.get("switchedAt") or "")) or now
    remaining = inputs.release_spec.drain_seconds - (now - switched).total_seconds()
    if remaining > 0:
        return GateDecision(
            stable_release=stable,
            candidate_release=wanted,
            serve="candidate",
            status=previous,
            recheck_after=min(remaining, 30.0),
        )
    return GateDecision(
        stable_release=wanted,
        candidate_release=wanted,
        serve="candidate",
        status=previous,
        recheck_after=GATE_TICK_SECONDS,
    )


def _reject(
    inputs: GateInputs,
    wanted: Release,
    stable: Release,
    previous: dict[str, Any],
    now: datetime,
    why: str,
    result: str,
    *,
    by: str | None = None,
) -> GateDecision:
    previous.update(phase=GatePhase.REJECTED, finishedAt=timestamp(now), message=why)
    if by is not None:
        previous["decidedBy"] = by
    rejected = {
        "imageDigest": wanted.image.digest,
        "modelVersion": wanted.model.version,
        "failedAt": timestamp(now),
        "reason": Reason.GATE_REJECTED,
        "message": why,
        "generation": inputs.generation,
    }
    message = f"candidate {_describe(wanted)} rejected: {why}; {_describe(stable)} keeps serving"
    return GateDecision(
        stable_release=stable,
        status=previous,
        events=(Event("Warning", Reason.GATE_REJECTED, message),),
        rejected=rejected,
        result=result,
    )


def judge_checks(inputs: GateInputs, previous: Mapping[str, Any], ready: bool) -> list[CheckResult]:
    """The spec's checks on this tick's figures; a test set decided on an earlier tick keeps its verdict.
    ready: the candidate runs its pair, scaled up and rolled out (candidate_ready)."""
    spec, figures = inputs.release_spec, inputs.figures
    checks: list[CheckResult] = []
    if spec.test_set is not None:
        decided = _recorded_check(previous, "testSet")
        if decided is not None and decided.state is not CheckState.PENDING:
            checks.append(decided)
        elif figures.test_set is not None:
            checks.append(figures.test_set)
        else:
            checks.append(_pending("testSet", "runs once the candidate is Ready" if not ready else "running"))
    baseline = previous.get("baseline")
    shadow = figures.shadow.since(baseline) if ready and figures.shadow and isinstance(baseline, Mapping) else None
    if spec.shadow is not None:
        if shadow is None:
            checks.append(_pending("shadow", "waiting for the candidate to be Ready"))
        else:
            threshold = AgreementThreshold(spec.shadow.min_agreement, spec.shadow.min_samples, spec.shadow.tolerance)
            checks.append(judge_agreement(shadow.agreed, shadow.compared, threshold))
    if spec.health is not None:
        if shadow is None:
            checks.append(_pending("health", "waiting for the candidate to be Ready"))
        else:
            limits = HealthThreshold(
                spec.health.max_error_rate, float(spec.health.max_p99_milliseconds), spec.health.min_requests
            )
            checks.append(judge_health(shadow.requests, shadow.errors + shadow.timeouts, shadow.p99_ms, limits))
    return checks


def candidate_ready(deployment: Mapping[str, Any] | None, replicas: int, gate: Mapping[str, Any]) -> bool:
    """Whether the candidate Deployment runs the gate's candidate pair, scaled up, its rollout complete. A copy
    read before the apply that started this candidate (the previous candidate's, or one scaled to zero) is not:
    on real pods such a copy let the test set run while only the rejected candidate's terminating pods
    answered on the Service (kube-proxy serves terminating endpoints when no other is ready)."""
    if deployment is None or deployed_pair(deployment) != _gate_pair(gate):
        return False
    if not int(((deployment.get("spec") or {}).get("replicas")) or 0):
        return False
    state = rollout_state(deployment, max(replicas, 1))
    return state is not None and state.complete


def wants_figures(release_spec: ReleaseSpec, gate: Mapping[str, Any]) -> tuple[bool, bool]:
    """(read the stable pods' shadow figures, run the test set) on this reconcile: only while a gate tests,
    and the test set only until it has a verdict."""
    if not release_spec.gated or gate.get("phase") != GatePhase.TESTING:
        return False, False
    test_set = release_spec.test_set is not None
    decided = _recorded_check(gate, "testSet")
    run_test_set = test_set and (decided is None or decided.state is CheckState.PENDING)
    return release_spec.shadow is not None, run_test_set


def gate_candidate(gate: Mapping[str, Any]) -> str | None:
    """The candidate the gate tests, as the app's shadow metrics label it; None: no gate testing."""
    pair = _gate_pair(gate)
    return pair_label(pair) if pair is not None and gate.get("phase") == GatePhase.TESTING else None


def _recorded_check(gate: Mapping[str, Any], name: str) -> CheckResult | None:
    for check in gate.get("checks") or []:
        if isinstance(check, Mapping) and check.get("name") == name:
            try:
                state = CheckState(str(check.get("state")))
            except ValueError:
                return None
            return CheckResult(name, state, str(check.get("message") or ""))
    return None


def _pending(name: str, message: str) -> CheckResult:
    return CheckResult(name, CheckState.PENDING, message)


def _check_status(check: CheckResult) -> dict[str, Any]:
    return {"name": check.name, "state": str(check.state), "message": check.message}


def _check_names(spec: ReleaseSpec) -> Sequence[str]:
    return [name for name, on in (("testSet", spec.test_set), ("shadow", spec.shadow), ("health", spec.health)) if on]


def _describe(release: Release) -> str:
    return describe_pair(release.image.digest, release.model.version)


def current_gate_rejections(failed_pairs: Sequence[Mapping[str, Any]], generation: int) -> list[dict[str, Any]]:
    """failedPairs without the gate's rejections made for an older spec: a changed spec tries a rejected
    pair again (a rollout's own failures stay until the pair changes)."""
    return [
        dict(item)
        for item in failed_pairs
        if item.get("reason") != Reason.GATE_REJECTED or int(item.get("generation") or 0) >= generation
    ]


def progress_text(gate: Mapping[str, Any]) -> str:
    checks = [c for c in gate.get("checks") or [] if isinstance(c, Mapping)]
    passed = sum(1 for c in checks if c.get("state") == CheckState.PASSED)
    return f"{passed}/{len(checks)} checks" if checks else ""


def reads_gate(app: ModelApp) -> bool:
    """Whether a reconcile reads the gate's candidate children: a Gated release, or one that was (its
    candidate goes)."""
    return app.spec.release.gated or bool(app.status.get("gate"))


def gate_action(app: ModelApp) -> GateAction | None:
    """A person's `modelapp promote|abort` from the ModelApp's annotations ("<action> <digest>/<version>")."""
    annotations = app.metadata.annotations or {}
    words = str(annotations.get(ANNOTATION_GATE_ACTION) or "").split()
    if len(words) != 2 or words[0] not in ("promote", "abort"):
        return None
    by = str(annotations.get(ANNOTATION_GATE_ACTION_BY) or "unknown")
    return GateAction("promote" if words[0] == "promote" else "abort", words[1], by)
