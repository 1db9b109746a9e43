"""Status refreshes from child Deployment events: newest copy only, one at a time per ModelApp.

A refresh writes the rollout part of the status itself (Ready follows the pods); when it finds the
Deployment drifted or its rollout past the deadline, it submits a reconcile (drift, rollback) to the
queue like every other trigger. Waits and rechecks run on an injectable scheduler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from modelapp_operator.clients.kube import ConflictError
from modelapp_operator.plan.pods import next_recheck_delay
from modelapp_operator.reconcile.deps import Dependencies
from modelapp_operator.reconcile.queue import stop_all
from modelapp_operator.reconcile.reconciler import Refresh, Trigger, refresh_status
from modelapp_operator.redact import redact
from modelapp_operator.scheduler import LOOP, Scheduler, Timer
from modelapp_operator.watch.keys import AppKey

Logger = logging.Logger | logging.LoggerAdapter[Any]
RefreshStatus = Callable[[AppKey, Dependencies, Mapping[str, Any] | None], Awaitable[Refresh]]
Submit = Callable[[AppKey, Trigger], None]

CHILD_REFRESH_COALESCE_SECONDS = 1.0
CHILD_REFRESH_CONFLICT_ATTEMPTS = 5


class _Watched:
    """A pending refresh from a Deployment event whose copy the watch's index keeps: read there when it runs."""


WATCHED = _Watched()


class ChildRefresher:
    """Status refreshes from child Deployment events, newest copy only, one at a time per ModelApp.

    kopf hands a resource's events to its handler one by one and queues the rest, each a
    full parsed Deployment. A handler that waited its turn (the bound on requests in flight)
    let those queues grow with every rollout step of every Deployment: the operator's memory
    peak. Here an event only replaces the pending copy for its ModelApp, and one task per
    ModelApp refreshes from the newest copy it finds. With the operator's indexes that copy is
    not kept here at all (a parsed Deployment is ~23 KiB; at a cold start of 10,000 ModelApps
    thousands wait for the refreshes' bound): the refresh reads the index's compact copy of the
    Deployment, which kopf updated before handing over the event, so it is as new or newer."""

    def __init__(
        self,
        deps: Dependencies,
        submit: Submit,
        logger: Logger,
        *,
        scheduler: Scheduler = LOOP,
        refresh: RefreshStatus = refresh_status,
    ) -> None:
        self._deps = deps
        self._submit = submit
        self._logger = logger
        self._scheduler = scheduler
        self._refresh = refresh
        # None: read the Deployment again (a recheck of a stalled rollout's pods); WATCHED: the index's copy.
        self._pending: dict[AppKey, Mapping[str, Any] | _Watched | None] = {}
        self._tasks: dict[AppKey, asyncio.Task[None]] = {}
        self._rechecks: dict[AppKey, tuple[float, Timer]] = {}

    def submit(self, app: AppKey, deployment: Mapping[str, Any] | None) -> None:
        watched = deployment is not None and self._deps.state.children.enabled
        self._pending[app] = WATCHED if watched else deployment
        if app not in self._tasks:
            self._tasks[app] = asyncio.create_task(self._drain(app), name=f"refresh {app[0]}/{app[1]}")

    async def _drain(self, app: AppKey) -> None:
        try:
            # A new Deployment reports several rollout steps within a second: wait for the
            # newest, so the API server spends its time on reconciles rather than on refreshes.
            await self._scheduler.sleep(CHILD_REFRESH_COALESCE_SECONDS)
            conflicts = 0
            status: dict[str, Any] | None = None
            failed = False
            while app in self._pending:
                pending = self._pending.pop(app)
                deployment: Mapping[str, Any] | None
                if isinstance(pending, _Watched):
                    deployment = self._deps.state.children.get("Deployment", *app)
                    if deployment is None:
                        continue  # deleted meanwhile: its DELETED event recreates it
                else:
                    deployment = pending
                try:
                    refreshed = await self._refresh(app, self._deps, deployment)
                except ConflictError:
                    # The ModelApp changed since it was read: refresh again from a fresh read.
                    conflicts += 1
                    if conflicts <= CHILD_REFRESH_CONFLICT_ATTEMPTS:
                        self._pending.setdefault(app, pending)
                except Exception as error:
                    # Tried again after a backoff (or at the next Deployment event, whichever comes first).
                    self._logger.warning("status refresh of ModelApp %s/%s failed: %s", *app, redact(str(error)))
                    failed = True
                else:
                    status, failed = refreshed.status, False
                    if refreshed.reconcile is not None:
                        self._submit(app, refreshed.reconcile)
            self._schedule_recheck(app, status, failed=failed)
        finally:
            del self._tasks[app]

    def _schedule_recheck(self, app: AppKey, status: Mapping[str, Any] | None, *, failed: bool = False) -> None:
        previous = self._rechecks.pop(app, None)
        if previous is not None:
            previous[1].cancel()
        delay = next_recheck_delay(status, previous[0] if previous is not None else None, failed=failed)
        if delay is not None:
            self._rechecks[app] = (delay, self._scheduler.call_later(delay, lambda: self._recheck(app)))

    def _recheck(self, app: AppKey) -> None:
        if app not in self._pending:
            self.submit(app, None)

    def forget(self, app: AppKey) -> None:
        """The ModelApp is gone: no recheck, no pending copy (a refresh under way finds it gone)."""
        recheck = self._rechecks.pop(app, None)
        if recheck is not None:
            recheck[1].cancel()
        self._pending.pop(app, None)

    async def close(self) -> None:
        await stop_all((timer for _, timer in self._rechecks.values()), self._tasks.values())
        self._rechecks.clear()
        self._pending.clear()
