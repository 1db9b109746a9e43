"""kopf handlers: thin wrappers around reconcile.py, all registered here.

Importing this module registers the handlers in kopf's default registry. Start-up
also creates the watch hub (shared caching resolvers, the poll loop) and the
webhook receiver; a change the hub sees reconciles the ModelApps that follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from modelapp_operator.acr import AcrTokenProvider
from modelapp_operator.blobs import AzureBlobResolver
from modelapp_operator.build import ANNOTATION_RECONCILE_REQUEST, MANAGED_BY
from modelapp_operator.config import OperatorConfig
from modelapp_operator.kube import AiohttpKubeClient
from modelapp_operator.model import GROUP, KIND, PLURAL, VERSION
from modelapp_operator.receiver import Receiver
from modelapp_operator.reconcile import (
    Dependencies,
    PermanentReconcileError,
    ReconcileError,
    TemporaryReconcileError,
    reconcile,
    refresh_status,
    request_reconcile,
)
from modelapp_operator.redact import redact
from modelapp_operator.registry import RegistryClient
from modelapp_operator.watch import AppKey, WatchConfig, WatchHub

# kopf keeps its bookkeeping in annotations under this prefix. Not `modelapp.io` itself:
# kopf leaves annotations under its own prefix out of the diff it compares, and
# modelapp.io/reconcile-requested-at must count as a change.
Logger = logging.Logger | logging.LoggerAdapter[Any]

PERSISTENCE_PREFIX = f"operator.{GROUP}"
UNEXPECTED_ERROR_DELAY = 30.0
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
CHILD_REFRESH_COALESCE_SECONDS = 1.0


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, logger: Logger, **_: Any) -> None:
    config: OperatorConfig = memo.get("config") or OperatorConfig.from_env()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PERSISTENCE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PERSISTENCE_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PERSISTENCE_PREFIX}/finalizer"  # unused: no deletion handlers
    # kopf turns its log lines into Kubernetes events; our own events cover rollouts,
    # so only kopf's warnings (handler failures) become events.
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING
    # Restart watches that go silent (kopf's main production failure), and bound every call.
    settings.watching.inactivity_timeout = 300
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    settings.execution.default_backoff = 30
    # Watch only our own Deployments: the handler's `labels=` filter is client-side, so without
    # this kopf lists, parses and queues every Deployment in the cluster.
    settings.watching.label_selectors["apps", "deployments"] = CHILD_SELECTOR

    memo["config"] = config
    watch_config = config.watch or WatchConfig()
    # One hub: reconcile resolves through its caches, so 1,000 ModelApps sharing 10 images
    # cost 10 registry requests per poll interval, and the poller sees what reconcile saw.
    hub = WatchHub(
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
    deps = Dependencies(kube=AiohttpKubeClient.connect(), images=hub.images, models=hub.models, watch=hub)
    memo["deps"] = deps
    memo["child_refresher"] = ChildRefresher(deps, logger)

    async def reconcile_changed(app: AppKey) -> None:
        await _reconcile_changed(app, deps, logger)

    hub.set_on_change(reconcile_changed)
    memo["watch_tasks"] = [
        asyncio.create_task(hub.run_polling(config.poll_interval_seconds), name="modelapp-watch-poll")
    ]
    receiver: Receiver | None = None
    if config.receiver is not None and config.receiver.enabled:
        receiver = Receiver.from_config(hub, config.receiver, stats=lambda: dataclasses.asdict(hub.stats()))
        await receiver.start()
    memo["receiver"] = receiver
    logger.info(
        "ModelApp operator configured: namespaces=%s registry CA=%s poll every %gs, webhook receiver %s",
        ",".join(config.namespaces) or "<all>",
        config.registry_ca_file or "<system>",
        config.poll_interval_seconds,
        f"on port {receiver.port}" if receiver is not None else "off",
    )


async def _reconcile_changed(app: AppKey, deps: Dependencies, logger: Logger) -> None:
    """A followed tag or blob changed: reconcile that ModelApp now.

    Called directly rather than through a reconcile-request annotation: kopf would hold
    such a request while the object waits out a retry backoff, and reconcile already
    serializes with kopf's handlers through the per-object lock and reads the object again."""
    namespace, name = app
    try:
        result = await reconcile({"metadata": {"namespace": namespace, "name": name}}, deps)
    except ReconcileError as error:
        # Written to the status; the hub asks again when the next fetch sees a change.
        logger.info("reconcile of %s/%s after a change: %s", namespace, name, error)
        return
    if not result.found and deps.watch is not None:
        deps.watch.untrack(app)
    elif result.applied:
        logger.info("%s/%s changed upstream: applied %s", namespace, name, ", ".join(result.applied))


@kopf.on.cleanup()
async def close_clients(memo: Any, **_: Any) -> None:
    receiver: Receiver | None = memo.get("receiver")
    if receiver is not None:
        await receiver.stop()
    refresher: ChildRefresher | None = memo.get("child_refresher")
    if refresher is not None:
        await refresher.close()
    tasks: list[asyncio.Task[None]] = memo.get("watch_tasks") or []
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    deps: Dependencies | None = memo.get("deps")
    if deps is None:
        return
    if deps.watch is not None:
        await deps.watch.close()
    for client in (deps.kube, deps.images, deps.models):
        close = getattr(client, "close", None)
        if close is not None:
            await close()


async def _run(body: kopf.Body, memo: Any, logger: Logger) -> None:
    deps: Dependencies = memo["deps"]
    try:
        result = await reconcile(body, deps)
    except PermanentReconcileError as error:
        raise kopf.PermanentError(str(error)) from None
    except TemporaryReconcileError as error:
        raise kopf.TemporaryError(str(error), delay=error.delay) from None
    except Exception as error:
        # A bug or an API hiccup: log it (redacted) and retry; never let it kill the operator.
        logger.error("reconcile failed: %s: %s", type(error).__name__, redact(str(error)))
        raise kopf.TemporaryError(redact(f"{type(error).__name__}: {error}"), delay=UNEXPECTED_ERROR_DELAY) from None
    if result.applied:
        logger.info("applied %s", ", ".join(result.applied))


@kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile-create")
async def on_create(body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    await _run(body, memo, logger)


@kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile-update")
async def on_update(body: kopf.Body, diff: kopf.Diff, memo: Any, logger: Logger, **_: Any) -> None:
    deps: Dependencies = memo["deps"]
    requested = ("metadata", "annotations", ANNOTATION_RECONCILE_REQUEST)
    if deps.watch is not None and any(tuple(change[1])[: len(requested)] == requested for change in diff):
        # Someone asked for a reconcile: resolve the tag and the blob again instead of from the cache.
        meta = body.get("metadata", {})
        deps.watch.invalidate_app((str(meta.get("namespace")), str(meta.get("name"))))
    await _run(body, memo, logger)


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-resume")
async def on_resume(body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    await _run(body, memo, logger)


def _is_deletion(event: kopf.RawEvent, **_: Any) -> bool:
    return event.get("type") == "DELETED"


@kopf.on.event(GROUP, VERSION, PLURAL, when=_is_deletion)
async def on_modelapp_deleted(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    """A deleted ModelApp stops following its tag and blob (no finalizer needed for that)."""
    deps: Dependencies | None = memo.get("deps")
    if deps is None:
        return
    meta = (event.get("object") or {}).get("metadata") or {}
    namespace, name = str(meta.get("namespace")), str(meta.get("name"))
    if deps.watch is not None:
        deps.watch.untrack((namespace, name))
    deps.forget(namespace, name)


def _controller_owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return str(ref.get("name"))
    return None


class ChildRefresher:
    """Status refreshes from child Deployment events, newest copy only, one at a time per ModelApp.

    kopf hands a resource's events to its handler one by one and queues the rest, each a
    full parsed Deployment. A handler that waited its turn (the ModelApp's lock, the bound on
    requests in flight) let those queues grow with every rollout step of every Deployment:
    the operator's memory peak. Here an event only replaces the pending copy for its
    ModelApp, and one task per ModelApp refreshes from the newest copy it finds."""

    def __init__(self, deps: Dependencies, logger: Logger) -> None:
        self._deps = deps
        self._logger = logger
        self._pending: dict[AppKey, Mapping[str, Any]] = {}
        self._tasks: dict[AppKey, asyncio.Task[None]] = {}

    def submit(self, app: AppKey, deployment: Mapping[str, Any]) -> None:
        self._pending[app] = deployment
        if app not in self._tasks:
            self._tasks[app] = asyncio.create_task(self._drain(app), name=f"refresh {app[0]}/{app[1]}")

    async def _drain(self, app: AppKey) -> None:
        namespace, name = app
        try:
            # A new Deployment reports several rollout steps within a second: wait for the
            # newest, so the API server spends its time on reconciles rather than on refreshes.
            await asyncio.sleep(CHILD_REFRESH_COALESCE_SECONDS)
            while (deployment := self._pending.pop(app, None)) is not None:
                try:
                    await refresh_status(namespace, name, self._deps, deployment_seen=deployment)
                except Exception as error:
                    # The next Deployment event (or the ModelApp's own reconcile) catches up.
                    self._logger.warning(
                        "status refresh of ModelApp %s/%s failed: %s", namespace, name, redact(str(error))
                    )
        finally:
            del self._tasks[app]

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pending.clear()


@kopf.on.event("apps", "v1", "deployments", labels={MANAGED_BY_LABEL: MANAGED_BY})
async def on_child_deployment(event: kopf.RawEvent, body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    """Follow the child Deployment: Ready tracks its rollout; a deleted child is recreated."""
    owner = _controller_owner(body)
    namespace = body.get("metadata", {}).get("namespace")
    deps: Dependencies | None = memo.get("deps")
    refresher: ChildRefresher | None = memo.get("child_refresher")
    if owner is None or namespace is None or deps is None or refresher is None:
        return
    if event.get("type") == "DELETED":
        try:
            await request_reconcile(deps.kube, namespace, owner)
        except Exception as error:
            logger.warning("reconcile request for ModelApp %s/%s failed: %s", namespace, owner, redact(str(error)))
        return
    # The event's copy is as fresh as a GET would be: spare the API server that read.
    deployment = event.get("object")
    if deployment:
        refresher.submit((namespace, owner), deployment)
