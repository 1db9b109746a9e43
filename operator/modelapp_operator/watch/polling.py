"""Polling, one task per endpoint: every registry host and every storage account on its own schedule.

One slow or unavailable endpoint must never delay the others (issue: a stopped Azurite made the
image polls of every app wait 16-21 s). So each endpoint (a registry host, a storage account URL)
gets its own task that re-resolves the keys followed there, with:

- a bound: a cycle waits at most `bound` seconds (default: the interval) for its answers; what has
  not answered by then is left running in the background (the single-flight fetch is shielded, and
  the clients have their own timeouts), and the next cycle joins it instead of asking again;
- backoff with jitter: after a cycle in which every key failed, the endpoint waits
  interval x 2^(failures-1), at most MAX_BACKOFF_FACTOR x interval, +/-JITTER, so a dead endpoint
  is not hammered and recovering endpoints are not hit in lockstep; the first failure is still
  seen within one interval, and the hub's failure detection puts it into the status then;
- its own concurrency limit, so a burst of keys on one endpoint cannot use up the others' slots.

A supervisor starts a task for each endpoint that gains followers, stops the ones nobody follows,
and logs one summary line per interval (`watch poll: ...`, which bench/ reads); each endpoint's
cycle is logged too (`watch poll of <endpoint>: ...`), with the time since its previous cycle.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from modelapp_operator.clients.errors import ResolutionError
from modelapp_operator.metrics import METRICS
from modelapp_operator.redact import redact
from modelapp_operator.scheduler import Scheduler, within
from modelapp_operator.watch.keys import AppKey, ImageKey, ModelKey, WatchKey
from modelapp_operator.watch.single_flight import SingleFlightCache

_log = logging.getLogger(__name__)

MAX_BACKOFF_FACTOR = 4.0
JITTER = 0.2


def endpoint_of(key: WatchKey) -> str:
    """Who answers a key: a registry host or a storage account."""
    return f"registry {key.host}" if isinstance(key, ImageKey) else f"storage {key.account_url}"


def backoff_delay(interval: float, failures: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds until an endpoint's next cycle after `failures` failing cycles in a row."""
    if failures <= 0:
        return interval
    base = min(interval * 2.0 ** (failures - 1), interval * MAX_BACKOFF_FACTOR)
    return max(0.0, base * (1.0 + JITTER * (2.0 * rand() - 1.0)))


@dataclass(frozen=True)
class EndpointCycle:
    endpoint: str
    keys: int
    errors: int
    seconds: float  # how long the cycle waited (at most the bound)
    since_previous: float | None  # seconds since the previous cycle of this endpoint started
    timed_out: bool
    failures: int  # failing cycles in a row, this one included


@dataclass(frozen=True)
class PollReport:
    """One pass of poll_once over every followed key."""

    image_keys: int
    model_keys: int
    requests: int  # requests to registries and blob services since the previous poll (all callers)
    changed_keys: int
    errors: int
    seconds: float


class PollTarget(Protocol):
    """What the poller needs from the hub."""

    def followed_keys(self) -> list[WatchKey]: ...

    async def poll_keys(self, keys: Sequence[WatchKey], limit: asyncio.Semaphore) -> int: ...

    def poll_finished(self, cycles: Sequence[EndpointCycle]) -> None: ...

    def is_active(self) -> bool: ...


class EndpointPoller:
    def __init__(
        self,
        target: PollTarget,
        interval: float,
        *,
        concurrency: int,
        bound: float | None = None,
        scheduler: Scheduler,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._target = target
        self._interval = interval
        self._bound = bound if bound is not None else interval
        self._concurrency = concurrency
        self._scheduler = scheduler
        self._rand = rand
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cycles: list[EndpointCycle] = []

    async def run(self) -> None:
        """Until cancelled: keep one task per followed endpoint; one summary per interval."""
        try:
            while True:
                endpoints = {endpoint_of(key) for key in self._target.followed_keys()}
                for endpoint in endpoints:
                    task = self._tasks.get(endpoint)
                    if task is None or task.done():
                        self._tasks[endpoint] = asyncio.create_task(
                            self._endpoint(endpoint), name=f"modelapp-watch-poll:{endpoint}"
                        )
                for endpoint in set(self._tasks) - endpoints:
                    self._tasks.pop(endpoint).cancel()
                await self._scheduler.sleep(self._interval)
                cycles, self._cycles = self._cycles, []
                self._target.poll_finished(cycles)
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _endpoint(self, endpoint: str) -> None:
        limit = asyncio.Semaphore(self._concurrency)
        failures = 0
        previous: float | None = None
        delay = self._interval
        clock = self._scheduler.time
        while True:
            await self._scheduler.sleep(delay)
            if not self._target.is_active():
                delay = self._interval  # a standby replica: the active one polls
                continue
            keys = [key for key in self._target.followed_keys() if endpoint_of(key) == endpoint]
            if not keys:
                return
            started = clock()
            timed_out = False
            try:
                errors = await within(self._scheduler, self._bound, self._target.poll_keys(keys, limit))
            except TimeoutError:
                timed_out, errors = True, len(keys)
            except Exception as error:  # the loop must outlive any bug in one cycle
                _log.error("watch poll of %s failed: %s: %s", endpoint, type(error).__name__, error)
                errors = len(keys)
            failures = failures + 1 if errors == len(keys) else 0
            cycle = EndpointCycle(
                endpoint=endpoint,
                keys=len(keys),
                errors=errors,
                seconds=clock() - started,
                since_previous=None if previous is None else started - previous,
                timed_out=timed_out,
                failures=failures,
            )
            previous = started
            self._cycles.append(cycle)
            delay = backoff_delay(self._interval, failures, self._rand)
            _log.log(
                logging.WARNING if errors else logging.INFO,
                "watch poll of %s: %d keys, %d errors%s, in %.3fs, %s after the previous; next in %.2fs",
                endpoint,
                cycle.keys,
                errors,
                " (no answer within the bound)" if timed_out else "",
                cycle.seconds,
                "-" if cycle.since_previous is None else f"{cycle.since_previous:.3f}s",
                delay,
            )


class HubPolling:
    """The hub's polling (WatchHub inherits it): per-endpoint tasks, or one pass over every key."""

    image_cache: SingleFlightCache[ImageKey, str]
    model_cache: SingleFlightCache[ModelKey, Any]
    _followers: dict[WatchKey, set[AppKey]]
    _apps: dict[AppKey, dict[WatchKey, str | None]]
    _concurrency: int
    _scheduler: Scheduler
    _stats: Any  # hub.WatchStats
    _requests_at_last_poll: int
    _changes_at_last_poll: int
    _active: Callable[[], bool]

    def is_active(self) -> bool:
        return self._active()

    async def poll_once(self) -> PollReport:
        """Re-resolve every followed key once, all endpoints together (run_polling polls each on its own)."""
        started, changes_before = self._scheduler.time(), self._stats.changes
        keys = self.followed_keys()
        errors = await self.poll_keys(keys, asyncio.Semaphore(self._concurrency))
        image_keys = sum(1 for k in keys if isinstance(k, ImageKey))
        report = PollReport(
            image_keys=image_keys,
            model_keys=len(keys) - image_keys,
            requests=self._requests_since_last_poll(),
            changed_keys=self._stats.changes - changes_before,
            errors=errors,
            seconds=self._scheduler.time() - started,
        )
        self._purge()
        self._stats.polls += 1
        METRICS.poll_duration.observe(report.seconds)
        return report

    def _purge(self) -> None:
        following = self._followers.__contains__
        self.image_cache.purge(following)
        self.model_cache.purge(following)

    def _requests_since_last_poll(self) -> int:
        total = self.image_cache.requests + self.model_cache.requests
        requests, self._requests_at_last_poll = total - self._requests_at_last_poll, total
        return requests

    async def run_polling(self, interval: float, *, bound: float | None = None) -> None:
        """Poll until cancelled, each registry host and storage account in its own task (watch/polling.py)."""
        poller = EndpointPoller(self, interval, concurrency=self._concurrency, bound=bound, scheduler=self._scheduler)
        await poller.run()

    def followed_keys(self) -> list[WatchKey]:
        """Keys someone follows and that were resolved at least once (the poller's work)."""
        images, models = self.image_cache.states, self.model_cache.states
        return [k for k in self._followers if (k in images if isinstance(k, ImageKey) else k in models)]

    async def poll_keys(self, keys: Sequence[WatchKey], limit: asyncio.Semaphore) -> int:
        """Re-resolve keys (joining fetches under way); changes and failures reach the followers. Returns errors."""
        errors = 0

        async def one(key: WatchKey) -> None:
            nonlocal errors
            async with limit:
                try:
                    if isinstance(key, ImageKey):
                        await self.image_cache.get(key, fresh=True, source="poll")
                    else:
                        await self.model_cache.get(key, fresh=True, source="poll")
                except Exception as error:
                    errors += 1
                    _log.debug("polling %s failed: %s", key.reference, describe_error(error))

        await asyncio.gather(*(one(key) for key in keys))
        return errors

    def poll_finished(self, cycles: Sequence[EndpointCycle]) -> None:
        """Once per interval: forget what nobody follows, and one summary line (bench/ reads it)."""
        self._purge()
        if not self._active():
            return
        for cycle in cycles:
            METRICS.poll_duration.observe(cycle.seconds)
        requests = self._requests_since_last_poll()
        changed, self._changes_at_last_poll = self._stats.changes - self._changes_at_last_poll, self._stats.changes
        self._stats.polls += 1
        keys = self.followed_keys()
        _log.info(
            "watch poll: %d image keys, %d model keys, %d requests since last poll, %d changed, %d errors, "
            "%d apps tracked, %d endpoint cycles, slowest in %.3fs",
            sum(1 for k in keys if isinstance(k, ImageKey)),
            sum(1 for k in keys if isinstance(k, ModelKey)),
            requests,
            changed,
            sum(c.errors for c in cycles),
            len(self._apps),
            len(cycles),
            max((c.seconds for c in cycles), default=0.0),
        )


def describe_error(error: BaseException) -> str:
    if isinstance(error, ResolutionError):
        return f"{error.reason}: {error.message}"
    return redact(f"{type(error).__name__}: {error}")[:300]
