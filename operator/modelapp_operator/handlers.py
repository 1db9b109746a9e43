"""kopf handlers: thin wrappers around the reconciler, all registered here.

Importing this module registers the handlers in kopf's default registry. Start-up builds the
running operator (runtime.py: clients, the watch hub and its poll loop, the webhook receiver);
every ModelApp event goes through the one idempotent reconcile.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from modelapp_operator import runtime
from modelapp_operator.config import OperatorConfig
from modelapp_operator.names import (
    ANNOTATION_RECONCILE_REQUEST,
    CHILD_SELECTOR,
    GROUP,
    KIND,
    KOPF_PERSISTENCE_PREFIX,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PLURAL,
    VERSION,
)
from modelapp_operator.reconcile.reconciler import (
    Dependencies,
    PermanentReconcileError,
    TemporaryReconcileError,
    reconcile,
    request_reconcile,
)
from modelapp_operator.redact import redact

Logger = logging.Logger | logging.LoggerAdapter[Any]

UNEXPECTED_ERROR_DELAY = 30.0


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, logger: Logger, **_: Any) -> None:
    config: OperatorConfig = memo.get("config") or OperatorConfig.from_env()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PERSISTENCE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PERSISTENCE_PREFIX, key="last-handled-configuration"
    )
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
    if config.peering is not None:
        # A replica silent this long is dead: the standby takes over after it (a SIGTERMed one leaves at once).
        settings.peering.lifetime = config.peering.lifetime_seconds
        settings.peering.stealth = True
    # Watch only our own Deployments: the handler's `labels=` filter is client-side, so without
    # this kopf lists, parses and queues every Deployment in the cluster.
    settings.watching.label_selectors["apps", "deployments"] = CHILD_SELECTOR

    memo["config"] = config
    running = await runtime.start(config, logger)
    memo["runtime"] = running
    memo["deps"] = running.deps
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


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def on_child_deployment(event: kopf.RawEvent, body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    """Follow the child Deployment: Ready tracks its rollout; a deleted child is recreated."""
    owner = _controller_owner(body)
    namespace = body.get("metadata", {}).get("namespace")
    running: runtime.Runtime | None = memo.get("runtime")
    if owner is None or namespace is None or running is None:
        return
    if event.get("type") == "DELETED":
        try:
            await request_reconcile(running.deps.kube, namespace, owner)
        except Exception as error:
            logger.warning("reconcile request for ModelApp %s/%s failed: %s", namespace, owner, redact(str(error)))
        return
    # The event's copy is as fresh as a GET would be: spare the API server that read.
    deployment = event.get("object")
    if deployment:
        running.child_refresher.submit((namespace, owner), deployment)
