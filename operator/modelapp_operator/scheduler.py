"""Time for the operator's own loops: one injectable scheduler for every clock reading, timer and wait.

The watch hub (cache TTLs, the coalescing window, the retries after a notification), its poller
(intervals, the bound of a cycle), the reconcile queue (retries and backoff) and the child refresher
(coalescing, rechecks of a stalled rollout) all ask a `Scheduler` instead of `time.monotonic`,
`loop.call_later` and `asyncio.sleep` each on its own. The running operator uses the event loop's
(`LOOP`); unit tests pass a virtual one whose time they move forward, so no test waits in real time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Timer(Protocol):
    """A callback scheduled for later (asyncio.TimerHandle is one)."""

    def cancel(self) -> None: ...


class Scheduler(Protocol):
    def time(self) -> float:
        """Monotonic seconds."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...

    async def sleep(self, delay: float) -> None: ...


class LoopScheduler:
    """The running event loop's time, timers and sleeps."""

    def time(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(delay)


LOOP = LoopScheduler()


async def within(scheduler: Scheduler, seconds: float, awaitable: Awaitable[T]) -> T:
    """What `awaitable` returns, or TimeoutError once `seconds` have passed on the scheduler's clock
    (the work is cancelled then, as asyncio.timeout does)."""
    task = asyncio.ensure_future(awaitable)
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = scheduler.call_later(seconds, expire)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if expired and (current is None or not current.cancelling()):
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()
