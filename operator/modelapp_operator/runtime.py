"""The running operator: its clients, the watch hub and its poll loop, the webhook receiver, the child refresher
and the reconcile queue.

`start` builds them from the configuration at kopf's start-up and wires every trigger to the one
queue (reconcile/queue.py): the hub and the child refresher submit to it, handlers.py too;
`Runtime.forget` drops what each keeps for a deleted ModelApp; `Runtime.stop` closes everything at
clean-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelapp_operator.clients.acr import AcrTokenProvider
from modelapp_operator.clients.app_pods import AppPodsClient
from modelapp_operator.clients.blob_storage import AzureBlobResolver
from modelapp_operator.clients.kube import AiohttpKubeClient
from modelapp_operator.clients.registry import RegistryClient
from modelapp_operator.config import OperatorConfig, WatchConfig
from modelapp_operator.leader import LeaderElector
from modelapp_operator.metrics import METRICS
from modelapp_operator.receiver.server import Receiver
from modelapp_operator.reconcile.caches import AppState, ChildCache, IndexLookup, Stored
from modelapp_operator.reconcile.child_refresher import ChildRefresher
from modelapp_operator.reconcile.deps import Clients, Dependencies
from modelapp_operator.reconcile.events import EventRecorder
from modelapp_operator.reconcile.queue import ReconcileQueue, stop_all
from modelapp_operator.reconcile.reconciler import ReconcileResult, Trigger, reconcile
from modelapp_operator.watch.hub import Submit, WatchHub
from modelapp_operator.watch.keys import AppKey

Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass
class Runtime:
    deps: Dependencies
    child_refresher: ChildRefresher
    queue: ReconcileQueue
    receiver: Receiver | None = None
    leader: LeaderElector | None = None  # None: one replica (standalone), always active
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def leading(self) -> bool:
        """Whether this replica acts now: the only one, or the holder of the leader Lease."""
        return self.leader is None or self.leader.leading()

    def forget(self, app: AppKey) -> None:
        """The ModelApp is gone: stop following its tag and blob, drop everything kept for it."""
        self.queue.forget(app)
        self.child_refresher.forget(app)
        if self.deps.clients.watch is not None:
            self.deps.clients.watch.untrack(app)
        self.deps.state.forget(app)
        METRICS.forget(app)

    async def stop(self) -> None:
        if self.receiver is not None:
            await self.receiver.stop()
        await self.queue.close()
        if self.leader is not None:
            await self.leader.release()  # after the queue: nothing of ours writes any more
        await self.child_refresher.close()
        clients = self.deps.clients
        if clients.events is not None:
            await clients.events.close()
        await stop_all((), self.tasks)
        if clients.watch is not None:
            await clients.watch.close()
        for client in (clients.kube, clients.images, clients.models, clients.app_pods):
            close = getattr(client, "close", None)
            if close is not None:
                await close()


def build_hub(config: OperatorConfig, submit: Submit | None = None) -> WatchHub:
    """One hub: reconcile resolves through its caches, so 1,000 ModelApps sharing 10 images
    cost 10 registry requests per poll interval, and the poller sees what reconcile saw.
    submit: where the ModelApps whose tag or blob changed go (the reconcile queue)."""
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
        submit=submit,
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
    # The queue's two calls out; `deps` and `runtime` are built below, before anything is submitted.
    async def run(app: AppKey, trigger: Trigger) -> ReconcileResult:
        return await reconcile(app, trigger, deps)

    def gone(app: AppKey) -> None:
        runtime.forget(app)

    queue = ReconcileQueue(run, logger, on_gone=gone)  # the one caller of reconcile()
    hub = build_hub(config, submit=queue.submit)
    blobs = hub.models.inner
    kube = AiohttpKubeClient.connect(secret_ttl_seconds=config.secret_cache_seconds)
    leader: LeaderElector | None = None
    if config.leader_election is not None:
        # Two replicas, one active: the holder of the Lease in the operator's own namespace.
        receiver_port = config.receiver.port if config.receiver is not None else None
        leader = LeaderElector(config.leader_election, kube, receiver_port=receiver_port, on_change=METRICS.set_active)
    clients = Clients(
        kube=kube,
        images=hub.images,
        models=hub.models,
        watch=hub,
        pins=blobs if isinstance(blobs, AzureBlobResolver) else None,
        blob_reader=blobs if isinstance(blobs, AzureBlobResolver) else None,
        app_pods=AppPodsClient(),
        events=EventRecorder(kube.post_event),
        may_write=leader.leading if leader is not None else (lambda: True),
        sources=config.sources,
    )
    deps = Dependencies(clients, AppState(children=ChildCache(children)))
    runtime = Runtime(deps=deps, child_refresher=ChildRefresher(deps, queue.submit, logger), queue=queue, leader=leader)
    if leader is not None:
        # kopf runs standalone on every replica (its handlers only enqueue); the queue and the hub's
        # submissions wait for the Lease, and every write checks it once more (reconciler._must_lead).
        hub.set_active_check(leader.leading)
        queue.set_active_check(leader.leading)
        runtime.tasks.append(asyncio.create_task(leader.run(), name="modelapp-leader-election"))
    runtime.tasks.append(asyncio.create_task(hub.run_polling(config.poll_interval_seconds), name="modelapp-watch-poll"))
    if config.receiver is not None and config.receiver.enabled:
        receiver = Receiver.from_config(
            hub,
            config.receiver,
            stats=lambda: dataclasses.asdict(hub.stats()),
            forward_to=leader.forward_target if leader is not None else None,
        )
        try:
            await receiver.start()
        except BaseException:
            await runtime.stop()  # kopf retries the start-up handler: leave nothing running behind
            raise
        runtime.receiver = receiver
    if leader is None:
        METRICS.set_active(True)  # one replica: always; with an election, the elector sets it when this one leads
    return runtime
