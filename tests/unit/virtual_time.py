"""A virtual scheduler for unit tests: the operator's `Scheduler` (modelapp_operator/scheduler.py) whose time
moves only when a test says so.

`advance(seconds)` fires the timers (and wakes the sleeps) due within that time, in order, letting the
event loop run what they started after each; `settle()` only lets the loop run what is ready. No test
that uses it waits in real time, and none depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

# Loop turns that `settle` gives ready tasks: a change travels through a few tasks and futures (a
# notification, its fetch job, the shared fetch, the hub's callbacks), each one turn or two.
SETTLE_TURNS = 100


@dataclass(order=True)
class VirtualTimer:
    when: float
    order: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class VirtualScheduler:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self._timers: list[VirtualTimer] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> VirtualTimer:
        timer = VirtualTimer(self.now + max(0.0, delay), next(self._order), callback)
        heapq.heappush(self._timers, timer)
        return timer

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)  # a turn of the loop, as asyncio.sleep(0) is
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        timer = self.call_later(delay, wake)
        try:
            await woken
        finally:
            timer.cancel()

    @property
    def timers(self) -> int:
        """Timers and sleeps not yet due (cancelled ones aside)."""
        return sum(1 for timer in self._timers if not timer.cancelled)

    async def settle(self) -> None:
        """Let the tasks that are ready run (time does not move)."""
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)

    async def advance(self, seconds: float = 0.0) -> None:
        """Move time forward, firing what falls due on the way, in order (seconds 0: what is due now)."""
        end = self.now + seconds
        await self.settle()
        while self._timers and self._timers[0].when <= end:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.now = max(self.now, timer.when)
            timer.callback()
            await self.settle()
        self.now = end
        await self.settle()
