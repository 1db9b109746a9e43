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
    rolls anything), or nothing before the first successful resolution. Rollback to
    the last Ready pair (spec.rollout.autoRollback) will plug in here, reading the
    history from status.
    """
    del spec  # the spec will matter once rollback (autoRollback) is decided here
    if image is not None and model is not None:
        return Release(image=image, model=model)
    return release_from_status(status)


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
        deadline_exceeded=deadline_exceeded and not complete,
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
    """The full status stanza for a ModelApp. Fields not owned here (e.g. a future history) are kept."""
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
        if type_ == READY and new.get("status") == "True":
            events.append(Event("Normal", "Ready", message))
        elif failed and not (type_ == READY and new.get("reason") in ("RollingOut", "Pending")):
            events.append(Event("Warning", str(new.get("reason")), message))
    return events


def now_utc() -> datetime:
    return datetime.now(UTC)
