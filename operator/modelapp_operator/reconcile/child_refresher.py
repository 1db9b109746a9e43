"""Status refreshes from child Deployment events: newest copy only, one at a time per ModelApp."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from modelapp_operator.clients.kube import ConflictError
from modelapp_operator.reconcile.reconciler import Dependencies, refresh_status
from modelapp_operator.redact import redact
from modelapp_operator.watch.keys import AppKey

Logger = logging.Logger | logging.LoggerAdapter[Any]

CHILD_REFRESH_COALESCE_SECONDS = 1.0
CHILD_REFRESH_CONFLICT_ATTEMPTS = 5


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
            conflicts = 0
            while (deployment := self._pending.pop(app, None)) is not None:
                try:
                    await refresh_status(namespace, name, self._deps, deployment_seen=deployment)
                except ConflictError:
                    # The ModelApp changed since it was read: refresh again from a fresh read.
                    conflicts += 1
                    if conflicts <= CHILD_REFRESH_CONFLICT_ATTEMPTS:
                        self._pending.setdefault(app, deployment)
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
