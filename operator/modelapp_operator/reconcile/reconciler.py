"""The one reconcile, as read → plan → apply → write: from a ModelApp to applied children and a status.

kopf's create/update/resume handlers call `reconcile`; the child-Deployment watch calls
`refresh_status`, which also starts an automatic rollback when a rollout missed its progress
deadline; the watch hub (poller and webhook receiver) calls `reconcile` directly when a followed
tag or blob changes. Every entry point takes the per-object lock and reads the ModelApp again,
so they never interleave. The decisions are made by plan/reconcile_plan.py; this module only
reads, applies, posts and writes. None of it needs kopf: it raises our own errors, which
handlers.py maps to kopf's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from modelapp_operator.api.modelapp_types import BlobLocation, ModelApp, SpecError, parse_modelapp
from modelapp_operator.clients.blob_storage import ModelPinner, ModelResolutionError, ModelResolver
from modelapp_operator.clients.kube import ConflictError, KubeClient, KubeError
from modelapp_operator.clients.registry import ImageResolver
from modelapp_operator.metrics import METRICS
from modelapp_operator.names import ANNOTATION_RECONCILE_REQUEST, API_VERSION, KIND
from modelapp_operator.plan.history import kept_snapshots, snapshot_urls
from modelapp_operator.plan.pods import (
    PodDiagnosis,
    diagnose_pods,
    needs_pod_check,
    pod_selector,
    pods_needing_events,
    problem_shown,
)
from modelapp_operator.plan.reconcile_plan import (
    Failure,
    ReconcileInputs,
    ReconcilePlan,
    StatusUpdate,
    plan_invalid_spec,
    plan_reconcile,
    plan_refresh,
    refresh_applies,
)
from modelapp_operator.plan.release import Release
from modelapp_operator.plan.status import Event, now_utc
from modelapp_operator.reconcile.caches import ChildCache, ModelAppCache
from modelapp_operator.reconcile.events import EventRecorder
from modelapp_operator.reconcile.resolve import model_credential, resolve_image, resolve_model
from modelapp_operator.redact import redact
from modelapp_operator.watch.hub import WatchHub
from modelapp_operator.watch.resolvers import track_resolutions
from modelapp_serving.model_blob import parse_blob_url

_log = logging.getLogger(__name__)


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
    # Immutable model versions (snapshots); None: models are pinned by ETag only.
    pins: ModelPinner | None = None
    # The watch streams' newest copies, read instead of GETs (empty: every read is a GET).
    modelapps: ModelAppCache = field(default_factory=ModelAppCache)
    children: ChildCache = field(default_factory=ChildCache)
    # Posts events in the background (None: each is posted before the reconcile goes on).
    events: EventRecorder | None = None
    # One lock per ModelApp: reconcile and refresh_status must not interleave their status writes.
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    # metadata.generation of the child Deployment as our last apply left it: a watch event
    # that shows an older generation predates that apply (a newer event follows).
    _applied_generations: dict[tuple[str, str], int] = field(default_factory=dict)
    # Bounds the reconciles in flight at once: a cold start of 1,000 ModelApps otherwise holds
    # 1,000 sets of API responses in memory together, and the API server answers no faster for
    # being asked everything at once.
    in_flight: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(64))
    # Status refreshes have their own, smaller bound: behind the reconciles' queue, a cold start of
    # 1,000 ModelApps wrote no Ready until every reconcile had run (all Ready 9.1 s after all pods
    # ready in bench/scale.py); with their own bound, 0.5 s after.
    refresh_in_flight: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(16))

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
        self.modelapps.forget((namespace, name))
        self.children.forget(namespace, name)
        METRICS.forget((namespace, name))

    async def read_modelapp(self, namespace: str, name: str, *, fresh: bool = False) -> Mapping[str, Any] | None:
        """The newest copy of the ModelApp: the watch's, or a GET when there is none or `fresh` is asked."""
        key = (namespace, name)
        cached = None if fresh else self.modelapps.get(key)
        if cached is not None:
            return cached
        body = await self.kube.get(API_VERSION, KIND, namespace, name)
        if body is None:
            self.modelapps.forget(key)
            return None
        self.modelapps.observe(key, body)
        return self.modelapps.get(key)

    async def read_child(self, api_version: str, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The child as the watch saw it, or a GET when there is no watch or it cannot be trusted.

        The watch sees only objects labelled as ours. A child it does not know is created without
        force (`_apply`): an unlabelled object of someone else's under that name makes that apply
        conflict instead of being changed, and the next read of that name GETs it (a name conflict)."""
        if self.children.enabled and self.children.trusted(kind, namespace, name):
            return self.children.get(kind, namespace, name)
        return await self.kube.get(api_version, kind, namespace, name)


@dataclass(frozen=True)
class ReconcileResult:
    status: dict[str, Any]
    release: Release | None
    applied: tuple[str, ...]  # kinds applied this time, e.g. ("Deployment",)
    found: bool = True  # False: the ModelApp no longer exists
    rolled_back: bool = False


async def reconcile(body: Mapping[str, Any], deps: Dependencies) -> ReconcileResult:
    """Resolve, render, apply what differs, write status. Idempotent; safe to call at any time.

    Only body's metadata.namespace and metadata.name are used: the ModelApp is read again
    under the per-object lock (the watch's newest copy), so a poller may call
    reconcile({"metadata": {...}}, deps).

    Raises PermanentReconcileError for an invalid spec and TemporaryReconcileError when
    something must be retried, in both cases after the status says why."""
    metadata = body.get("metadata") or {}
    namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
    with METRICS.reconcile() as tracked:
        async with deps.lock(namespace, name), deps.in_flight:
            tracked.started()
            # Read it again under the lock: the caller's copy may predate our own last status write.
            current = await deps.read_modelapp(namespace, name)
            if current is None or (current.get("metadata") or {}).get("deletionTimestamp"):
                # Deleted meanwhile, or being deleted: its children go with it (owner references).
                return ReconcileResult(status={}, release=None, applied=(), found=current is not None)
            return await _reconcile_retrying(current, deps)


# Status writes carry the resourceVersion read; a 409 means another writer (a second replica during a
# hand-over, kopf's own annotations, a person) changed the ModelApp: plan again from a fresh read.
STATUS_CONFLICT_ATTEMPTS = 5


async def _reconcile_retrying(body: Mapping[str, Any], deps: Dependencies) -> ReconcileResult:
    for attempt in range(1, STATUS_CONFLICT_ATTEMPTS + 1):
        try:
            return await _reconcile_locked(body, deps)
        except ConflictError:
            if attempt == STATUS_CONFLICT_ATTEMPTS:
                raise
            metadata = body.get("metadata") or {}
            fresh = await deps.read_modelapp(str(metadata.get("namespace")), str(metadata.get("name")), fresh=True)
            if fresh is None:
                return ReconcileResult(status={}, release=None, applied=(), found=False)
            body = fresh
    raise AssertionError("unreachable")


async def _reconcile_locked(body: Mapping[str, Any], deps: Dependencies) -> ReconcileResult:
    # Read.
    try:
        app = parse_modelapp(body)
    except SpecError as error:
        plan = plan_invalid_spec(body, str(error), deps.clock())
        await _write_status(deps, body, plan.status_update())
        assert plan.failure is not None
        raise _error(plan.failure) from None
    with track_resolutions(deps.watch, (app.namespace, app.name)):
        (image, image_resolution), (model, model_resolution) = await asyncio.gather(
            resolve_image(app, deps.kube, deps.images), resolve_model(app, deps.kube, deps.models, deps.pins)
        )
    deployment, service = await asyncio.gather(
        deps.read_child("apps/v1", "Deployment", app.namespace, app.name),
        deps.read_child("v1", "Service", app.namespace, app.name),
    )
    pods = await _pod_diagnosis(deps, app, deployment)
    # Plan.
    plan = plan_reconcile(
        ReconcileInputs(app, image, image_resolution, model, model_resolution, deployment, service, pods),
        deps.clock(),
    )
    # Apply, then write.
    absent = [kind for kind, child in (("Deployment", deployment), ("Service", service)) if child is None]
    applied_deployment = await _apply(deps, body, plan, absent)
    METRICS.rollout_applied((app.namespace, app.name), deployment, applied_deployment, rollback=plan.rolled_back)
    update = plan.status_update(applied_deployment)
    await _write_status(deps, body, update)
    await _prune_snapshots(deps, app, update.status)
    if plan.failure is not None:
        raise _error(plan.failure)
    return ReconcileResult(
        status=update.status, release=plan.release, applied=plan.applied_kinds, rolled_back=plan.rolled_back
    )


async def _pod_diagnosis(
    deps: Dependencies, app: ModelApp, deployment: Mapping[str, Any] | None
) -> PodDiagnosis | None:
    """What the pods of the Deployment's pair show; they are listed only while its rollout is not
    complete, and the events of a few restarted pods are read only when their exit alone cannot say
    why (a probe's kill). A failed read is logged and ignored (the rollout verdict does not need it)."""
    if deployment is None or not needs_pod_check(deployment, app.spec.replicas):
        return None
    selector = pod_selector(deployment)
    if selector is None:
        return None
    try:
        pods = await deps.kube.list_pods(app.namespace, selector)
        events = {
            name: await deps.kube.list_pod_events(app.namespace, name) for name in pods_needing_events(deployment, pods)
        }
    except KubeError as error:
        _log.warning("%s/%s: cannot read the pods of the rollout: %s", app.namespace, app.name, error)
        return None
    return diagnose_pods(deployment, pods, events)


async def _apply(
    deps: Dependencies, body: Mapping[str, Any], plan: ReconcilePlan, absent: Collection[str]
) -> Mapping[str, Any] | None:
    """Apply the plan's objects and post its events; returns the Deployment as the API server answered.
    absent: the kinds read as not there, created without force (never taking someone else's object)."""
    metadata = body.get("metadata") or {}
    namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
    applied_deployment: Mapping[str, Any] | None = None
    for obj in plan.apply:
        creating = obj["kind"] in absent
        try:
            answer = await deps.kube.apply(obj, force=not creating)
        except ConflictError:
            # Not ours after all (or not what the watch showed): read it before planning again.
            deps.children.distrust(obj["kind"], namespace, name)
            raise
        deps.children.applied(obj["kind"], namespace, name, answer)
        if obj["kind"] == "Deployment":
            applied_deployment = answer
            deps.record_applied(namespace, name, answer)
    for event in plan.events:
        _log.log(
            logging.WARNING if event.type == "Warning" else logging.INFO, "%s/%s: %s", namespace, name, event.message
        )
        await _post_event(deps, body, event)
    return applied_deployment


async def _prune_snapshots(deps: Dependencies, app: ModelApp, status: Mapping[str, Any]) -> None:
    """Delete the snapshots this ModelApp took that its status no longer names (history is bounded at
    HISTORY_LIMIT): after the status naming the new set is written, and only when that set dropped one.

    A set that only grew (a first rollout, a new pair while history is below its limit) has nothing to
    delete: listing the blob's snapshots then cost 39 % of the operator's CPU on a cold start of 1,000
    ModelApps sharing 10 models (every app lists the ~100 snapshots of its model; bench/scale.py with
    py-spy). A snapshot left by a failed status write goes with the next prune of that blob."""
    kept = kept_snapshots(status)
    if deps.pins is None or not kept_snapshots(app.status) - kept:
        return
    urls = {str(u) for u in snapshot_urls(app.status) | snapshot_urls(status)}
    for url in sorted(urls):
        address = parse_blob_url(url)
        location = BlobLocation(account_url=address.account_url, container=address.container, name=address.blob)
        try:
            credential = await model_credential(app, deps.kube)
            deleted = await deps.pins.prune(location, credential, app.metadata.uid, kept)
        except ModelResolutionError as error:
            _log.warning("%s/%s: old snapshots stay until the next change: %s", app.namespace, app.name, error.message)
            continue
        if deleted:
            _log.info("%s/%s: deleted %d snapshot(s) of %s no longer in history", app.namespace, app.name, deleted, url)


async def _write_status(deps: Dependencies, body: Mapping[str, Any], update: StatusUpdate) -> None:
    metadata = body.get("metadata") or {}
    if update.changed:
        key = (str(metadata["namespace"]), str(metadata["name"]))
        try:
            written = await deps.kube.patch_modelapp_status(
                *key, update.status, previous=body.get("status") or {}, resource_version=metadata.get("resourceVersion")
            )
        except ConflictError:
            deps.modelapps.forget(key)  # planned from a stale copy: the next read GETs
            raise
        if written is not None:
            # The next reconcile plans from what we wrote, not from a watch copy that predates it.
            deps.modelapps.observe(key, written)
    # Written (or already so): state gauges, a rollout that reached Ready, change -> Ready latency.
    METRICS.status_observed((str(metadata["namespace"]), str(metadata["name"])), update.status)
    for event in update.events:
        await _post_event(deps, body, event)


async def _post_event(deps: Dependencies, body: Mapping[str, Any], event: Event) -> None:
    involved = {"apiVersion": API_VERSION, "kind": KIND, "metadata": dict(body.get("metadata") or {})}
    if deps.events is not None:
        deps.events.record(involved, event.type, event.reason, event.message)
    else:
        await deps.kube.post_event(involved, event.type, event.reason, event.message)


def _error(failure: Failure) -> ReconcileError:
    if failure.retry_after is None:
        return PermanentReconcileError(failure.reason, failure.message)
    return TemporaryReconcileError(failure.reason, failure.message, delay=failure.retry_after)


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
    async with deps.lock(namespace, name), deps.refresh_in_flight:
        if deployment_seen is not None and deps.predates_apply(namespace, name, deployment_seen):
            return None  # a reconcile applied a newer template while we waited for the lock
        body = await deps.read_modelapp(namespace, name)
        if body is None:
            return None
        try:
            app = parse_modelapp(body)
        except SpecError:
            return None  # reconcile reports it
        previous: Mapping[str, Any] = body.get("status") or {}
        if not refresh_applies(previous):
            return None  # nothing rolled out by us yet, or a person must act first
        deployment = (
            deployment_seen
            if deployment_seen is not None
            else await deps.read_child("apps/v1", "Deployment", namespace, name)
        )
        # Pods are read on the refresher's rechecks (5 s into a stalled rollout, then less often) and
        # while a pod problem is shown: a Deployment event of a young rollout has nothing to find yet
        # (a cold start of 1,000 ModelApps listed pods 701 times for nothing).
        look = deployment_seen is None or problem_shown(previous)
        pods = await _pod_diagnosis(deps, app, deployment) if look else None
        plan = plan_refresh(app, previous, deployment, deps.clock(), pods, pods_read=look)
        if plan is None:
            return None
        if plan.rollback_from is not None:
            # The rollout missed its deadline and a Ready pair exists: the full reconcile rolls back.
            _log.warning(
                "%s/%s: revision %s missed its progress deadline; rolling back",
                namespace,
                name,
                plan.rollback_from["revision"],
            )
            try:
                return (await _reconcile_locked(body, deps)).status
            except ReconcileError:
                return None  # the status says why; the rollback itself was applied before
        assert plan.update is not None
        await _write_status(deps, body, plan.update)
        if plan.drifted:
            # Someone scaled or edited our Deployment: the reconcile puts it back.
            _log.info("%s/%s: Deployment drifted from the ModelApp; requesting a reconcile", namespace, name)
            await request_reconcile(deps.kube, namespace, name, now=deps.clock())
        return plan.update.status


async def request_reconcile(kube: KubeClient, namespace: str, name: str, *, now: datetime | None = None) -> None:
    """Ask for a reconcile of one ModelApp (e.g. its tag moved or its blob changed).

    It stamps an annotation; the ModelApp watch sees it and queues a reconcile
    (reconcile/queue.py), so requests never race with a running reconcile."""
    stamp = (now or now_utc()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    await kube.patch_modelapp_annotations(namespace, name, {ANNOTATION_RECONCILE_REQUEST: stamp})
