"""The one door into reconcile: every trigger submits `(key, trigger)` here, and only this queue runs it.

The triggers: a ModelApp watch event that asks for a reconcile (handlers.py, through `observe`), a
tag or blob change the watch hub learned (poll, webhook), a child Deployment that drifted or whose
rollout missed its deadline (the child refresher), a deleted child (handlers.py). The queue keeps at
most one pending request and one running reconcile per ModelApp, so reconciles of one ModelApp never
overlap and need no lock; it retries on our own backoff (its timers on an injectable scheduler), and
runs nothing on a standby replica.

Why not kopf's create/update/resume handlers: at scale they cost more than the reconcile they call.
On every event of every ModelApp (most of them the MODIFIED events our own status writes cause)
kopf detected causes and deep-copied the body for its diff base, and after each handled change it
PATCHed its `last-handled-configuration` annotation (py-spy and the API server's request counts in
bench/scale.py, 1,000 ModelApps: about three times the reconcile's own CPU, and one extra write per
ModelApp). `wants_reconcile` (pure) tells the events that ask for a reconcile from the ones our own
writes cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from modelapp_operator.names import ANNOTATION_RECONCILE_REQUEST
from modelapp_operator.reconcile.caches import generation_of
from modelapp_operator.reconcile.reconciler import (
    NotLeading,
    PermanentReconcileError,
    ReconcileResult,
    TemporaryReconcileError,
    Trigger,
)
from modelapp_operator.redact import redact
from modelapp_operator.scheduler import LOOP, Scheduler, Timer
from modelapp_operator.watch.keys import AppKey

Logger = logging.Logger | logging.LoggerAdapter[Any]

# A bug or an API hiccup (not one of our own errors, e.g. the API server restarting): retried after
# this, doubling up to the cap.
UNEXPECTED_ERROR_DELAY = 2.0
UNEXPECTED_ERROR_MAX_DELAY = 300.0
STANDBY_RECHECK_SECONDS = 2.0


@dataclass(frozen=True)
class Handled:
    """What a ModelApp looked like when it was last queued: what a later event is compared with."""

    generation: int
    reconcile_request: str | None


def handled_state(body: Mapping[str, Any]) -> Handled:
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return Handled(generation_of(body), annotations.get(ANNOTATION_RECONCILE_REQUEST))


def wants_reconcile(body: Mapping[str, Any], last: Handled | None) -> bool:
    """Whether this watch event asks for a reconcile: the first sight of the ModelApp (created, or
    listed at start-up), a spec change (metadata.generation), or a reconcile request (its annotation).
    Status writes, labels and other annotations do not: they change nothing we render."""
    return last is None or handled_state(body) != last


def reconcile_requested(body: Mapping[str, Any], last: Handled | None) -> bool:
    """Whether the event carries a new reconcile request (resolve the tag and blob afresh, not from cache)."""
    return last is not None and handled_state(body).reconcile_request != last.reconcile_request


Reconcile = Callable[[AppKey, Trigger], Awaitable[ReconcileResult]]


class ReconcileQueue:
    """At most one running reconcile and one pending request per ModelApp; retries on backoff.

    A new request for a ModelApp that waits out a retry runs at once (a person who fixed the spec
    or the Secret should not wait out the old delay); requests that arrive while its reconcile
    runs make one more run after it. A pending request keeps the trigger of its first submission
    (the one that made it pending); a retry keeps the trigger of the run it repeats."""

    def __init__(
        self,
        reconcile: Reconcile,
        logger: Logger,
        *,
        scheduler: Scheduler = LOOP,
        on_gone: Callable[[AppKey], None] | None = None,
    ) -> None:
        """on_gone: called when a reconcile finds the ModelApp gone (its watch event may never come: a
        watch restarted across the deletion), to forget what everyone keeps for it (runtime.Runtime.forget)."""
        self._reconcile = reconcile
        self._logger = logger
        self._scheduler = scheduler
        self._on_gone = on_gone
        self._pending: dict[AppKey, Trigger] = {}
        self._tasks: dict[AppKey, asyncio.Task[None]] = {}
        self._retries: dict[AppKey, Timer] = {}
        self._unexpected_delays: dict[AppKey, float] = {}
        self._last: dict[AppKey, Handled] = {}
        self._active: Callable[[], bool] = lambda: True
        # A standby's requests wait here, all behind one timer (not one retry each: a standby sees every
        # ModelApp's events too), and run once this replica leads.
        self._parked: dict[AppKey, Trigger] = {}
        self._unpark: Timer | None = None

    def set_active_check(self, active: Callable[[], bool]) -> None:
        """Two replicas: only the one holding the leader Lease reconciles (leader.LeaderElector.leading). A
        request on a standby (every watch event: both replicas watch; a retry due from when it led) waits
        until it leads; a reconcile under way when the Lease is lost stops at its next write (NotLeading)."""
        self._active = active

    def observe(self, key: AppKey, body: Mapping[str, Any]) -> bool:
        """A watch event of the ModelApp: queue a reconcile if it asks for one. Returns whether it did."""
        last = self._last.get(key)
        if not wants_reconcile(body, last):
            return False
        self._last[key] = handled_state(body)
        self.submit(key, "event")
        return True

    def requested(self, key: AppKey, body: Mapping[str, Any]) -> bool:
        """Whether this event of a ModelApp seen before carries a new reconcile request."""
        return reconcile_requested(body, self._last.get(key))

    def submit(self, key: AppKey, trigger: Trigger) -> None:
        """The door: reconcile this ModelApp (now, or after the run under way), because of `trigger`."""
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()
        self._pending.setdefault(key, trigger)
        if key not in self._tasks:
            self._tasks[key] = asyncio.create_task(self._drain(key), name=f"reconcile {key[0]}/{key[1]}")

    def _next_unexpected_delay(self, key: AppKey) -> float:
        delay = self._unexpected_delays.get(key, UNEXPECTED_ERROR_DELAY / 2) * 2
        self._unexpected_delays[key] = min(delay, UNEXPECTED_ERROR_MAX_DELAY)
        return self._unexpected_delays[key]

    def forget(self, key: AppKey) -> None:
        """The ModelApp is gone: drop its retry and what it was last seen as."""
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()
        self._pending.pop(key, None)
        self._parked.pop(key, None)
        self._last.pop(key, None)
        self._unexpected_delays.pop(key, None)

    @property
    def waiting_retries(self) -> int:
        return len(self._retries)

    @property
    def parked(self) -> int:
        """Requests a standby keeps for when it leads."""
        return len(self._parked)

    def _park(self, key: AppKey, trigger: Trigger) -> None:
        self._parked.setdefault(key, trigger)
        if self._unpark is None:
            self._unpark = self._scheduler.call_later(STANDBY_RECHECK_SECONDS, self._run_parked)

    def _run_parked(self) -> None:
        self._unpark = None
        if not self._active():
            if self._parked:
                self._unpark = self._scheduler.call_later(STANDBY_RECHECK_SECONDS, self._run_parked)
            return
        parked, self._parked = self._parked, {}
        for key, trigger in parked.items():
            self.submit(key, trigger)

    async def _drain(self, key: AppKey) -> None:
        try:
            while key in self._pending:
                trigger = self._pending.pop(key)
                again = await self._run(key, trigger)
                if again is not None and key not in self._pending:
                    delay, trigger = again
                    self._retries[key] = self._scheduler.call_later(delay, functools.partial(self.submit, key, trigger))
        finally:
            del self._tasks[key]

    async def _run(self, key: AppKey, trigger: Trigger) -> tuple[float, Trigger] | None:
        """One reconcile; returns when to run it again and why (a retry, the gate's next look), or None."""
        namespace, name = key
        if not self._active():
            self._park(key, trigger)  # kept, not dropped: it runs once this replica leads
            return None
        try:
            result = await self._reconcile(key, trigger)
        except NotLeading:
            self._logger.info("%s/%s: not the leader any more: nothing written (%s)", namespace, name, trigger)
            self._park(key, trigger)
            return None
        except PermanentReconcileError as error:
            self._logger.warning("%s/%s: %s (waiting for the ModelApp to change)", namespace, name, error)
        except TemporaryReconcileError as error:
            self._logger.info("%s/%s: %s (retrying in %gs)", namespace, name, error, error.delay)
            self._unexpected_delays.pop(key, None)
            return error.delay, trigger
        except Exception as error:
            # A bug or an API hiccup: log it (redacted) and retry with backoff; never let it stop the queue.
            delay = self._next_unexpected_delay(key)
            self._logger.error(
                "%s/%s: reconcile failed: %s: %s (retrying in %gs)",
                namespace,
                name,
                type(error).__name__,
                redact(str(error)),
                delay,
            )
            return delay, trigger
        else:
            self._unexpected_delays.pop(key, None)
            if not result.found:
                self.forget(key)
                if self._on_gone is not None:
                    self._on_gone(key)
            else:
                applied = ", ".join(result.applied) or "nothing to apply"
                if result.applied or trigger != "gate":  # the gate's ticks log only what they change
                    self._logger.info("%s/%s: reconciled: %s (%s)", namespace, name, applied, trigger)
                if result.recheck_after is not None:
                    return result.recheck_after, "gate"
        return None

    async def close(self) -> None:
        unpark = [self._unpark] if self._unpark is not None else []
        await stop_all([*self._retries.values(), *unpark], self._tasks.values())
        self._retries.clear()
        self._pending.clear()
        self._parked.clear()
        self._unpark = None


async def stop_all(timers: Iterable[Timer], tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel the timers and the tasks, and wait for the tasks to end."""
    for timer in timers:
        timer.cancel()
    running = list(tasks)
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task
