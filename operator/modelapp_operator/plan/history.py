"""Revision history and automatic rollback: which pair runs, and what status.history records.

Pure: no I/O. Each reconcile judges the newest history entry from the live Deployment and its
pods (Ready; or Failed after missing its progress deadline, or at once when every new pod refused
the model), chooses the pair to run (never a pair in status.failedPairs) and records a new entry
when the pair changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from modelapp_contract.blob import PinnedVersion, normalize_etag
from modelapp_operator.api.modelapp_types import ModelAppSpec
from modelapp_operator.names import ANNOTATION_IMAGE_DIGEST, ANNOTATION_MODEL_VERSION, ConditionType, Outcome, Reason
from modelapp_operator.plan.pods import PodDiagnosis
from modelapp_operator.plan.release import (
    Pair,
    Release,
    ResolvedImage,
    ResolvedModel,
    describe_pair,
    entry_pair,
    pair_of,
    pin_fields,
    pin_from,
    release_from_status,
    release_pair,
)
from modelapp_operator.plan.status import Condition, rollout_state, timestamp

HISTORY_LIMIT = 10
FAILED_PAIRS_LIMIT = 10


def _describe_entry(entry: Mapping[str, Any]) -> str:
    pair = describe_pair(str(entry.get("imageDigest") or "?"), str(entry.get("modelVersion") or "?"))
    return f"revision {entry.get('revision')} ({pair})"


def history_of(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """status.history as a list of fresh dicts (entries that are not objects are dropped)."""
    return [dict(entry) for entry in status.get("history") or [] if isinstance(entry, Mapping)]


def _deployed_head(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest entry the stable Deployment ran: a gate's rejected candidate never did."""
    return next((entry for entry in history if entry.get("outcome") != Outcome.REJECTED), None)


def record_rejection(
    history: Sequence[Mapping[str, Any]], rejected: Mapping[str, Any], started_at: str
) -> list[dict[str, Any]]:
    """A history entry for a candidate the release gate kept out (plan/gate.py), newest first."""
    entries = [dict(entry) for entry in history]
    revision = max((int(e.get("revision") or 0) for e in entries), default=0) + 1
    entry = {
        "revision": revision,
        "imageDigest": rejected["imageDigest"],
        "modelVersion": rejected["modelVersion"],
        "startedAt": started_at or rejected["failedAt"],
        "finishedAt": rejected["failedAt"],
        "outcome": Outcome.REJECTED,
        "reason": Reason.GATE_REJECTED,
        "failure": rejected["message"],
    }
    return [entry, *entries][:HISTORY_LIMIT]


def failed_pairs_of(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(item) for item in status.get("failedPairs") or [] if isinstance(item, Mapping)]


def is_failed_pair(status: Mapping[str, Any], pair: Pair) -> bool:
    return any(entry_pair(item) == pair for item in failed_pairs_of(status))


def _release_from_entry(spec: ModelAppSpec, entry: Mapping[str, Any]) -> Release | None:
    """The Release a history entry recorded; None for an entry without what the pod template needs."""
    repository = entry.get("imageRepository") or spec.image.repository
    fields = (entry.get("imageDigest"), entry.get("modelVersion"), entry.get("modelSha256"), entry.get("modelUrl"))
    if not all(isinstance(value, str) and value for value in fields) or not entry.get("modelFormat"):
        return None
    tag = spec.image.tag if repository == spec.image.repository else None
    return Release(
        image=ResolvedImage(repository=str(repository), digest=str(entry["imageDigest"]), tag=tag),
        model=ResolvedModel(
            url=str(entry["modelUrl"]),
            version=str(entry["modelVersion"]),
            sha256=str(entry["modelSha256"]),
            format=str(entry["modelFormat"]),
            pin=pin_from(entry, "model"),
            verified_by=str(entry.get("modelVerifiedBy") or "metadata"),
            signer=entry.get("modelSigner"),
        ),
    )


def last_ready_release(spec: ModelAppSpec, status: Mapping[str, Any]) -> Release | None:
    """The newest pair in history that was Ready and has not failed since."""
    for entry in history_of(status):
        if entry.get("outcome") == Outcome.READY and not is_failed_pair(status, entry_pair(entry)):
            release = _release_from_entry(spec, entry)
            if release is not None:
                return release
    return None


def deployed_pair(deployment: Mapping[str, Any] | None) -> Pair | None:
    """The pair the Deployment's pod template runs, from the annotations the operator renders."""
    if deployment is None:
        return None
    template = (deployment.get("spec") or {}).get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    digest, version = annotations.get(ANNOTATION_IMAGE_DIGEST), annotations.get(ANNOTATION_MODEL_VERSION)
    if not isinstance(digest, str) or not isinstance(version, str):
        return None
    return pair_of(digest, version)


def choose_release(
    spec: ModelAppSpec,
    image: ResolvedImage | None,
    model: ResolvedModel | None,
    status: Mapping[str, Any],
) -> Release | None:
    """Decide which (image, model) pair the Deployment should run.

    The one place this decision is made: the resolved pair when both sides
    resolved; otherwise the pair already deployed (a registry or blob outage never
    rolls anything), or nothing before the first successful resolution. A pair in
    status.failedPairs (rolled back after missing its progress deadline) is never
    chosen again: the newest pair that was Ready keeps running until the image
    digest or the model version changes again.
    """
    if image is not None and model is not None:
        candidate: Release | None = Release(image=image, model=model)
    else:
        candidate = release_from_status(status)
    if candidate is None or not is_failed_pair(status, release_pair(candidate)):
        return candidate
    return last_ready_release(spec, status) or release_from_status(status)


@dataclass(frozen=True)
class Rollback:
    """A rollout that missed its deadline, and the Ready pair that replaces it."""

    failed: Mapping[str, Any]  # the history entry, now outcome Failed
    restored: Release


@dataclass(frozen=True)
class RolloutPlan:
    """The pure decision of one reconcile: what to run and the history that results."""

    release: Release | None
    history: list[dict[str, Any]]
    failed_pairs: list[dict[str, Any]]
    rollback: Rollback | None = None


def judge_history(
    spec: ModelAppSpec,
    status: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    now: datetime,
    pods: PodDiagnosis | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Mapping[str, Any] | None]:
    """Settle the newest history entry from what the live Deployment says about it.

    Only the Deployment's own verdict on the entry's pair counts: its pod template runs
    that pair and its controller has observed the template (a Deployment status from
    before our last apply says nothing about it). Returns the history, the failed
    pairs, and the entry to roll back from when the rollout failed and
    spec.rollout.autoRollback asks for a rollback that is possible.

    pods: what the pods of that pair show (plan/pods.py). A failed entry takes its reason and
    message; a certain refusal (every new pod refused the model) fails the entry at once instead
    of at the progress deadline."""
    history = history_of(status)
    failed_pairs = failed_pairs_of(status)
    head = _deployed_head(history)
    if head is None or head.get("outcome") not in (Outcome.PROGRESSING, Outcome.FAILED):
        return history, failed_pairs, None
    state = rollout_state(deployment, spec.replicas)
    if state is None or deployed_pair(deployment) != entry_pair(head):
        return history, failed_pairs, None
    if state.complete:
        # A Failed entry that is still deployed (no rollback) may recover on its own.
        head.update(outcome=Outcome.READY, finishedAt=timestamp(now), reason=Reason.ROLLOUT_COMPLETE)
        return history, failed_pairs, None
    certain = pods is not None and pods.certain_refusal
    if not (state.deadline_exceeded or certain) or head.get("outcome") != Outcome.PROGRESSING:
        return history, failed_pairs, None
    head.update(outcome=Outcome.FAILED, finishedAt=timestamp(now), reason=Reason.PROGRESS_DEADLINE_EXCEEDED)
    if pods is not None:
        head.update(reason=pods.problem.reason, failure=pods.message)
        if pods.problem.refusal is not None:
            head["refusal"] = pods.problem.message
    if not spec.rollout.auto_rollback or head.get("rollbackOf") is not None:
        # Never roll back from a rollback: that would walk back through history on a cluster problem.
        return history, failed_pairs, None
    with_failed = [_failed_pair(head, now), *failed_pairs][:FAILED_PAIRS_LIMIT]
    if last_ready_release(spec, {"history": history, "failedPairs": with_failed}) is None:
        return history, failed_pairs, None  # nothing Ready to go back to: it keeps running, Degraded
    return history, with_failed, head


def _failed_pair(entry: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    return {
        "imageDigest": entry.get("imageDigest"),
        "modelVersion": entry.get("modelVersion"),
        "revision": entry.get("revision"),
        "failedAt": timestamp(now),
    }


def record_release(
    history: Sequence[Mapping[str, Any]],
    release: Release | None,
    now: datetime,
    *,
    rollback_of: int | None = None,
) -> list[dict[str, Any]]:
    """Add a history entry when `release` is a pair other than the newest entry's."""
    entries = [dict(entry) for entry in history]
    if release is None:
        return entries
    head = _deployed_head(entries)
    if head is not None and entry_pair(head) == release_pair(release):
        return entries
    if rollback_of is not None:
        reason = Reason.ROLLED_BACK
    elif head is None:
        reason = Reason.INITIAL
    else:
        image_moved = head.get("imageDigest") != release.image.digest
        model_moved = normalize_etag(str(head.get("modelVersion") or "")) != normalize_etag(release.model.version)
        reason = {(True, True): Reason.IMAGE_AND_MODEL_CHANGED, (True, False): Reason.IMAGE_CHANGED}.get(
            (image_moved, model_moved), Reason.MODEL_CHANGED
        )
    revision = max((int(e.get("revision") or 0) for e in entries), default=0) + 1
    if head is not None and head.get("outcome") == Outcome.PROGRESSING:
        head.update(
            outcome=Outcome.SUPERSEDED, finishedAt=timestamp(now), reason=f"{Reason.SUPERSEDED_BY_REVISION}{revision}"
        )
    entry: dict[str, Any] = {
        "revision": revision,
        "imageDigest": release.image.digest,
        "modelVersion": release.model.version,
        "modelSha256": release.model.sha256,
        "startedAt": timestamp(now),
        # finishedAt is left out until the outcome is known: a merge patch would drop a null anyway.
        "outcome": Outcome.PROGRESSING,
        "reason": reason,
        "imageRepository": release.image.repository,
        "modelUrl": release.model.url,
        "modelFormat": release.model.format,
        **{f"model{k[0].upper()}{k[1:]}": v for k, v in pin_fields(release.model).items()},
        "modelVerifiedBy": release.model.verified_by,
    }
    if release.model.signer:
        entry["modelSigner"] = release.model.signer
    if rollback_of is not None:
        entry["rollbackOf"] = rollback_of
    return [entry, *entries][:HISTORY_LIMIT]


def plan_rollout(
    spec: ModelAppSpec,
    image: ResolvedImage | None,
    model: ResolvedModel | None,
    status: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    now: datetime,
    pods: PodDiagnosis | None = None,
) -> RolloutPlan:
    """Judge the running rollout, choose the pair to run, and record it in the history."""
    history, failed_pairs, failed = judge_history(spec, status, deployment, now, pods)
    judged = {**status, "history": history, "failedPairs": failed_pairs}
    release = choose_release(spec, image, model, judged)
    rollback: Rollback | None = None
    if failed is not None and release is not None and release_pair(release) != entry_pair(failed):
        rollback = Rollback(failed=failed, restored=release)
    history = record_release(
        history, release, now, rollback_of=int(failed["revision"]) if rollback is not None and failed else None
    )
    return RolloutPlan(
        release=release, history=history, failed_pairs=failed_pairs[:FAILED_PAIRS_LIMIT], rollback=rollback
    )


def rolled_back_condition(history: Sequence[Mapping[str, Any]], progress_deadline_seconds: int) -> Condition | None:
    """Degraded=True RolledBack while the newest rollback has not been followed by another Ready pair."""
    by_revision = {entry.get("revision"): entry for entry in history}
    for entry in history:
        rollback_of = entry.get("rollbackOf")
        if rollback_of is not None:
            failed = by_revision.get(rollback_of)
            what = _describe_entry(failed) if failed is not None else f"revision {rollback_of}"
            reason = (failed or {}).get("reason") or Reason.PROGRESS_DEADLINE_EXCEEDED
            if reason == Reason.PROGRESS_DEADLINE_EXCEEDED:
                why = f"was not ready within {progress_deadline_seconds}s ({reason})"
            else:
                why = f"failed ({reason}: {(failed or {}).get('failure') or (failed or {}).get('refusal') or ''})"
            message = (
                f"rollout of {what} {why}; rolled back to {_describe_entry(entry)}. The failed pair is not "
                "tried again until the image digest or the model version changes."
            )
            return Condition(ConditionType.DEGRADED, "True", Reason.ROLLED_BACK, message)
        if entry.get("outcome") == Outcome.READY:
            return None
    return None


def known_pin(status: Mapping[str, Any], url: str, version: str) -> PinnedVersion | None:
    """The pin status already records for model `version` of the blob at `url` (status.model, then
    history, newest first): a reconcile reuses it instead of taking another snapshot."""
    wanted = normalize_etag(version)
    model = status.get("model") or {}
    candidates: list[tuple[Mapping[str, Any], str]] = [(model, "")] if isinstance(model, Mapping) else []
    candidates += [(entry, "model") for entry in _pinned_records(status)]
    for record, prefix in candidates:
        record_url = record.get("url" if not prefix else "modelUrl")
        record_version = record.get("version" if not prefix else "modelVersion")
        if record_url == url and normalize_etag(str(record_version or "")) == wanted:
            pin = pin_from(record, prefix)
            if pin.pinned:
                return pin
    return None


def kept_snapshots(status: Mapping[str, Any]) -> set[str]:
    """The snapshots status still names (status.model and history): everything else the operator took goes."""
    model = status.get("model") or {}
    kept = {pin_from(model).snapshot} if isinstance(model, Mapping) else set()
    kept |= {pin_from(entry, "model").snapshot for entry in _pinned_records(status)}
    return {snapshot for snapshot in kept if snapshot}


def snapshot_urls(status: Mapping[str, Any]) -> set[str]:
    """The model blob URLs status records a snapshot of (status.model and history)."""
    model = status.get("model") or {}
    urls = {str(model.get("url"))} if isinstance(model, Mapping) and pin_from(model).snapshot else set()
    urls |= {
        str(e.get("modelUrl")) for e in _pinned_records(status) if pin_from(e, "model").snapshot and e.get("modelUrl")
    }
    return urls


def _pinned_records(status: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """History entries, and the release gate's candidate (it runs a pinned version before it has an entry),
    each with modelUrl, modelVersion and the model-prefixed pin fields."""
    candidate = (status.get("gate") or {}).get("candidate")
    return [*history_of(status), *([candidate] if isinstance(candidate, Mapping) else [])]
