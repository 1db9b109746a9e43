"""The one reconcile, as read → plan → apply → write: from a ModelApp to applied children and a status.

Only the reconcile queue (reconcile/queue.py) calls `reconcile`, one run at a time per ModelApp, with
the trigger that asked for it. `refresh_status` is the status refresh from a child Deployment event
(reconcile/child_refresher.py): it writes the rollout part of the status itself, and when the
Deployment drifted or its rollout missed its deadline it returns the reconcile to ask for
(`Refresh.reconcile`), which its caller submits to the queue. Both plan from the ModelApp's newest
copy and write its status conditional on that copy's resourceVersion, so a reconcile and a refresh
of one ModelApp at the same time never overwrite each other: the later write conflicts and is
planned again from a fresh read (no lock). The decisions are made by plan/reconcile_plan.py; this
module only reads, applies, posts and writes. None of it needs kopf: it raises our own errors, which
the queue turns into a retry or a wait for a change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from modelapp_contract.blob import parse_blob_url
from modelapp_operator.api.modelapp_types import BlobLocation, ModelApp, SpecError, parse_modelapp
from modelapp_operator.clients.blob_storage import ModelResolutionError, ModelResolver
from modelapp_operator.clients.kube import ConflictError
from modelapp_operator.clients.registry import ImageResolver
from modelapp_operator.metrics import METRICS, Source
from modelapp_operator.names import API_VERSION, KIND
from modelapp_operator.plan.autoscaling import HPA_API_VERSION, HPA_KIND, reads_autoscaler
from modelapp_operator.plan.children import candidate_name
from modelapp_operator.plan.gate import GateFigures, gate_action, reads_gate
from modelapp_operator.plan.history import kept_snapshots, snapshot_urls
from modelapp_operator.plan.pods import (
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
from modelapp_operator.plan.status import Event
from modelapp_operator.reconcile.deps import Clients, Dependencies
from modelapp_operator.reconcile.gate_reads import read_gate_figures
from modelapp_operator.reconcile.reads import pod_diagnosis, read_child, read_modelapp
from modelapp_operator.reconcile.resolve import check_account, model_credential, resolve_image, resolve_model
from modelapp_operator.redact import redact
from modelapp_operator.watch.keys import AppKey
from modelapp_operator.watch.resolvers import CachingImageResolver, CachingModelResolver, track_resolutions

_log = logging.getLogger(__name__)

# Why a reconcile runs: a ModelApp watch event that asks for one (first sight, new generation, a
# reconcile-requested-at annotation); a tag or blob change the watch hub learned by a poll, a webhook or
# another ModelApp's reconcile reading it first ("reconcile"); a child Deployment edited behind our back
# (drift); a rollout past its progress deadline (rollback); a deleted child (recreate); the release gate's
# next look at its candidate (gate).
Trigger = Literal["event", "poll", "webhook", "reconcile", "drift", "rollback", "recreate", "gate"]


class ReconcileError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {redact(message)}")
        self.reason = reason
        self.message = redact(message)


class NotLeading(Exception):
    """This replica does not hold the leader Lease (or missed its renew deadline): it must not write."""


class PermanentReconcileError(ReconcileError):
    """Retrying cannot help until the ModelApp changes (invalid spec)."""


class TemporaryReconcileError(ReconcileError):
    """A dependency is unavailable or a conflict may clear: retry after `delay` seconds."""

    def __init__(self, reason: str, message: str, *, delay: float) -> None:
        super().__init__(reason, message)
        self.delay = delay


@dataclass(frozen=True)
class ReconcileResult:
    status: dict[str, Any]
    release: Release | None
    applied: tuple[str, ...]  # kinds applied this time, e.g. ("Deployment",)
    found: bool = True  # False: the ModelApp no longer exists
    rolled_back: bool = False
    recheck_after: float | None = None  # the release gate looks again after this many seconds


async def reconcile(key: AppKey, trigger: Trigger, deps: Dependencies) -> ReconcileResult:
    """Resolve, render, apply what differs, write status. Idempotent; the queue runs it (one at a time
    per ModelApp) for every trigger, and reads the ModelApp's newest copy itself.

    A reconcile run for a change a poll or a webhook learned counts its own upstream requests as
    theirs (metrics' `trigger` label). Raises PermanentReconcileError for an invalid spec and
    TemporaryReconcileError when something must be retried, in both cases after the status says why."""
    with METRICS.reconcile() as tracked:
        async with deps.clients.in_flight:
            tracked.started()
            current = await read_modelapp(deps, key)
            if current is None or (current.get("metadata") or {}).get("deletionTimestamp"):
                # Deleted meanwhile, or being deleted: its children go with it (owner references).
                return ReconcileResult(status={}, release=None, applied=(), found=current is not None)
            return await _reconcile_retrying(key, current, trigger, deps)


# Status writes carry the resourceVersion read; a 409 means another writer changed the ModelApp since
# (a status refresh from a child Deployment event, a second replica during a hand-over, a person's
# edit): plan again from a fresh read.
STATUS_CONFLICT_ATTEMPTS = 5


async def _reconcile_retrying(
    key: AppKey, body: Mapping[str, Any], trigger: Trigger, deps: Dependencies
) -> ReconcileResult:
    for attempt in range(1, STATUS_CONFLICT_ATTEMPTS + 1):
        try:
            return await _reconcile_once(body, trigger, deps)
        except ConflictError:
            if attempt == STATUS_CONFLICT_ATTEMPTS:
                raise
            fresh = await read_modelapp(deps, key, fresh=True)
            if fresh is None:
                return ReconcileResult(status={}, release=None, applied=(), found=False)
            body = fresh
    raise AssertionError("unreachable")


async def _reconcile_once(body: Mapping[str, Any], trigger: Trigger, deps: Dependencies) -> ReconcileResult:
    clients = deps.clients
    # Read.
    try:
        app = parse_modelapp(body)
    except SpecError as error:
        plan = plan_invalid_spec(body, str(error), clients.clock())
        await _write_status(deps, body, plan.status_update())
        assert plan.failure is not None
        raise _error(plan.failure) from None
    key = (app.namespace, app.name)
    images, models = _resolvers(clients, trigger)
    with track_resolutions(clients.watch, key):
        (image, image_resolution), (model, model_resolution) = await asyncio.gather(
            resolve_image(app, clients.kube, images, clients.sources),
            resolve_model(app, clients.kube, models, clients.pins, clients.sources),
        )
    deployment, service = await asyncio.gather(
        read_child(deps, "apps/v1", "Deployment", key), read_child(deps, "v1", "Service", key)
    )
    pods = await pod_diagnosis(clients.kube, app, deployment)
    # Not watched: read (one GET) only for an app with autoscaling, or whose status names one to delete.
    autoscaler = await clients.kube.get(HPA_API_VERSION, HPA_KIND, *key) if reads_autoscaler(app) else None
    candidate_deployment = candidate_service = None
    figures = GateFigures()
    if reads_gate(app):
        candidate = (app.namespace, candidate_name(app))
        candidate_deployment, candidate_service = await asyncio.gather(
            read_child(deps, "apps/v1", "Deployment", candidate), read_child(deps, "v1", "Service", candidate)
        )
        figures = await read_gate_figures(clients, app, candidate_deployment, candidate_service)
    # Plan.
    plan = plan_reconcile(
        ReconcileInputs(
            app,
            image,
            image_resolution,
            model,
            model_resolution,
            deployment,
            service,
            pods,
            autoscaler,
            candidate_deployment=candidate_deployment,
            candidate_service=candidate_service,
            gate_figures=figures,
            gate_action=gate_action(app),
        ),
        clients.clock(),
    )
    # Apply, then write.
    children = (
        ("Deployment", key[1], deployment),
        ("Service", key[1], service),
        (HPA_KIND, key[1], autoscaler),
        ("Deployment", candidate_name(app), candidate_deployment),
        ("Service", candidate_name(app), candidate_service),
    )
    absent = {(kind, name) for kind, name, child in children if child is None}
    applied_deployment = await _apply(deps, key, body, plan, absent)
    if plan.delete_autoscaler and autoscaler is not None:
        await clients.kube.delete_child(HPA_API_VERSION, HPA_KIND, *key, str(autoscaler["metadata"]["uid"]))
    if plan.gate is not None and plan.gate.result is not None:
        METRICS.gate_result(plan.gate.result)
    METRICS.rollout_applied(key, deployment, applied_deployment, rollback=plan.rolled_back)
    update = plan.status_update(applied_deployment)
    await _write_status(deps, body, update)
    await _prune_snapshots(clients, app, update.status)
    if plan.failure is not None:
        raise _error(plan.failure)
    return ReconcileResult(
        status=update.status,
        release=plan.release,
        applied=plan.applied_kinds,
        rolled_back=plan.rolled_back,
        recheck_after=plan.gate.recheck_after if plan.gate is not None else None,
    )


# A reconcile run for a change a poll or a webhook learned: its upstream requests count as theirs.
_SOURCES: Mapping[Trigger, Source] = {"poll": "poll", "webhook": "webhook"}


def _resolvers(clients: Clients, trigger: Trigger) -> tuple[ImageResolver, ModelResolver]:
    source = _SOURCES.get(trigger, "reconcile")
    images, models = clients.images, clients.models
    if isinstance(images, CachingImageResolver):
        images = images.asked_by(source)
    if isinstance(models, CachingModelResolver):
        models = models.asked_by(source)
    return images, models


async def _apply(
    deps: Dependencies,
    key: AppKey,
    body: Mapping[str, Any],
    plan: ReconcilePlan,
    absent: Collection[tuple[str, str]],
) -> Mapping[str, Any] | None:
    """Apply the plan's objects and post its events; returns the stable Deployment as the API server answered.
    absent: the (kind, name)s read as not there, created without force (never taking someone else's object)."""
    state = deps.state
    applied_deployment: Mapping[str, Any] | None = None
    for obj in plan.apply:
        name = str(obj["metadata"]["name"])
        creating = (obj["kind"], name) in absent
        _must_lead(deps.clients)
        try:
            answer = await deps.clients.kube.apply(obj, force=not creating)
        except ConflictError:
            # Not ours after all (or not what the watch showed): read it before planning again.
            state.children.distrust(obj["kind"], key[0], name)
            raise
        if obj["kind"] != HPA_KIND:  # not watched: read by a GET each time
            state.children.applied(obj["kind"], key[0], name, answer)
        if name != key[1]:
            continue  # the gate's candidate: not the Deployment the status and rollbacks follow
        if obj["kind"] == "Deployment":
            applied_deployment = answer
            state.record_applied(key, answer)
    for event in plan.events:
        level = logging.WARNING if event.type == "Warning" else logging.INFO
        _log.log(level, "%s/%s: %s", *key, event.message)
        await _post_event(deps.clients, body, event)
    return applied_deployment


async def _prune_snapshots(clients: Clients, app: ModelApp, status: Mapping[str, Any]) -> None:
    """Delete the snapshots this ModelApp took that its status no longer names (history is bounded at
    HISTORY_LIMIT): after the status naming the new set is written, and only when that set dropped one.

    A set that only grew (a first rollout, a new pair while history is below its limit) has nothing to
    delete: listing the blob's snapshots then cost 39 % of the operator's CPU on a cold start of 1,000
    ModelApps sharing 10 models (every app lists the ~100 snapshots of its model; bench/scale.py with
    py-spy). A snapshot left by a failed status write goes with the next prune of that blob."""
    kept = kept_snapshots(status)
    if clients.pins is None or not kept_snapshots(app.status) - kept:
        return
    urls = {str(u) for u in snapshot_urls(app.status) | snapshot_urls(status)}
    for url in sorted(urls):
        address = parse_blob_url(url)
        location = BlobLocation(account_url=address.account_url, container=address.container, name=address.blob)
        try:
            credential = await model_credential(app, clients.kube)
            check_account(app, location, credential, clients.sources)
            deleted = await clients.pins.prune(location, credential, app.metadata.uid, kept)
        except ModelResolutionError as error:
            _log.warning("%s/%s: old snapshots stay until the next change: %s", app.namespace, app.name, error.message)
            continue
        if deleted:
            _log.info("%s/%s: deleted %d snapshot(s) of %s no longer in history", app.namespace, app.name, deleted, url)


async def _write_status(deps: Dependencies, body: Mapping[str, Any], update: StatusUpdate) -> None:
    metadata = body.get("metadata") or {}
    if update.changed:
        key = (str(metadata["namespace"]), str(metadata["name"]))
        _must_lead(deps.clients)
        try:
            written = await deps.clients.kube.patch_modelapp_status(
                *key, update.status, previous=body.get("status") or {}, resource_version=metadata.get("resourceVersion")
            )
        except ConflictError:
            deps.state.modelapps.forget(key)  # planned from a stale copy: the next read GETs
            raise
        if written is not None:
            # The next reconcile plans from what we wrote, not from a watch copy that predates it.
            deps.state.modelapps.observe(key, written)
    # Written (or already so): state gauges, a rollout that reached Ready, change -> Ready latency.
    METRICS.status_observed((str(metadata["namespace"]), str(metadata["name"])), update.status)
    for event in update.events:
        await _post_event(deps.clients, body, event)


def _must_lead(clients: Clients) -> None:
    """The apply guard: a replica that lost the Lease (or could not renew it in time) writes nothing.
    What remains is the time between this check and the write reaching the API server (docs/operations.md)."""
    if not clients.may_write():
        raise NotLeading("this replica does not hold the leader Lease")


# What an event names of its ModelApp (its involvedObject); an event waiting to be posted keeps only these.
INVOLVED_FIELDS = ("name", "namespace", "uid", "resourceVersion")


async def _post_event(clients: Clients, body: Mapping[str, Any], event: Event) -> None:
    metadata = body.get("metadata") or {}
    involved = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {k: metadata.get(k) for k in INVOLVED_FIELDS}}
    if clients.events is not None:
        clients.events.record(involved, event.type, event.reason, event.message)
    else:
        await clients.kube.post_event(involved, event.type, event.reason, event.message)


def _error(failure: Failure) -> ReconcileError:
    if failure.retry_after is None:
        return PermanentReconcileError(failure.reason, failure.message)
    return TemporaryReconcileError(failure.reason, failure.message, delay=failure.retry_after)


@dataclass(frozen=True)
class Refresh:
    """What a status refresh did: the status it wrote (or found so), and the reconcile it asks for."""

    status: dict[str, Any] | None = None  # None: nothing to refresh (not ours yet, an old copy, a rollback)
    reconcile: Trigger | None = None  # "drift" or "rollback": the caller submits it to the queue


async def refresh_status(key: AppKey, deps: Dependencies, deployment_seen: Mapping[str, Any] | None = None) -> Refresh:
    """Recompute the rollout part of the status from the live Deployment (no resolution).

    Called when a child Deployment changes, so Ready follows pods becoming ready, and a Deployment
    edited behind the operator's back (drift) or a rollout past its deadline (rollback) is noticed:
    those need the full reconcile, which the refresh asks its caller to submit rather than running it.
    deployment_seen: the Deployment as the watch event delivered it, used instead of reading it again
    (a copy older than our own last apply is skipped: the event of that apply follows)."""
    state = deps.state
    if deployment_seen is not None and state.predates_apply(key, deployment_seen):
        return Refresh()
    async with deps.clients.refresh_in_flight:
        if deployment_seen is not None and state.predates_apply(key, deployment_seen):
            return Refresh()  # a reconcile applied a newer template while this waited for its slot
        body = await read_modelapp(deps, key)
        if body is None:
            return Refresh()
        try:
            app = parse_modelapp(body)
        except SpecError:
            return Refresh()  # reconcile reports it
        previous: Mapping[str, Any] = body.get("status") or {}
        if not refresh_applies(previous):
            return Refresh()  # nothing rolled out by us yet, or a person must act first
        deployment = (
            deployment_seen if deployment_seen is not None else await read_child(deps, "apps/v1", "Deployment", key)
        )
        # Pods are read on the refresher's rechecks (5 s into a stalled rollout, then less often) and
        # while a pod problem is shown: a Deployment event of a young rollout has nothing to find yet
        # (a cold start of 1,000 ModelApps listed pods 701 times for nothing).
        look = deployment_seen is None or problem_shown(previous)
        pods = await pod_diagnosis(deps.clients.kube, app, deployment) if look else None
        plan = plan_refresh(app, previous, deployment, deps.clients.clock(), pods, pods_read=look)
        if plan is None:
            return Refresh()
        if plan.rollback_from is not None:
            # The rollout missed its deadline and a Ready pair exists: the full reconcile rolls back.
            revision = plan.rollback_from["revision"]
            _log.warning("%s/%s: revision %s missed its progress deadline; rolling back", *key, revision)
            return Refresh(reconcile="rollback")
        assert plan.update is not None
        await _write_status(deps, body, plan.update)
        if plan.drifted:
            # Someone scaled or edited our Deployment: the reconcile puts it back.
            _log.info("%s/%s: Deployment drifted from the ModelApp; reconciling", *key)
            return Refresh(plan.update.status, reconcile="drift")
        return Refresh(plan.update.status)
