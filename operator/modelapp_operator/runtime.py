"""The running operator: its clients, the watch hub and its poll loop, the webhook receiver, the child refresher.

`start` builds them from the configuration at kopf's start-up; a change the hub sees reconciles
the ModelApps that follow it; `Runtime.stop` closes everything at clean-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelapp_operator.clients.acr import AcrTokenProvider
from modelapp_operator.clients.blob_storage import AzureBlobResolver
from modelapp_operator.clients.kube import AiohttpKubeClient
from modelapp_operator.clients.registry import RegistryClient
from modelapp_operator.config import OperatorConfig, WatchConfig
from modelapp_operator.metrics import METRICS, triggered_by
from modelapp_operator.peering import PeeringView
from modelapp_operator.receiver.server import Receiver
from modelapp_operator.reconcile.caches import ChildCache, IndexLookup, Stored
from modelapp_operator.reconcile.child_refresher import ChildRefresher
from modelapp_operator.reconcile.events import EventRecorder
from modelapp_operator.reconcile.queue import ReconcileQueue, stop_all
from modelapp_operator.reconcile.reconciler import (
    Dependencies,
    ReconcileError,
    ReconcileResult,
    reconcile,
)
from modelapp_operator.watch.hub import WatchHub
from modelapp_operator.watch.keys import AppKey

Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass
class Runtime:
    deps: Dependencies
    child_refresher: ChildRefresher
    queue: ReconcileQueue
    receiver: Receiver | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def forget(self, app: AppKey) -> None:
        """The ModelApp is gone: stop following its tag and blob, drop what is kept for it."""
        self.queue.forget(app)
        if self.deps.watch is not None:
            self.deps.watch.untrack(app)
        self.deps.forget(*app)

    async def stop(self) -> None:
        if self.receiver is not None:
            await self.receiver.stop()
        await self.queue.close()
        await self.child_refresher.close()
        if self.deps.events is not None:
            await self.deps.events.close()
        await stop_all((), self.tasks)
        deps = self.deps
        if deps.watch is not None:
            await deps.watch.close()
        for client in (deps.kube, deps.images, deps.models):
            close = getattr(client, "close", None)
            if close is not None:
                await close()


def build_hub(config: OperatorConfig) -> WatchHub:
    """One hub: reconcile resolves through its caches, so 1,000 ModelApps sharing 10 images
    cost 10 registry requests per poll interval, and the poller sees what reconcile saw."""
    watch_config = config.watch or WatchConfig()
    return WatchHub(
        RegistryClient(
            ca_file=config.registry_ca_file,
            insecure_hosts=config.registry_insecure_hosts,
            timeout_seconds=config.registry_timeout_seconds,
            acr=AcrTokenProvider(
                ca_file=config.registry_ca_file,
                insecure_hosts=config.registry_insecure_hosts,
                timeout_seconds=config.registry_timeout_seconds,
            )
            if config.registry_azure_identity_hosts
            else None,
            azure_identity_hosts=config.registry_azure_identity_hosts,
        ),
        AzureBlobResolver(timeout_seconds=config.registry_timeout_seconds),
        ttl_seconds=config.poll_interval_seconds,
        error_ttl_seconds=watch_config.error_ttl_seconds,
        coalesce_seconds=watch_config.coalesce_seconds,
        concurrency=watch_config.concurrency,
    )


ChildIndex = Mapping[AppKey, Collection[Stored]]  # a kopf.Index: one copy per key here


def index_lookup(deployments: ChildIndex, services: ChildIndex) -> IndexLookup:
    """Reads a child from kopf's indexes (handlers.py): one copy per (namespace, name)."""
    indexes = {"Deployment": deployments, "Service": services}

    def lookup(kind: str, namespace: str, name: str) -> Stored | None:
        store = indexes[kind].get((namespace, name))
        return next(iter(store), None) if store else None

    return lookup


async def start(config: OperatorConfig, logger: Logger, children: IndexLookup | None = None) -> Runtime:
    hub = build_hub(config)
    blobs = hub.models.inner
    kube = AiohttpKubeClient.connect(secret_ttl_seconds=config.secret_cache_seconds)
    deps = Dependencies(
        kube=kube,
        images=hub.images,
        models=hub.models,
        watch=hub,
        pins=blobs if isinstance(blobs, AzureBlobResolver) else None,
        children=ChildCache(children),
        events=EventRecorder(kube.post_event),
    )

    async def reconcile_queued(app: AppKey) -> ReconcileResult:
        return await reconcile({"metadata": {"namespace": app[0], "name": app[1]}}, deps)

    runtime = Runtime(
        deps=deps, child_refresher=ChildRefresher(deps, logger), queue=ReconcileQueue(reconcile_queued, logger)
    )

    async def reconcile_changed(app: AppKey) -> None:
        await _reconcile_changed(app, deps, runtime.queue, logger)

    hub.set_on_change(reconcile_changed)
    peering: PeeringView | None = None
    if config.peering is not None:
        # Two replicas, one active: kopf pauses its handlers on the standby; our own loops ask the view.
        peering = PeeringView(config.peering, config.namespaces, kube.get_path, on_change=METRICS.set_active)
        hub.set_active_check(lambda: peering is not None and peering.active)
        runtime.queue.set_active_check(lambda: peering is not None and peering.active)
        runtime.tasks.append(asyncio.create_task(peering.run(), name="modelapp-peering-view"))
    polling = hub.run_polling(config.poll_interval_seconds)
    runtime.tasks.append(asyncio.create_task(polling, name="modelapp-watch-poll", context=triggered_by("poll")))
    if config.receiver is not None and config.receiver.enabled:
        receiver = Receiver.from_config(
            hub,
            config.receiver,
            stats=lambda: dataclasses.asdict(hub.stats()),
            forward_to=peering.forward_target if peering is not None else None,
        )
        try:
            await receiver.start()
        except BaseException:
            await runtime.stop()  # kopf retries the start-up handler: leave nothing running behind
            raise
        runtime.receiver = receiver
    if peering is None:
        METRICS.set_active(True)  # one replica: always; with peering, the view sets it when this replica acts
    return runtime


async def _reconcile_changed(app: AppKey, deps: Dependencies, queue: ReconcileQueue, logger: Logger) -> None:
    """A followed tag or blob changed: reconcile that ModelApp now.

    Called directly rather than through the queue, so the change's trigger (poll, webhook) stays
    with the reconcile for the metrics; reconcile serializes with the queue's through the
    per-object lock and reads the newest copy of the object. A resolution that failed is written to
    the status and the hub asks again when that tag or blob answers. Anything else that fails (the
    API server down during a push) is the queue's to retry: the hub has already recorded the new
    versions as seen (the reconcile resolved them), so it would not ask again until the next change."""
    namespace, name = app
    try:
        result = await reconcile({"metadata": {"namespace": namespace, "name": name}}, deps)
    except ReconcileError as error:
        logger.info("reconcile of %s/%s after a change: %s", namespace, name, error)  # the status says why
        return
    except Exception:
        queue.retry(app)
        raise  # the hub logs and counts it
    if not result.found and deps.watch is not None:
        deps.watch.untrack(app)
    elif result.applied:
        logger.info("%s/%s changed upstream: applied %s", namespace, name, ", ".join(result.applied))
