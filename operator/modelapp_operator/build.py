"""Pure functions: from a parsed ModelApp and what was resolved, the desired children and status.

No I/O here. Everything the operator writes to the cluster is computed by these
functions, so that unit tests can check the rendered objects byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from modelapp_operator.model import GROUP, ModelApp, ModelAppSpec

MANAGED_BY = "modelapp-operator"
FIELD_MANAGER = "modelapp-operator"
CONTAINER_NAME = "app"
CACHE_DIR = "/var/cache/modelapp"
RUN_AS_USER = 10001

ANNOTATION_IMAGE_DIGEST = f"{GROUP}/image-digest"
ANNOTATION_MODEL_VERSION = f"{GROUP}/model-version"
ANNOTATION_MODEL_SHA256 = f"{GROUP}/model-sha256"
ANNOTATION_APPLIED_HASH = f"{GROUP}/applied-hash"
# Written by request_reconcile(); any change of it makes kopf call the update handler.
ANNOTATION_RECONCILE_REQUEST = f"{GROUP}/reconcile-requested-at"

ConditionStatus = Literal["True", "False", "Unknown"]

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
IMAGE_RESOLVED = "ImageResolved"
MODEL_RESOLVED = "ModelResolved"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED, IMAGE_RESOLVED, MODEL_RESOLVED)


@dataclass(frozen=True)
class ResolvedImage:
    repository: str
    digest: str  # sha256:<64 hex>
    tag: str | None = None

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"

    @property
    def short_digest(self) -> str:
        return short_digest(self.digest)


@dataclass(frozen=True)
class ResolvedModel:
    url: str
    version: str  # the ETag exactly as the blob service returns it (quoted)
    sha256: str
    format: str
    size: int | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class Release:
    """The (image digest, model version) pair a Deployment runs."""

    image: ResolvedImage
    model: ResolvedModel


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


def short_digest(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def normalize_etag(etag: str) -> str:
    """ETags compare without their quotes and weak prefix: '"0x8D"' == '0x8D'."""
    return etag.removeprefix("W/").strip('"')


# --- which pair is deployed ---------------------------------------------------------------


def release_from_status(status: Mapping[str, Any]) -> Release | None:
    """The pair the last reconcile deployed, as recorded in status (None before the first)."""
    image = status.get("image") or {}
    model = status.get("model") or {}
    try:
        return Release(
            image=ResolvedImage(repository=image["repository"], digest=image["digest"], tag=image.get("tag")),
            model=ResolvedModel(
                url=model["url"],
                version=model["version"],
                sha256=model["sha256"],
                format=model["format"],
                size=model.get("size"),
                last_modified=model.get("lastModified"),
            ),
        )
    except (KeyError, TypeError):
        return None


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


def pinned_image(spec: ModelAppSpec, status: Mapping[str, Any]) -> ResolvedImage | None:
    """The image needing no registry call: a pinned digest, or a tag resolved before with followTag false."""
    if spec.image.digest is not None:
        return ResolvedImage(repository=spec.image.repository, digest=spec.image.digest)
    if spec.image.follows_tag:
        return None
    recorded = status.get("image") or {}
    if (
        recorded.get("repository") == spec.image.repository
        and recorded.get("tag") == spec.image.tag
        and isinstance(recorded.get("digest"), str)
    ):
        return ResolvedImage(repository=spec.image.repository, digest=recorded["digest"], tag=spec.image.tag)
    return None


# --- revision history and rollback ----------------------------------------------------------------

HISTORY_LIMIT = 10
FAILED_PAIRS_LIMIT = 10

OUTCOME_PROGRESSING = "Progressing"
OUTCOME_READY = "Ready"
OUTCOME_FAILED = "Failed"
OUTCOME_SUPERSEDED = "Superseded"

REASON_ROLLED_BACK = "RolledBack"
REASON_DEADLINE = "ProgressDeadlineExceeded"

Pair = tuple[str, str]  # (image digest, model version without quotes)


def pair_of(image_digest: str, model_version: str) -> Pair:
    return image_digest, normalize_etag(model_version)


def release_pair(release: Release) -> Pair:
    return pair_of(release.image.digest, release.model.version)


def entry_pair(entry: Mapping[str, Any]) -> Pair:
    return pair_of(str(entry.get("imageDigest") or ""), str(entry.get("modelVersion") or ""))


def describe_pair(image_digest: str, model_version: str) -> str:
    return f"image {short_digest(image_digest)} model {model_version}"


def _describe_entry(entry: Mapping[str, Any]) -> str:
    pair = describe_pair(str(entry.get("imageDigest") or "?"), str(entry.get("modelVersion") or "?"))
    return f"revision {entry.get('revision')} ({pair})"


def _stamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def history_of(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """status.history as a list of fresh dicts (entries that are not objects are dropped)."""
    return [dict(entry) for entry in status.get("history") or [] if isinstance(entry, Mapping)]


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
        ),
    )


def last_ready_release(spec: ModelAppSpec, status: Mapping[str, Any]) -> Release | None:
    """The newest pair in history that was Ready and has not failed since."""
    for entry in history_of(status):
        if entry.get("outcome") == OUTCOME_READY and not is_failed_pair(status, entry_pair(entry)):
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
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Mapping[str, Any] | None]:
    """Settle the newest history entry from what the live Deployment says about it.

    Only the Deployment's own verdict on the entry's pair counts: its pod template runs
    that pair and its controller has observed the template (a Deployment status from
    before our last apply says nothing about it). Returns the history, the failed
    pairs, and the entry to roll back from when the rollout failed and
    spec.rollout.autoRollback asks for a rollback that is possible."""
    history = history_of(status)
    failed_pairs = failed_pairs_of(status)
    if not history or history[0].get("outcome") not in (OUTCOME_PROGRESSING, OUTCOME_FAILED):
        return history, failed_pairs, None
    head = history[0]
    state = rollout_state(deployment, spec.replicas)
    if state is None or deployed_pair(deployment) != entry_pair(head):
        return history, failed_pairs, None
    if state.complete:
        # A Failed entry that is still deployed (no rollback) may recover on its own.
        head.update(outcome=OUTCOME_READY, finishedAt=_stamp(now), reason="RolloutComplete")
        return history, failed_pairs, None
    if not state.deadline_exceeded or head.get("outcome") != OUTCOME_PROGRESSING:
        return history, failed_pairs, None
    head.update(outcome=OUTCOME_FAILED, finishedAt=_stamp(now), reason=REASON_DEADLINE)
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
        "failedAt": _stamp(now),
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
    head = entries[0] if entries else None
    if head is not None and entry_pair(head) == release_pair(release):
        return entries
    if rollback_of is not None:
        reason = REASON_ROLLED_BACK
    elif head is None:
        reason = "Initial"
    else:
        image_moved = head.get("imageDigest") != release.image.digest
        model_moved = normalize_etag(str(head.get("modelVersion") or "")) != normalize_etag(release.model.version)
        reason = {(True, True): "ImageAndModelChanged", (True, False): "ImageChanged"}.get(
            (image_moved, model_moved), "ModelChanged"
        )
    revision = max((int(e.get("revision") or 0) for e in entries), default=0) + 1
    if head is not None and head.get("outcome") == OUTCOME_PROGRESSING:
        head.update(outcome=OUTCOME_SUPERSEDED, finishedAt=_stamp(now), reason=f"SupersededByRevision{revision}")
    entry: dict[str, Any] = {
        "revision": revision,
        "imageDigest": release.image.digest,
        "modelVersion": release.model.version,
        "modelSha256": release.model.sha256,
        "startedAt": _stamp(now),
        # finishedAt is left out until the outcome is known: a merge patch would drop a null anyway.
        "outcome": OUTCOME_PROGRESSING,
        "reason": reason,
        "imageRepository": release.image.repository,
        "modelUrl": release.model.url,
        "modelFormat": release.model.format,
    }
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
) -> RolloutPlan:
    """Judge the running rollout, choose the pair to run, and record it in the history."""
    history, failed_pairs, failed = judge_history(spec, status, deployment, now)
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
            message = (
                f"rollout of {what} was not ready within {progress_deadline_seconds}s ({REASON_DEADLINE}); "
                f"rolled back to {_describe_entry(entry)}. The failed pair is not tried again until the "
                "image digest or the model version changes."
            )
            return Condition(DEGRADED, "True", REASON_ROLLED_BACK, message)
        if entry.get("outcome") == OUTCOME_READY:
            return None
    return None


# --- children -------------------------------------------------------------------------------


def selector_labels(app: ModelApp) -> dict[str, str]:
    return {"app.kubernetes.io/name": "modelapp", "app.kubernetes.io/instance": app.name}


def child_labels(app: ModelApp) -> dict[str, str]:
    return {**selector_labels(app), "app.kubernetes.io/managed-by": MANAGED_BY}


def container_env(app: ModelApp, release: Release) -> list[dict[str, Any]]:
    """The contract env vars (see docs/modelapp-spec.md), then the user's own."""
    spec = app.spec
    env: list[dict[str, Any]] = [
        {"name": "MODELAPP_MODEL_URL", "value": release.model.url},
        {"name": "MODELAPP_MODEL_ETAG", "value": release.model.version},
        {"name": "MODELAPP_MODEL_SHA256", "value": release.model.sha256},
        {"name": "MODELAPP_MODEL_FORMAT", "value": release.model.format},
        {"name": "MODELAPP_MODEL_CACHE_DIR", "value": CACHE_DIR},
        {"name": "MODELAPP_PORT", "value": str(spec.port)},
    ]
    if release.model.format == "pickle" and spec.model.allow_pickle:
        env.append({"name": "MODELAPP_ALLOW_PICKLE", "value": "true"})
    credentials = spec.model.credentials
    if credentials.secret_ref is not None:
        env.append(
            {
                "name": "MODELAPP_MODEL_CONNECTION_STRING",
                "valueFrom": {"secretKeyRef": {"name": credentials.secret_ref.name, "key": credentials.secret_ref.key}},
            }
        )
    if credentials.client_id is not None:
        env.append({"name": "AZURE_CLIENT_ID", "value": credentials.client_id})
    env.extend({"name": item.name, "value": item.value} for item in spec.env)
    return env


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_template(app: ModelApp, release: Release) -> dict[str, Any]:
    """The pod template. Only the release and the spec's pod-level fields go in: never the
    ModelApp's own labels or annotations, so editing those rolls nothing."""
    spec = app.spec
    labels = selector_labels(app)
    credentials = spec.model.credentials
    if credentials.service_account_name is not None:
        labels["azure.workload.identity/use"] = "true"
    resources: dict[str, Any] = {"requests": spec.resources.requests.as_dict()}
    if spec.resources.limits is not None and spec.resources.limits.as_dict():
        resources["limits"] = spec.resources.limits.as_dict()
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER_NAME,
                "image": release.image.reference,
                "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
                "env": container_env(app, release),
                "resources": resources,
                "readinessProbe": {
                    "httpGet": {"path": "/readyz", "port": "http"},
                    "periodSeconds": 5,
                    "timeoutSeconds": 2,
                    "failureThreshold": 3,
                },
                "livenessProbe": {
                    "httpGet": {"path": "/healthz", "port": "http"},
                    "periodSeconds": 10,
                    "timeoutSeconds": 2,
                    "failureThreshold": 3,
                },
                "securityContext": container_security_context(),
                "volumeMounts": [
                    {"name": "model-cache", "mountPath": CACHE_DIR},
                    {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a mount point, not a temp file
                ],
            }
        ],
        "volumes": [{"name": "model-cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
    }
    if credentials.service_account_name is not None:
        pod_spec["serviceAccountName"] = credentials.service_account_name
        # Workload identity projects its own token; the API token is still not needed.
    if spec.image.pull_secret_name is not None:
        pod_spec["imagePullSecrets"] = [{"name": spec.image.pull_secret_name}]
    return {
        "metadata": {
            "labels": labels,
            "annotations": {
                ANNOTATION_IMAGE_DIGEST: release.image.digest,
                ANNOTATION_MODEL_VERSION: release.model.version,
                ANNOTATION_MODEL_SHA256: release.model.sha256,
            },
        },
        "spec": pod_spec,
    }


def _with_applied_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """Stamp the object with a hash of itself, so reconcile can skip applying an unchanged object."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    obj["metadata"].setdefault("annotations", {})[ANNOTATION_APPLIED_HASH] = digest[:20]
    return obj


def applied_hash(obj: Mapping[str, Any]) -> str | None:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_APPLIED_HASH)
    return value if isinstance(value, str) else None


def build_deployment(app: ModelApp, release: Release) -> dict[str, Any]:
    spec = app.spec
    return _with_applied_hash(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": app.name,
                "namespace": app.namespace,
                "labels": child_labels(app),
                "ownerReferences": [app.owner_reference()],
            },
            "spec": {
                "replicas": spec.replicas,
                "revisionHistoryLimit": 10,
                "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
                "selector": {"matchLabels": selector_labels(app)},
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {
                        "maxSurge": spec.rollout.max_surge,
                        "maxUnavailable": spec.rollout.max_unavailable,
                    },
                },
                "template": pod_template(app, release),
            },
        }
    )


def build_service(app: ModelApp) -> dict[str, Any]:
    spec = app.spec
    return _with_applied_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": app.name,
                "namespace": app.namespace,
                "labels": child_labels(app),
                "ownerReferences": [app.owner_reference()],
            },
            "spec": {
                "type": spec.service.type,
                "selector": selector_labels(app),
                "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
            },
        }
    )


def needs_apply(existing: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether desired must be applied over existing: it changed since we last applied it, or the
    fields that define the running pair or the scale were edited by someone else (kubectl edit/scale)."""
    if existing is None or applied_hash(existing) != applied_hash(desired):
        return True

    def watched(obj: Mapping[str, Any]) -> tuple[Any, ...]:
        spec = obj.get("spec") or {}
        template = spec.get("template") or {}
        containers = (template.get("spec") or {}).get("containers") or [{}]
        annotations = (template.get("metadata") or {}).get("annotations") or {}
        return (
            spec.get("replicas"),
            containers[0].get("image"),
            tuple(sorted((k, v) for k, v in annotations.items() if k.startswith(f"{GROUP}/"))),
            spec.get("type"),
            tuple((p.get("port"), p.get("targetPort")) for p in spec.get("ports") or []),
        )

    return watched(existing) != watched(desired)


def is_owned_by(obj: Mapping[str, Any], app: ModelApp) -> bool:
    """True when obj's controller reference is this ModelApp (by uid): only then may we change it."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("uid") == app.metadata.uid:
            return True
    return False


def template_release_changed(existing: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether applying desired over existing starts a rollout of a new image/model pair."""
    if existing is None:
        return True

    def key(obj: Mapping[str, Any]) -> tuple[Any, ...]:
        annotations = (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations") or {}
        return tuple(
            annotations.get(k) for k in (ANNOTATION_IMAGE_DIGEST, ANNOTATION_MODEL_VERSION, ANNOTATION_MODEL_SHA256)
        )

    return key(existing) != key(desired)


# --- status -----------------------------------------------------------------------------------


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
    progressing = conditions.get("Progressing") or {}
    deadline_exceeded = progressing.get("reason") == "ProgressDeadlineExceeded"
    failure = conditions.get("ReplicaFailure") or {}
    replica_failure = (
        (str(failure.get("message") or "") or "ReplicaFailure") if failure.get("status") == "True" else None
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


def derive_conditions(obs: Observation) -> list[Condition]:
    """Ready, Progressing and Degraded from what was observed; then the two resolution conditions."""
    resolution_failures = [c for c in (obs.image, obs.model) if c.status == "False"]
    rollout = obs.rollout
    if obs.blocked is not None:
        ready = Condition(READY, "False", obs.blocked.reason, obs.blocked.message)
        progressing = Condition(PROGRESSING, "False", obs.blocked.reason, obs.blocked.message)
        degraded = Condition(DEGRADED, "True", obs.blocked.reason, obs.blocked.message)
    elif obs.release is None or rollout is None:
        failure = resolution_failures[0] if resolution_failures else None
        reason = failure.reason if failure else "Pending"
        message = failure.message if failure else "waiting for the image and the model to resolve"
        ready = Condition(READY, "False", reason, message)
        progressing = Condition(PROGRESSING, "True" if failure is None else "False", reason, message)
        degraded = Condition(DEGRADED, "True" if failure else "False", reason, message if failure else "")
    else:
        summary = (
            f"{rollout.updated_replicas} updated, {rollout.ready_replicas} ready of "
            f"{obs.desired_replicas} desired; image {obs.release.image.short_digest}, "
            f"model {obs.release.model.version}"
        )
        if rollout.complete:
            ready = Condition(READY, "True", "Available", summary)
            progressing = Condition(PROGRESSING, "False", "RolloutComplete", summary)
        elif rollout.deadline_exceeded:
            ready = Condition(READY, "False", "ProgressDeadlineExceeded", summary)
            progressing = Condition(PROGRESSING, "False", "ProgressDeadlineExceeded", summary)
        elif rollout.replica_failure is not None:
            ready = Condition(READY, "False", "ReplicaFailure", rollout.replica_failure)
            progressing = Condition(PROGRESSING, "True", "RollingOut", summary)
        else:
            ready = Condition(READY, "False", "RollingOut", summary)
            progressing = Condition(PROGRESSING, "True", "RollingOut", summary)
        if rollout.deadline_exceeded:
            degraded = Condition(DEGRADED, "True", "ProgressDeadlineExceeded", summary)
        elif rollout.replica_failure is not None:
            degraded = Condition(DEGRADED, "True", "ReplicaFailure", rollout.replica_failure)
        elif obs.rolled_back is not None:
            degraded = obs.rolled_back
        elif resolution_failures:
            failure = resolution_failures[0]
            degraded = Condition(
                DEGRADED, "True", failure.reason, f"still running the deployed pair: {failure.message}"
            )
        else:
            degraded = Condition(DEGRADED, "False", "AsExpected", "")
    return [ready, progressing, degraded, obs.image, obs.model]


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    current: Sequence[Condition],
    generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """Render conditions; lastTransitionTime moves only when a condition's status changes."""
    by_type = {c.get("type"): c for c in previous}
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    merged: list[dict[str, Any]] = []
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
    return merged


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
    for type_ in (IMAGE_RESOLVED, MODEL_RESOLVED, DEGRADED, READY):
        old, new = condition(before, type_) or {}, condition(after, type_) or {}
        if (old.get("status"), old.get("reason")) == (new.get("status"), new.get("reason")):
            continue
        message = str(new.get("message", ""))
        failed = new.get("status") == ("True" if type_ == DEGRADED else "False")
        if type_ == DEGRADED and new.get("reason") == REASON_ROLLED_BACK:
            continue  # reconcile posts RolledBack itself, once per rollback
        if type_ == READY and new.get("status") == "True":
            events.append(Event("Normal", "Ready", message))
        elif failed and not (type_ == READY and new.get("reason") in ("RollingOut", "Pending")):
            events.append(Event("Warning", str(new.get("reason")), message))
    return events


def now_utc() -> datetime:
    return datetime.now(UTC)
