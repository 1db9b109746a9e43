"""A per-key cache whose concurrent misses share one fetch (single-flight), one per kind of key.

Values expire after a TTL (errors the resolver marks as cacheable after a shorter one);
`invalidate` makes older fetches unable to satisfy new callers; every successful fetch
reports the key's new version to `on_success` (the hub's change detection), every failure to `on_failure`,
each with the `Source` that started the fetch (poll, webhook, reconcile: passed by the caller of `get`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from modelapp_operator.metrics import METRICS, Source
from modelapp_operator.watch.keys import ImageKey, ModelKey

K = TypeVar("K", ImageKey, ModelKey)
V = TypeVar("V")


@dataclass
class _Outcome(Generic[V]):
    value: V | None = None
    version: str | None = None
    error: Exception | None = None


@dataclass
class _KeyState(Generic[V]):
    fetch: Callable[[], Awaitable[V]]
    value: V | None = None  # newest successful value
    version: str | None = None  # its digest / normalized ETag
    value_generation: int = -1
    outcome: _Outcome[V] | None = None  # newest outcome, served from the cache until expires_at
    outcome_generation: int = -1
    expires_at: float = 0.0
    generation: int = 0  # bumped by invalidate(): older fetches no longer satisfy new callers
    inflight: asyncio.Task[_Outcome[V]] | None = None
    inflight_generation: int = -1
    inflight_expect: str | None = None
    last_used: float = 0.0


class SingleFlightCache(Generic[K, V]):
    """Per-key cache with single-flight fetches; one per kind (images, models)."""

    def __init__(
        self,
        *,
        version_of: Callable[[V], str],
        on_success: Callable[[K, str, Source], None],
        on_failure: Callable[[K, Exception, Source], None] | None = None,
        ttl: float,
        error_ttl: float,
        cacheable_errors: tuple[type[Exception], ...],
        clock: Callable[[], float],
    ) -> None:
        self.states: dict[K, _KeyState[V]] = {}
        self.requests = 0
        self.ttl = ttl
        self._version_of = version_of
        self._on_success: Callable[[K, str, Source], None] = on_success
        self._on_failure: Callable[[K, Exception, Source], None] | None = on_failure
        self._error_ttl = error_ttl
        self._cacheable = cacheable_errors
        self._clock = clock

    def version(self, key: K) -> str | None:
        state = self.states.get(key)
        return state.version if state else None

    def invalidate(self, key: K) -> None:
        state = self.states.get(key)
        if state is not None:
            state.generation += 1

    async def get(
        self,
        key: K,
        fetch: Callable[[], Awaitable[V]] | None = None,
        *,
        fresh: bool = False,
        expect: str | None = None,
        source: Source = "reconcile",
    ) -> V:
        """The value for key.

        source: who asks (a fetch this call starts is counted and reported as theirs).
        fresh: skip the cache but join a fetch already under way (the poll loop).
        expect: a version an event announced; when it is already known, or a fetch started
        for the same announcement is under way, no new request is made; otherwise the
        key is invalidated and fetched again."""
        state = self.states.get(key)
        if state is None:
            if fetch is None:
                raise KeyError(key)
            state = self.states[key] = _KeyState(fetch=fetch)
        elif fetch is not None:
            state.fetch = fetch  # newest arguments (same key, so the same credentials)
        now = self._clock()
        state.last_used = now
        if expect is not None:
            if state.version == expect and state.value is not None:
                return state.value
            joinable = state.inflight is not None and state.inflight_generation == state.generation
            if not (joinable and state.inflight_expect == expect):
                state.generation += 1
        elif (
            not fresh
            and state.outcome is not None
            and state.outcome_generation == state.generation
            and state.expires_at > now
        ):
            return self._unwrap(state.outcome)
        task = state.inflight
        if task is None or state.inflight_generation != state.generation:
            task = self._start(key, state, expect, source)
        return self._unwrap(await asyncio.shield(task))

    def _start(self, key: K, state: _KeyState[V], expect: str | None, source: Source) -> asyncio.Task[_Outcome[V]]:
        generation = state.generation
        task = asyncio.create_task(self._fetch(key, state, generation, source), name=f"modelapp-watch-fetch:{key}")
        state.inflight, state.inflight_generation, state.inflight_expect = task, generation, expect
        return task

    async def _fetch(self, key: K, state: _KeyState[V], generation: int, source: Source) -> _Outcome[V]:
        self.requests += 1
        outcome: _Outcome[V]
        try:
            value = await state.fetch()
        except Exception as error:  # handed to every waiter; never lost as "exception never retrieved"
            outcome = _Outcome(error=error)
            ttl = self._error_ttl if isinstance(error, self._cacheable) else 0.0
        else:
            outcome = _Outcome(value=value, version=self._version_of(value))
            ttl = self.ttl
        finally:
            if state.inflight is asyncio.current_task():
                state.inflight = None
        METRICS.upstream_request(key, failed=outcome.error is not None, source=source)
        if generation >= state.outcome_generation:
            state.outcome, state.outcome_generation = outcome, generation
            state.expires_at = self._clock() + ttl
        if outcome.version is not None and generation >= state.value_generation:
            state.value, state.version, state.value_generation = outcome.value, outcome.version, generation
            self._on_success(key, outcome.version, source)
        if outcome.error is not None and generation >= state.value_generation and self._on_failure is not None:
            self._on_failure(key, outcome.error, source)
        return outcome

    @staticmethod
    def _unwrap(outcome: _Outcome[V]) -> V:
        if outcome.error is not None:
            # One error object is shared by many waiters: drop the previous raise's traceback.
            raise outcome.error.with_traceback(None)
        assert outcome.value is not None
        return outcome.value

    def purge(self, keep: Callable[[K], bool]) -> int:
        """Forget keys nobody follows once their cache entry has expired."""
        now = self._clock()
        stale = [
            key
            for key, state in self.states.items()
            if not keep(key)
            and state.inflight is None
            and state.expires_at <= now
            and state.last_used + self.ttl <= now
        ]
        for key in stale:
            del self.states[key]
        return len(stale)

    async def cancel_all(self) -> None:
        tasks = [s.inflight for s in self.states.values() if s.inflight is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
