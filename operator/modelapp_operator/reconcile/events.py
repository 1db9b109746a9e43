"""Kubernetes events posted in the background, a few at a time, so they never hold up a rollout.

As client-go's event recorder does: a reconcile records its events and goes on; a small, fixed number
of workers takes them in the order recorded and posts them, each with the time it was recorded (with
more than one worker, two events may reach the API server in either order; their times tell which came
first). On a cold start of 1,000 ModelApps the two events each
(RolloutStarted, Ready) were 2,000 POSTs made inside the reconciles, competing with the applies for
the API server; here they take at most EVENT_WORKERS requests in flight and drain behind the applies.
An event that cannot be posted is logged and dropped (it never fails a reconcile).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from modelapp_operator.clients.kube import EventType
from modelapp_operator.redact import redact

_log = logging.getLogger(__name__)

EVENT_WORKERS = 2
# Beyond this many unposted events (an API server down for long), new ones are dropped and counted.
EVENT_BACKLOG_LIMIT = 10_000
CLOSE_FLUSH_SECONDS = 2.0

PostEvent = Callable[[Mapping[str, Any], EventType, str, str, datetime], Awaitable[None]]
_Event = tuple[Mapping[str, Any], EventType, str, str, datetime]


class EventRecorder:
    def __init__(self, post: PostEvent, *, workers: int = EVENT_WORKERS, backlog: int = EVENT_BACKLOG_LIMIT) -> None:
        self._post = post
        self._workers = workers
        self._queue: asyncio.Queue[_Event] = asyncio.Queue(maxsize=backlog)
        self._tasks: list[asyncio.Task[None]] = []
        self.dropped = 0

    def record(self, involved: Mapping[str, Any], type_: EventType, reason: str, message: str) -> None:
        """Queue one event (its time is now, whenever it is posted)."""
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._work(), name=f"event poster {n}") for n in range(self._workers)]
        try:
            self._queue.put_nowait((involved, type_, reason, message, datetime.now(UTC)))
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                _log.warning("%d event(s) dropped: the API server takes them slower than they come", self.dropped)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def _work(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._post(*event)
            except Exception as error:
                involved = event[0].get("metadata") or {}
                _log.warning(
                    "event %s for %s/%s not posted: %s",
                    event[2],
                    involved.get("namespace"),
                    involved.get("name"),
                    redact(str(error)),
                )
            finally:
                self._queue.task_done()

    async def close(self) -> None:
        """Post what is queued (for at most CLOSE_FLUSH_SECONDS), then stop."""
        if self._tasks:
            try:
                await asyncio.wait_for(self._queue.join(), CLOSE_FLUSH_SECONDS)
            except TimeoutError:
                _log.info("%d event(s) not posted at shutdown", self._queue.qsize())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
