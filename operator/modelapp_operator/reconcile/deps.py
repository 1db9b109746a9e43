"""What a reconcile and a status refresh work with: the fixed clients, and the per-ModelApp state. Apart from
reconciler.py so the modules that read for it (reads.py, gate_reads.py) need not import the reconcile."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from modelapp_operator.clients.app_pods import AppPodsClient
from modelapp_operator.clients.blob_storage import BlobReader, ModelPinner, ModelResolver
from modelapp_operator.clients.kube import KubeClient
from modelapp_operator.clients.registry import ImageResolver
from modelapp_operator.plan.sources import AllowedSources
from modelapp_operator.plan.status import now_utc
from modelapp_operator.reconcile.caches import AppState
from modelapp_operator.reconcile.events import EventRecorder
from modelapp_operator.watch.hub import WatchHub

# Bounds the reconciles in flight at once: a cold start of 1,000 ModelApps otherwise holds 1,000 sets
# of API responses in memory together, and the API server answers no faster for being asked everything
# at once.
RECONCILES_AT_ONCE = 64
# Status refreshes have their own, smaller bound: behind the reconciles, a cold start of 1,000 ModelApps
# wrote no Ready until every reconcile had run (all Ready 9.1 s after all pods ready in bench/scale.py);
# with their own bound, 0.5 s after.
REFRESHES_AT_ONCE = 16


@dataclass(frozen=True)
class Clients:
    """What reconciles and refreshes talk to and are bounded by: built once (runtime.py), never changed."""

    kube: KubeClient
    images: ImageResolver  # the watch hub's caching resolvers in the operator
    models: ModelResolver
    clock: Callable[[], datetime] = now_utc
    # The shared caches and subscriptions (images and models are then its caching resolvers).
    watch: WatchHub | None = None
    # Immutable model versions (snapshots); None: models are pinned by ETag only.
    pins: ModelPinner | None = None
    # Posts events in the background (None: each is posted before the reconcile goes on).
    events: EventRecorder | None = None
    in_flight: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(RECONCILES_AT_ONCE))
    # Two replicas: whether this one holds the leader Lease within its renew deadline (leader.LeaderElector.leading),
    # asked right before every apply and status write.
    may_write: Callable[[], bool] = field(default=lambda: True)
    refresh_in_flight: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(REFRESHES_AT_ONCE))
    # The registries and storage accounts each namespace may use (config.py; None: any, only for tests that
    # build their own clients). A host outside them gets no request at all.
    sources: AllowedSources | None = None
    # The release gate's reads: the test set blob, and the app's pods (None: a Gated release's checks stay pending).
    blob_reader: BlobReader | None = None
    app_pods: AppPodsClient | None = None


@dataclass(frozen=True)
class Dependencies:
    """A reconcile's two halves: the fixed clients, and the per-ModelApp state (`state.forget` drops an app's)."""

    clients: Clients
    state: AppState = field(default_factory=AppState)
