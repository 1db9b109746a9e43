"""The hub's caching resolvers, and recording what one reconcile resolved as that ModelApp's subscription.

`CachingImageResolver` / `CachingModelResolver` implement the same Protocols as the registry and
blob clients and answer through the hub's single-flight caches. Inside `track_resolutions`,
what they resolve (and the version seen) becomes the ModelApp's subscription. Their requests count
as a reconcile's own (`Source` "reconcile") unless `asked_by` names who the reconcile runs for (a
poll or a webhook that learned a change).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, Self, TypeVar

from modelapp_contract.blob import normalize_etag
from modelapp_operator.api.modelapp_types import BlobLocation
from modelapp_operator.clients.blob_storage import BlobCredential, BlobProperties, ModelResolver
from modelapp_operator.clients.registry import ImageResolver, RegistryCredentials
from modelapp_operator.metrics import Source
from modelapp_operator.watch.keys import AppKey, ImageKey, ModelKey, WatchKey, image_key, model_key
from modelapp_operator.watch.single_flight import SingleFlightCache


class Subscriptions(Protocol):
    """Where a recording ends up (the WatchHub)."""

    def track(self, app: AppKey, *, seen: Mapping[WatchKey, str | None]) -> None: ...


K = TypeVar("K", ImageKey, ModelKey)
V = TypeVar("V")


@dataclass
class _Recording:
    subscriptions: Subscriptions
    seen: dict[WatchKey, str | None] = field(default_factory=dict)


_RECORDING: ContextVar[_Recording | None] = ContextVar("modelapp_watch_recording", default=None)


def _record(subscriptions: Subscriptions, key: WatchKey, version: str | None) -> None:
    recording = _RECORDING.get()
    if recording is not None and recording.subscriptions is subscriptions:
        recording.seen[key] = version


@contextlib.contextmanager
def track_resolutions(subscriptions: Subscriptions | None, app: AppKey) -> Iterator[None]:
    """Make what the hub's resolvers resolve inside this block the app's subscription.

    Usage in reconcile: `with track_resolutions(deps.watch, (ns, name)): await gather(...)`.
    Tasks started inside (asyncio.gather) inherit the context, so both resolutions count.
    Only a block that completes replaces the subscription."""
    if subscriptions is None:
        yield
        return
    recording = _Recording(subscriptions)
    token = _RECORDING.set(recording)
    try:
        yield
    finally:
        _RECORDING.reset(token)
    subscriptions.track(app, seen=recording.seen)


# --- the resolvers -----------------------------------------------------------------------------------


class _CachingResolver(Generic[K, V]):
    """Answers through one of the hub's caches and records each answer for track_resolutions."""

    def __init__(
        self, subscriptions: Subscriptions, cache: SingleFlightCache[K, V], inner: Any, version_of: Callable[[V], str]
    ) -> None:
        self._subscriptions = subscriptions
        self._cache: SingleFlightCache[K, V] = cache
        self._version_of = version_of
        self.inner = inner
        self.source: Source = "reconcile"

    def asked_by(self, source: Source) -> Self:
        """The same resolver (same cache, same recording) whose requests count as `source`'s."""
        view = copy.copy(self)
        view.source = source
        return view

    async def _get(self, key: K, fetch: Callable[[], Awaitable[V]]) -> V:
        try:
            value = await self._cache.get(key, fetch, source=self.source)
        except Exception:
            _record(self._subscriptions, key, None)
            raise
        _record(self._subscriptions, key, self._version_of(value))
        return value

    async def close(self) -> None:
        """Close the wrapped resolver (the operator's clean-up closes deps.images / deps.models)."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()

    def invalidate(self, key: K) -> None:
        self._cache.invalidate(key)


class CachingImageResolver(_CachingResolver[ImageKey, str]):
    """ImageResolver through the hub's image cache."""

    def __init__(self, subscriptions: Subscriptions, cache: SingleFlightCache[ImageKey, str], inner: ImageResolver):
        super().__init__(subscriptions, cache, inner, version_of=lambda digest: digest)
        self.inner: ImageResolver = inner

    async def resolve(self, repository: str, tag: str, credentials: RegistryCredentials | None) -> str:
        inner = self.inner

        async def fetch() -> str:
            return await inner.resolve(repository, tag, credentials)

        return await self._get(image_key(repository, tag, credentials), fetch)


class CachingModelResolver(_CachingResolver[ModelKey, BlobProperties]):
    """ModelResolver through the hub's model cache."""

    def __init__(
        self, subscriptions: Subscriptions, cache: SingleFlightCache[ModelKey, BlobProperties], inner: ModelResolver
    ) -> None:
        super().__init__(subscriptions, cache, inner, version_of=lambda properties: normalize_etag(properties.etag))
        self.inner: ModelResolver = inner

    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        inner = self.inner

        async def fetch() -> BlobProperties:
            return await inner.get_properties(location, credential)

        return await self._get(model_key(location, credential), fetch)
