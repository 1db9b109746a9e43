"""kopf handlers: thin wrappers around reconcile.py, all registered here.

Importing this module registers the handlers in kopf's default registry.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from modelapp_operator.blobs import AzureBlobResolver
from modelapp_operator.build import MANAGED_BY
from modelapp_operator.config import OperatorConfig
from modelapp_operator.kube import AiohttpKubeClient
from modelapp_operator.model import GROUP, KIND, PLURAL, VERSION
from modelapp_operator.reconcile import (
    Dependencies,
    PermanentReconcileError,
    TemporaryReconcileError,
    reconcile,
    refresh_status,
    request_reconcile,
)
from modelapp_operator.redact import redact
from modelapp_operator.registry import RegistryClient

# kopf keeps its bookkeeping in annotations under this prefix. Not `modelapp.io` itself:
# kopf leaves annotations under its own prefix out of the diff it compares, and
# modelapp.io/reconcile-requested-at must count as a change.
Logger = logging.Logger | logging.LoggerAdapter[Any]

PERSISTENCE_PREFIX = f"operator.{GROUP}"
UNEXPECTED_ERROR_DELAY = 30.0


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

    memo["config"] = config
    memo["deps"] = Dependencies(
        kube=AiohttpKubeClient.connect(),
        images=RegistryClient(
            ca_file=config.registry_ca_file,
            insecure_hosts=config.registry_insecure_hosts,
            timeout_seconds=config.registry_timeout_seconds,
        ),
        models=AzureBlobResolver(timeout_seconds=config.registry_timeout_seconds),
    )
    logger.info(
        "ModelApp operator configured: namespaces=%s registry CA=%s",
        ",".join(config.namespaces) or "<all>",
        config.registry_ca_file or "<system>",
    )


@kopf.on.cleanup()
async def close_clients(memo: Any, **_: Any) -> None:
    deps: Dependencies | None = memo.get("deps")
    if deps is None:
        return
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
async def on_update(body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    await _run(body, memo, logger)


@kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile-resume")
async def on_resume(body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    await _run(body, memo, logger)


def _controller_owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return str(ref.get("name"))
    return None


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
async def on_child_deployment(event: kopf.RawEvent, body: kopf.Body, memo: Any, logger: Logger, **_: Any) -> None:
    """Follow the child Deployment: Ready tracks its rollout; a deleted child is recreated."""
    owner = _controller_owner(body)
    namespace = body.get("metadata", {}).get("namespace")
    deps: Dependencies | None = memo.get("deps")
    if owner is None or namespace is None or deps is None:
        return
    try:
        if event.get("type") == "DELETED":
            await request_reconcile(deps.kube, namespace, owner)
        else:
            await refresh_status(namespace, owner, deps)
    except Exception as error:
        # The next Deployment event (or the ModelApp's own reconcile) catches up.
        logger.warning("status refresh of ModelApp %s/%s failed: %s", namespace, owner, redact(str(error)))
