"""The one reconcile: from a ModelApp body to applied children and a written status.

kopf's create/update/resume handlers call `reconcile`; the child-Deployment
watch calls `refresh_status`, which also starts an automatic rollback when a
rollout missed its progress deadline; the watch hub (poller and webhook receiver)
calls `reconcile` directly when a followed tag or blob changes. Every entry point
takes the per-object lock and reads the ModelApp again, so they never interleave.
None of these need kopf: they take a `Dependencies` and raise our own errors,
which handlers.py maps to kopf's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from modelapp_operator.blobs import (
    BlobCredential,
    ConnectionStringCredential,
    ModelResolutionError,
    ModelResolver,
    OperatorIdentityCredential,
    check_model,
)
from modelapp_operator.build import (
    ANNOTATION_RECONCILE_REQUEST,
    IMAGE_RESOLVED,
    MODEL_RESOLVED,
    READY,
    REASON_ROLLED_BACK,
    Condition,
    Observation,
    Release,
    ResolvedImage,
    ResolvedModel,
    build_deployment,
    build_service,
    build_status,
    condition,
    describe_pair,
    is_owned_by,
    judge_history,
    needs_apply,
    now_utc,
    pinned_image,
    plan_rollout,
    release_from_status,
    rolled_back_condition,
    rollout_state,
    template_release_changed,
    transition_events,
)
from modelapp_operator.kube import KubeClient
from modelapp_operator.model import API_VERSION, KIND, ModelApp, SpecError, parse_modelapp
from modelapp_operator.redact import redact
from modelapp_operator.registry import (
    ImageResolutionError,
    ImageResolver,
    RegistryCredentials,
    credentials_from_dockerconfig,
)
from modelapp_operator.watch import WatchHub, track_resolutions

_log = logging.getLogger(__name__)

# Reasons under which Ready=False means "stop: a person must act", not "in progress".
_BLOCKING_REASONS = frozenset({"InvalidSpec", "NameConflict"})


class ReconcileError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {redact(message)}")
        self.reason = reason
        self.message = redact(message)


class PermanentReconcileError(ReconcileError):
    """Retrying cannot help until the ModelApp changes (invalid spec)."""


class TemporaryReconcileError(ReconcileError):
    """A dependency is unavailable or a conflict may clear: retry after `delay` seconds."""

    def __init__(self, reason: str, message: str, *, delay: float) -> None:
        super().__init__(reason, message)
        self.delay = delay


@dataclass
class Dependencies:
    kube: KubeClient
    images: ImageResolver
    models: ModelResolver
    clock: Callable[[], datetime] = now_utc
    # The shared caches and subscriptions; images/models are then the hub's caching resolvers.
    watch: WatchHub | None = None
    # One lock per ModelApp: reconcile and refresh_status must not interleave their status writes.
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    # metadata.generation of the child Deployment as our last apply left it: a watch event
    # that shows an older generation predates that apply (a newer event follows).
    _applied_generations: dict[tuple[str, str], int] = field(default_factory=dict)
    # Bounds the reconciles and status refreshes in flight at once: a cold start of 1,000
    # ModelApps otherwise holds 1,000 sets of API responses in memory together, and the
    # API server answers no faster for being asked everything at once.
    in_flight: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(64))

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def record_applied(self, namespace: str, name: str, deployment: Mapping[str, Any]) -> None:
        generation = (deployment.get("metadata") or {}).get("generation")
        if isinstance(generation, int):
            self._applied_generations[(namespace, name)] = generation

    def predates_apply(self, namespace: str, name: str, deployment: Mapping[str, Any]) -> bool:
        """Whether this copy of the child Deployment is older than what our last apply wrote."""
        applied = self._applied_generations.get((namespace, name))
        generation = (deployment.get("metadata") or {}).get("generation")
        return applied is not None and isinstance(generation, int) and generation < applied

    def forget(self, namespace: str, name: str) -> None:
        """The ModelApp is gone: drop its per-object state."""
        self._applied_generations.pop((namespace, name), None)


@dataclass(frozen=True)
class ReconcileResult:
    status: dict[str, Any]
    release: Release | None
    applied: tuple[str, ...]  # kinds applied this time, e.g. ("Deployment",)
    found: bool = True  # False: the ModelApp no longer exists
    rolled_back: bool = False


@dataclass
class _Resolution:
    condition: Condition
    retry_after: float | None = None


# --- resolution ------------------------------------------------------------------------------


async def _resolve_image(app: ModelApp, deps: Dependencies) -> tuple[ResolvedImage | None, _Resolution]:
    spec = app.spec.image
    pinned = pinned_image(app.spec, app.status)
    if pinned is not None:
        how = "pinned digest" if spec.digest else f"tag {spec.tag} resolved before (followTag: false)"
        return pinned, _Resolution(Condition(IMAGE_RESOLVED, "True", "Pinned", f"{pinned.reference} ({how})"))
    assert spec.tag is not None  # a spec without digest has a tag (model validation)
    credentials: RegistryCredentials | None = None
    if spec.pull_secret_name is not None:
        secret = await deps.kube.read_secret(app.namespace, spec.pull_secret_name)
        if secret is None or ".dockerconfigjson" not in secret:
            what = "does not exist" if secret is None else "has no .dockerconfigjson key"
            message = f"pull Secret {spec.pull_secret_name} {what}"
            return None, _Resolution(Condition(IMAGE_RESOLVED, "False", "PullSecretNotFound", message), 60)
        try:
            credentials = credentials_from_dockerconfig(secret[".dockerconfigjson"], spec.registry_host)
        except ValueError as error:
            message = f"pull Secret {spec.pull_secret_name}: {error}"
            return None, _Resolution(Condition(IMAGE_RESOLVED, "False", "PullSecretInvalid", message), 300)
    try:
        digest = await deps.images.resolve(spec.repository, spec.tag, credentials)
    except ImageResolutionError as error:
        return None, _Resolution(Condition(IMAGE_RESOLVED, "False", error.reason, error.message), error.retry_after)
    image = ResolvedImage(repository=spec.repository, digest=digest, tag=spec.tag)
    return image, _Resolution(Condition(IMAGE_RESOLVED, "True", "Resolved", f"{spec.tag} is {digest}"))


async def _model_credential(app: ModelApp, deps: Dependencies) -> BlobCredential:
    ref = app.spec.model.credentials.secret_ref
    if ref is None:
        return OperatorIdentityCredential()
    secret = await deps.kube.read_secret(app.namespace, ref.name)
    if secret is None:
        raise ModelResolutionError("StorageSecretNotFound", f"Secret {ref.name} does not exist", retry_after=60)
    if ref.key not in secret:
        raise ModelResolutionError("StorageSecretNotFound", f"Secret {ref.name} has no key {ref.key}", retry_after=60)
    try:
        return ConnectionStringCredential(secret[ref.key].decode().strip())
    except UnicodeDecodeError:
        raise ModelResolutionError(
            "StorageCredentialInvalid", f"Secret {ref.name} key {ref.key} is not text", retry_after=300
        ) from None


async def _resolve_model(app: ModelApp, deps: Dependencies) -> tuple[ResolvedModel | None, _Resolution]:
    model = app.spec.model
    try:
        credential = await _model_credential(app, deps)
        properties = await deps.models.get_properties(model.blob, credential)
        resolved = check_model(model, properties)
    except ModelResolutionError as error:
        return None, _Resolution(Condition(MODEL_RESOLVED, "False", error.reason, error.message), error.retry_after)
    reason = "Pinned" if model.version is not None else "Resolved"
    message = f"{model.blob.container}/{model.blob.name} version {resolved.version} sha256 {resolved.sha256}"
    return resolved, _Resolution(Condition(MODEL_RESOLVED, "True", reason, message))


# --- events ------------------------------------------------------------------------------------


def _involved(app_body: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(app_body.get("metadata") or {})}


async def _post_transition_events(
    deps: Dependencies, body: Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any]
) -> None:
    involved = _involved(body)
    for event in transition_events(before, after):
        await deps.kube.post_event(involved, event.type, event.reason, event.message)


async def _post_rollback_event(
    deps: Dependencies, body: Mapping[str, Any], app: ModelApp, failed: Mapping[str, Any], restored: Release
) -> None:
    failed_pair = describe_pair(str(failed.get("imageDigest")), str(failed.get("modelVersion")))
    message = (
        f"revision {failed.get('revision')} ({failed_pair}, image {failed.get('imageDigest')}) was not ready within "
        f"{app.spec.rollout.progress_deadline_seconds}s; rolled back to "
        f"{describe_pair(restored.image.digest, restored.model.version)}"
    )
    _log.warning("%s/%s: %s", app.namespace, app.name, message)
    await deps.kube.post_event(_involved(body), "Warning", REASON_ROLLED_BACK, message)


# --- reconcile ---------------------------------------------------------------------------------


async def _write_status(
    deps: Dependencies, body: Mapping[str, Any], before: Mapping[str, Any], after: dict[str, Any]
) -> None:
    if dict(before) == after:
        return
    metadata = body.get("metadata") or {}
    await deps.kube.patch_modelapp_status(metadata["namespace"], metadata["name"], after)
    await _post_transition_events(deps, body, before, after)


async def reconcile(body: Mapping[str, Any], deps: Dependencies) -> ReconcileResult:
    """Resolve, render, apply what differs, write status. Idempotent; safe to call at any time.

    Only body's metadata.namespace and metadata.name are used: the ModelApp is read again
    under the per-object lock, so a poller may call reconcile({"metadata": {...}}, deps).

    Raises PermanentReconcileError for an invalid spec and TemporaryReconcileError when
    something must be retried, in both cases after the status says why."""
    metadata = body.get("metadata") or {}
    namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
    async with deps.lock(namespace, name), deps.in_flight:
        # Read it again under the lock: the caller's copy may predate our own last status write.
        current = await deps.kube.get(API_VERSION, KIND, namespace, name)
        if current is None:
            return ReconcileResult(status={}, release=None, applied=(), found=False)  # deleted meanwhile
        return await _reconcile_locked(current, deps)


async def _reconcile_locked(body: Mapping[str, Any], deps: Dependencies) -> ReconcileResult:
    previous: Mapping[str, Any] = body.get("status") or {}
    try:
        app = parse_modelapp(body)
    except SpecError as error:
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        invalid = Condition(READY, "False", "InvalidSpec", str(error))
        unknown = "not resolved: the spec is invalid"
        obs = Observation(
            generation=generation,
            desired_replicas=0,
            image=Condition(IMAGE_RESOLVED, "Unknown", "InvalidSpec", unknown),
            model=Condition(MODEL_RESOLVED, "Unknown", "InvalidSpec", unknown),
            release=release_from_status(previous),
            rollout=None,
            blocked=invalid,
        )
        status = build_status(previous, obs, deps.clock())
        status["replicaSummary"] = previous.get("replicaSummary", "0/0")
        await _write_status(deps, body, previous, status)
        raise PermanentReconcileError("InvalidSpec", str(error)) from None

    with track_resolutions(deps.watch, (app.namespace, app.name)):
        (image, image_res), (model, model_res) = await asyncio.gather(
            _resolve_image(app, deps), _resolve_model(app, deps)
        )
    applied: list[str] = []
    blocked: Condition | None = None

    existing_deployment, existing_service = await asyncio.gather(
        deps.kube.get("apps/v1", "Deployment", app.namespace, app.name),
        deps.kube.get("v1", "Service", app.namespace, app.name),
    )
    for kind, existing in (("Deployment", existing_deployment), ("Service", existing_service)):
        if existing is not None and not is_owned_by(existing, app):
            blocked = Condition(
                READY,
                "False",
                "NameConflict",
                f"{kind} {app.namespace}/{app.name} exists and is not owned by this ModelApp: "
                "the operator leaves it alone; rename the ModelApp or delete that object",
            )
    now = deps.clock()
    plan = plan_rollout(app.spec, image, model, app.status, existing_deployment if blocked is None else None, now)
    release = plan.release
    deployment = existing_deployment if blocked is None else None
    if blocked is None:
        desired_service = build_service(app)
        if needs_apply(existing_service, desired_service):
            await deps.kube.apply(desired_service)
            applied.append("Service")
        if release is not None:
            desired = build_deployment(app, release)
            if needs_apply(existing_deployment, desired):
                rolls = template_release_changed(existing_deployment, desired)
                deployment = await deps.kube.apply(desired)
                deps.record_applied(app.namespace, app.name, deployment)
                applied.append("Deployment")
                if plan.rollback is not None:
                    await _post_rollback_event(deps, body, app, plan.rollback.failed, release)
                if rolls:
                    verb = (
                        "Deploying"
                        if existing_deployment is None
                        else "Rolling back to"
                        if plan.rollback is not None
                        else "Rolling out"
                    )
                    await deps.kube.post_event(
                        _involved(body),
                        "Normal",
                        "RolloutStarted",
                        f"{verb} image {release.image.reference} with model version "
                        f"{release.model.version} (sha256 {release.model.sha256[:12]})",
                    )
                    _log.info(
                        "%s/%s: %s %s model %s",
                        app.namespace,
                        app.name,
                        verb,
                        release.image.short_digest,
                        release.model.version,
                    )

    obs = Observation(
        generation=app.metadata.generation,
        desired_replicas=app.spec.replicas,
        image=image_res.condition,
        model=model_res.condition,
        release=release,
        rollout=rollout_state(deployment, app.spec.replicas),
        blocked=blocked,
        history=plan.history if blocked is None else None,
        failed_pairs=plan.failed_pairs if blocked is None else None,
        rolled_back=rolled_back_condition(plan.history, app.spec.rollout.progress_deadline_seconds),
    )
    status = build_status(previous, obs, now)
    await _write_status(deps, body, previous, status)

    if blocked is not None:
        raise TemporaryReconcileError(blocked.reason, blocked.message, delay=60)
    delays = [r.retry_after for r in (image_res, model_res) if r.retry_after is not None]
    if delays:
        failed = image_res if image_res.retry_after is not None else model_res
        raise TemporaryReconcileError(failed.condition.reason, failed.condition.message, delay=min(delays))
    return ReconcileResult(
        status=status, release=release, applied=tuple(applied), rolled_back=plan.rollback is not None
    )


async def refresh_status(
    namespace: str, name: str, deps: Dependencies, deployment_seen: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Recompute the rollout part of the status from the live Deployment (no resolution).

    Called when a child Deployment changes, so Ready follows pods becoming ready, and
    a Deployment edited behind the operator's back is noticed. deployment_seen: the
    Deployment as the watch event delivered it, used instead of reading it again (a copy
    older than our own last apply is skipped: the event of that apply follows)."""
    if deployment_seen is not None and deps.predates_apply(namespace, name, deployment_seen):
        return None
    async with deps.lock(namespace, name), deps.in_flight:
        if deployment_seen is not None and deps.predates_apply(namespace, name, deployment_seen):
            return None  # a reconcile applied a newer template while we waited for the lock
        body = await deps.kube.get(API_VERSION, KIND, namespace, name)
        if body is None:
            return None
        try:
            app = parse_modelapp(body)
        except SpecError:
            return None  # reconcile reports it
        previous: Mapping[str, Any] = body.get("status") or {}
        ready = condition(previous, READY) or {}
        if ready.get("reason") in _BLOCKING_REASONS or not previous.get("conditions"):
            return None  # nothing rolled out by us yet, or a person must act first
        deployment = (
            deployment_seen
            if deployment_seen is not None
            else await deps.kube.get("apps/v1", "Deployment", namespace, name)
        )
        if deployment is not None and not is_owned_by(deployment, app):
            return None
        now = deps.clock()
        history, failed_pairs, failed = judge_history(app.spec, previous, deployment, now)
        if failed is not None:
            # The rollout missed its deadline and a Ready pair exists: the full reconcile rolls back.
            _log.warning(
                "%s/%s: revision %s missed its progress deadline; rolling back", namespace, name, failed["revision"]
            )
            try:
                return (await _reconcile_locked(body, deps)).status
            except ReconcileError:
                return None  # the status says why; the rollback itself was applied before

        def recorded(type_: str) -> Condition:
            item = condition(previous, type_) or {}
            status = item.get("status")
            return Condition(
                type_,
                status if status in ("True", "False") else "Unknown",
                str(item.get("reason") or "Unknown"),
                str(item.get("message") or ""),
            )

        obs = Observation(
            generation=int(previous.get("observedGeneration") or app.metadata.generation),
            desired_replicas=app.spec.replicas,
            image=recorded(IMAGE_RESOLVED),
            model=recorded(MODEL_RESOLVED),
            release=release_from_status(previous),
            rollout=rollout_state(deployment, app.spec.replicas),
            history=history,
            failed_pairs=failed_pairs,
            rolled_back=rolled_back_condition(history, app.spec.rollout.progress_deadline_seconds),
        )
        status = build_status(previous, obs, now)
        await _write_status(deps, body, previous, status)
        reconciled = previous.get("observedGeneration") == app.metadata.generation
        release = obs.release
        if (
            reconciled
            and deployment is not None
            and release is not None
            and needs_apply(deployment, build_deployment(app, release))
        ):
            # Someone scaled or edited our Deployment: the reconcile puts it back.
            _log.info("%s/%s: Deployment drifted from the ModelApp; requesting a reconcile", namespace, name)
            await request_reconcile(deps.kube, namespace, name, now=deps.clock())
        return status


async def request_reconcile(kube: KubeClient, namespace: str, name: str, *, now: datetime | None = None) -> None:
    """Ask for a reconcile of one ModelApp (e.g. its tag moved or its blob changed).

    It stamps an annotation; kopf sees the change and runs the update handler in
    its per-object queue, so requests never race with a running reconcile."""
    stamp = (now or now_utc()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    await kube.patch_modelapp_annotations(namespace, name, {ANNOTATION_RECONCILE_REQUEST: stamp})
