"""kopf handlers and indexes, all registered here; each is a thin call into the queue, the caches or the refresher.

Importing this module registers the handlers in kopf's default registry. Start-up builds the
running operator (runtime.py: clients, the watch hub and its poll loop, the webhook receiver, the
queue). A ModelApp event that asks for a reconcile, and a deleted child, submit to the one queue
(reconcile/queue.py); a child Deployment's events go to the child refresher, which submits too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import kopf
from modelapp_operator import runtime
from modelapp_operator.config import OperatorConfig
from modelapp_operator.names import (
    CHILD_SELECTOR,
    GROUP,
    KIND,
    KOPF_PERSISTENCE_PREFIX,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PLURAL,
    VERSION,
)
from modelapp_operator.reconcile.caches import Stored
from modelapp_operator.watch.keys import AppKey

Logger = logging.Logger | logging.LoggerAdapter[Any]


class NoDiffBase(kopf.DiffBaseStorage):
    """No create/update handlers, so no diff base: kopf otherwise builds and compares a deep copy of
    every ModelApp on every event (11 % of the operator's CPU on a cold start of 1,000), and PATCHes
    its `last-handled-configuration` annotation after each change."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


ChildEntry = dict[AppKey, Stored]


# The children as the watch last saw them (the reconcile reads these instead of GETs). kopf starts
# no handler before every index has its initial listing, so a reconcile never mistakes a child not
# yet listed for a missing one. Coroutines, not functions: kopf runs a plain function in a thread pool,
# and handing every Deployment event to a thread was 11 % of the operator's CPU at 1,000 ModelApps.
@kopf.index("apps", "v1", "deployments", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def child_deployments(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> ChildEntry:
    return {(str(namespace), name): Stored.of(body)}


@kopf.index("v1", "services", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def child_services(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> ChildEntry:
    return {(str(namespace), name): Stored.of(body)}


@kopf.on.startup()
async def configure(
    settings: kopf.OperatorSettings,
    memo: Any,
    logger: Logger,
    **indexes: Any,  # kopf passes each index by its function's name
) -> None:
    config: OperatorConfig = memo.get("config") or OperatorConfig.from_env()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PERSISTENCE_PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.finalizer = f"{KOPF_PERSISTENCE_PREFIX}/finalizer"  # unused: no deletion handlers
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
    # kopf keeps a task per watched object until the object has had no event for this long, and that
    # task holds the object's last parsed event (a Deployment is ~23 KiB parsed): with kopf's default
    # of 5 s, the 10,000 ModelApps of a cold start's first listing all wait at once. A later event
    # starts a new task, which costs microseconds.
    settings.queueing.idle_timeout = 0.5
    # Two replicas: kopf runs standalone on both (no peering: its object would sit in the tenants'
    # namespaces). Its handlers only enqueue; the queue acts only on the holder of the leader Lease
    # (leader.py), and kopf itself writes nothing here but warning events (no finalizers, no diff base).
    # Watch only our own Deployments: the handler's `labels=` filter is client-side, so without
    # this kopf lists, parses and queues every Deployment in the cluster.
    settings.watching.label_selectors["apps", "deployments"] = CHILD_SELECTOR
    settings.watching.label_selectors["v1", "services"] = CHILD_SELECTOR

    memo["config"] = config
    running = await runtime.start(
        config, logger, runtime.index_lookup(indexes["child_deployments"], indexes["child_services"])
    )
    memo["runtime"] = running
    logger.info(
        "ModelApp operator configured: namespaces=%s registry CA=%s poll every %gs, webhook receiver %s",
        ",".join(config.namespaces) or "<all>",
        config.registry_ca_file or "<system>",
        config.poll_interval_seconds,
        f"on port {running.receiver.port}" if running.receiver is not None else "off",
    )


@kopf.on.cleanup()
async def close_clients(memo: Any, **_: Any) -> None:
    running: runtime.Runtime | None = memo.get("runtime")
    if running is not None:
        await running.stop()


def _key(body: kopf.Body) -> AppKey:
    meta = body.get("metadata", {})
    return str(meta.get("namespace")), str(meta.get("name"))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_modelapp(event: kopf.RawEvent, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Every ModelApp event: keep the newest copy; queue a reconcile when the event asks for one."""
    running: runtime.Runtime | None = memo.get("runtime")
    if running is None:
        return
    key = _key(body)
    if event.get("type") == "DELETED":
        # A deleted ModelApp stops following its tag and blob (no finalizer needed for that).
        running.forget(key)
        return
    running.deps.state.modelapps.observe(key, event["object"])  # the raw dict: kopf's Body is a view of it
    watch = running.deps.clients.watch
    if running.queue.requested(key, body) and watch is not None:
        # Someone asked for a reconcile: resolve the tag and the blob again instead of from the cache.
        watch.invalidate_app(key)
    running.queue.observe(key, body)


def _controller_owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return str(ref.get("name"))
    return None


def _owning_app(body: kopf.Body, memo: Any) -> tuple[runtime.Runtime, AppKey] | None:
    """The running operator and the ModelApp that owns this child, if both are there."""
    owner = _controller_owner(body)
    namespace = body.get("metadata", {}).get("namespace")
    running: runtime.Runtime | None = memo.get("runtime")
    if owner is None or namespace is None or running is None:
        return None
    return running, (str(namespace), owner)


def _recreate(running: runtime.Runtime, app: AppKey) -> None:
    """A child was deleted: forget what we applied there and reconcile, which applies it again."""
    running.deps.state.children.forget(*app)
    running.queue.submit(app, "recreate")


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def on_child_deployment(event: kopf.RawEvent, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Follow the child Deployment: Ready tracks its rollout; a deleted child is recreated."""
    found = _owning_app(body, memo)
    if found is None:
        return
    running, app = found
    if body.get("metadata", {}).get("name") != app[1]:
        # The release gate's candidate: its readiness is the gate's next step (the status follows the stable
        # Deployment only). A deleted one is put back by that reconcile if the gate still wants it.
        if running.leading():
            running.queue.submit(app, "gate")
        return
    if event.get("type") == "DELETED":
        _recreate(running, app)
        return
    if not running.leading():
        return  # the standby writes no status; the leader's own refresher and reconciles catch up
    # The event's copy is as fresh as a GET would be: spare the API server that read.
    deployment = event.get("object")
    if deployment:
        running.child_refresher.submit(app, deployment)


def _is_deletion(event: kopf.RawEvent, **_: Any) -> bool:
    return event.get("type") == "DELETED"


@kopf.on.event("v1", "services", labels={LABEL_MANAGED_BY: MANAGED_BY}, when=_is_deletion)
async def on_child_service_deleted(body: kopf.Body, memo: Any, **_: Any) -> None:
    """A deleted child Service is recreated."""
    found = _owning_app(body, memo)
    if found is not None:
        _recreate(*found)
