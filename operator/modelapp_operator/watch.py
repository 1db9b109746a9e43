"""The watch hub: one place that knows which image tags and model blobs the ModelApps follow.

Why a hub: 1,000 ModelApps sharing 10 images and 10 models must cost 20 requests per
poll interval, not 2,000. So every resolution goes through a cache keyed by what is
asked (registry host, repository, tag, credentials / account, container, blob,
credentials), with single-flight: concurrent calls for one key share one request.

- `CachingImageResolver` / `CachingModelResolver` (`hub.images`, `hub.models`) implement
  the same Protocols as registry.py / blobs.py and wrap the real resolvers.
- Subscriptions: reconcile resolves inside `track_resolutions(hub, (namespace, name))`;
  the keys it resolved, and the version it saw for each, become that app's subscription
  (replacing the previous one: a ModelApp that moves to another tag stops following the
  old one). `hub.track` / `hub.untrack` do the same explicitly.
- Change detection: whenever any fetch of a key succeeds (poll loop, webhook
  notification, a reconcile's cache miss) and the version differs from what a
  subscribed app last saw, that app is asked to reconcile (`on_change`, which the
  wiring maps to `request_reconcile`).
- Coalescing: requests wait `coalesce_seconds` after the first change of a batch, so an
  image and a model changed together become one reconcile request, hence one rollout.
  The reconcile re-resolves both from the (already refreshed) cache. Trade-off: every
  change is delayed by up to the window; changes further apart than the window plus the
  reconcile's own latency roll twice (the Deployment controller then goes straight to
  the newest template). The default (0.2 s) keeps webhook push-to-rollout p50 well
  under a second; publishers that upload model and image seconds apart should raise it
  (MODELAPP_CHANGE_COALESCE_SECONDS).
- `notify_image_pushed` / `notify_blob_changed` are the receiver's entry points: they
  re-resolve the matching keys (a flood of events for one push costs one request: an
  event whose digest/ETag is already known or already being fetched joins that fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import unquote, urlsplit

from modelapp_operator.blobs import (
    BlobCredential,
    BlobProperties,
    ConnectionStringCredential,
    ModelResolutionError,
    ModelResolver,
)
from modelapp_operator.build import normalize_etag
from modelapp_operator.config import ConfigError
from modelapp_operator.errors import ResolutionError
from modelapp_operator.model import BlobLocation
from modelapp_operator.redact import redact
from modelapp_operator.registry import ImageResolutionError, ImageResolver, RegistryCredentials

_log = logging.getLogger(__name__)

AppKey = tuple[str, str]  # (namespace, name)
ChangeCallback = Callable[[AppKey], Awaitable[None]]

DEFAULT_COALESCE_SECONDS = 0.2
DEFAULT_CONCURRENCY = 16
DEFAULT_ERROR_TTL_SECONDS = 5.0
# After an event: retry until the service shows the announced version (it may lag its own event).
NOTIFY_RETRY_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


# --- keys ------------------------------------------------------------------------------------


def _secret_id(*parts: str) -> str:
    """A stable, non-reversible identity for credentials (never the credentials themselves)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ImageKey:
    host: str  # registry host[:port], lowercased
    path: str  # repository path inside the registry
    tag: str
    credentials_id: str  # "" for anonymous / the operator's own identity

    @property
    def reference(self) -> str:
        return f"{self.host}/{self.path}:{self.tag}"


@dataclass(frozen=True)
class ModelKey:
    account_url: str  # normalized: lowercased scheme and host, no trailing slash
    container: str
    blob: str
    credentials_id: str  # "operator-identity" or a hash of the connection string

    @property
    def account_name(self) -> str:
        return account_name_of(self.account_url)

    @property
    def reference(self) -> str:
        return f"{self.account_url}/{self.container}/{self.blob}"


WatchKey = ImageKey | ModelKey


def image_key(repository: str, tag: str, credentials: RegistryCredentials | None) -> ImageKey:
    host, _, path = repository.partition("/")
    identity = _secret_id(credentials.username, credentials.password) if credentials else ""
    return ImageKey(host.lower(), path, tag, identity)


def normalize_account_url(url: str) -> str:
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def _path_style(host: str) -> bool:
    """Azurite and other emulators put the account in the path: http://127.0.0.1:10000/<account>/..."""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def account_name_of(account_url: str) -> str:
    parts = urlsplit(account_url)
    segments = [s for s in parts.path.split("/") if s]
    if segments:
        return segments[0].lower()
    return (parts.hostname or "").split(".", 1)[0].lower()


def model_key(location: BlobLocation, credential: BlobCredential) -> ModelKey:
    if isinstance(credential, ConnectionStringCredential):
        identity = "connection-string:" + _secret_id(credential.connection_string)
    else:
        identity = "operator-identity"
    return ModelKey(normalize_account_url(location.account_url), location.container, location.name, identity)


@dataclass(frozen=True)
class BlobAddress:
    account_url: str  # normalized
    container: str
    blob: str

    @property
    def account_name(self) -> str:
        return account_name_of(self.account_url)


def parse_blob_url(url: str) -> BlobAddress | None:
    """Split a blob URL into account URL, container and blob name; None when it is not one.

    https://acct.blob.core.windows.net/c/a/b.onnx -> (https://acct.blob.core.windows.net, c, a/b.onnx);
    http://127.0.0.1:10000/devstoreaccount1/c/b.onnx -> (http://127.0.0.1:10000/devstoreaccount1, c, b.onnx).
    Data Lake (dfs) URLs name the same blob as the blob endpoint."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if parts.scheme.lower() not in ("http", "https") or not host:
        return None
    netloc = parts.netloc.lower().replace(".dfs.core.", ".blob.core.")
    segments = [unquote(s) for s in parts.path.split("/")]
    segments = segments[1:] if segments and segments[0] == "" else segments
    base = f"{parts.scheme.lower()}://{netloc}"
    if _path_style(host):
        if len(segments) < 3 or not segments[0]:
            return None
        base, segments = f"{base}/{segments[0]}", segments[1:]
    if len(segments) < 2 or not segments[0] or not all(segments[1:]):
        return None
    return BlobAddress(base, segments[0], "/".join(segments[1:]))


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchConfig:
    coalesce_seconds: float = DEFAULT_COALESCE_SECONDS
    concurrency: int = DEFAULT_CONCURRENCY
    error_ttl_seconds: float = DEFAULT_ERROR_TTL_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WatchConfig:
        return cls(
            coalesce_seconds=_float(environ, "MODELAPP_CHANGE_COALESCE_SECONDS", DEFAULT_COALESCE_SECONDS, 0.0, 60.0),
            concurrency=int(_float(environ, "MODELAPP_WATCH_CONCURRENCY", DEFAULT_CONCURRENCY, 1, 256, integer=True)),
            error_ttl_seconds=_float(
                environ, "MODELAPP_WATCH_ERROR_TTL_SECONDS", DEFAULT_ERROR_TTL_SECONDS, 0.0, 3600.0
            ),
        )


def _float(
    env: Mapping[str, str], name: str, default: float, minimum: float, maximum: float, *, integer: bool = False
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not {'an integer' if integer else 'a number'}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}: {raw} is out of range [{minimum:g}, {maximum:g}]")
    return value


# --- the single-flight cache ---------------------------------------------------------------------

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


class _SingleFlightCache(Generic[K, V]):
    """Per-key cache with single-flight fetches; one per kind (images, models)."""

    def __init__(
        self,
        *,
        version_of: Callable[[V], str],
        on_success: Callable[[K, str], None],
        ttl: float,
        error_ttl: float,
        cacheable_errors: tuple[type[Exception], ...],
        clock: Callable[[], float],
    ) -> None:
        self.states: dict[K, _KeyState[V]] = {}
        self.requests = 0
        self.ttl = ttl
        self._version_of = version_of
        self._on_success: Callable[[K, str], None] = on_success
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
    ) -> V:
        """The value for key.

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
            task = self._start(key, state, expect)
        return self._unwrap(await asyncio.shield(task))

    def _start(self, key: K, state: _KeyState[V], expect: str | None) -> asyncio.Task[_Outcome[V]]:
        generation = state.generation
        task = asyncio.create_task(self._fetch(key, state, generation), name=f"modelapp-watch-fetch:{key}")
        state.inflight, state.inflight_generation, state.inflight_expect = task, generation, expect
        return task

    async def _fetch(self, key: K, state: _KeyState[V], generation: int) -> _Outcome[V]:
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
        if generation >= state.outcome_generation:
            state.outcome, state.outcome_generation = outcome, generation
            state.expires_at = self._clock() + ttl
        if outcome.version is not None and generation >= state.value_generation:
            state.value, state.version, state.value_generation = outcome.value, outcome.version, generation
            self._on_success(key, outcome.version)
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


# --- recording what a reconcile resolved --------------------------------------------------------


@dataclass
class _Recording:
    hub: WatchHub
    seen: dict[WatchKey, str | None] = field(default_factory=dict)


_RECORDING: ContextVar[_Recording | None] = ContextVar("modelapp_watch_recording", default=None)


def _record(hub: WatchHub, key: WatchKey, version: str | None) -> None:
    recording = _RECORDING.get()
    if recording is not None and recording.hub is hub:
        recording.seen[key] = version


@contextlib.contextmanager
def track_resolutions(hub: WatchHub | None, app: AppKey) -> Iterator[None]:
    """Make what the hub's resolvers resolve inside this block the app's subscription.

    Usage in reconcile: `with track_resolutions(deps.watch, (ns, name)): await gather(...)`.
    Tasks started inside (asyncio.gather) inherit the context, so both resolutions count.
    Only a block that completes replaces the subscription."""
    if hub is None:
        yield
        return
    recording = _Recording(hub)
    token = _RECORDING.set(recording)
    try:
        yield
    finally:
        _RECORDING.reset(token)
    hub.track(app, seen=recording.seen)


# --- the resolvers -----------------------------------------------------------------------------------


class CachingImageResolver:
    """ImageResolver through the hub's cache; records what it resolved for track_resolutions."""

    def __init__(self, hub: WatchHub, inner: ImageResolver) -> None:
        self._hub = hub
        self.inner = inner

    async def resolve(self, repository: str, tag: str, credentials: RegistryCredentials | None) -> str:
        key = image_key(repository, tag, credentials)
        inner = self.inner

        async def fetch() -> str:
            return await inner.resolve(repository, tag, credentials)

        try:
            digest = await self._hub.image_cache.get(key, fetch)
        except Exception:
            _record(self._hub, key, None)
            raise
        _record(self._hub, key, digest)
        return digest

    async def close(self) -> None:
        """Close the wrapped resolver (the operator's clean-up closes deps.images / deps.models)."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()

    def invalidate(self, key: ImageKey) -> None:
        self._hub.image_cache.invalidate(key)


class CachingModelResolver:
    """ModelResolver through the hub's cache; records what it resolved for track_resolutions."""

    def __init__(self, hub: WatchHub, inner: ModelResolver) -> None:
        self._hub = hub
        self.inner = inner

    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        key = model_key(location, credential)
        inner = self.inner

        async def fetch() -> BlobProperties:
            return await inner.get_properties(location, credential)

        try:
            properties = await self._hub.model_cache.get(key, fetch)
        except Exception:
            _record(self._hub, key, None)
            raise
        _record(self._hub, key, normalize_etag(properties.etag))
        return properties

    async def close(self) -> None:
        """Close the wrapped resolver (the operator's clean-up closes deps.images / deps.models)."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()

    def invalidate(self, key: ModelKey) -> None:
        self._hub.model_cache.invalidate(key)


# --- the hub -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PollReport:
    image_keys: int
    model_keys: int
    requests: int  # requests to registries and blob services since the previous poll (all callers)
    changed_keys: int
    errors: int
    seconds: float


@dataclass
class WatchStats:
    image_requests: int = 0
    model_requests: int = 0
    polls: int = 0
    notifications: int = 0
    changes: int = 0  # keys whose version moved while someone followed them
    reconcile_requests: int = 0
    reconcile_request_failures: int = 0
    tracked_apps: int = 0
    tracked_image_keys: int = 0
    tracked_model_keys: int = 0


class WatchHub:
    """Shared caches, subscriptions, the poll loop and the notification entry points."""

    def __init__(
        self,
        images: ImageResolver,
        models: ModelResolver,
        *,
        on_change: ChangeCallback | None = None,
        ttl_seconds: float = 30.0,
        error_ttl_seconds: float = DEFAULT_ERROR_TTL_SECONDS,
        coalesce_seconds: float = DEFAULT_COALESCE_SECONDS,
        concurrency: int = DEFAULT_CONCURRENCY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_change = on_change
        self._coalesce = coalesce_seconds
        self._concurrency = concurrency
        self._clock = clock
        self.image_cache: _SingleFlightCache[ImageKey, str] = _SingleFlightCache(
            version_of=lambda digest: digest,
            on_success=self._fetched,
            ttl=ttl_seconds,
            error_ttl=error_ttl_seconds,
            cacheable_errors=(ImageResolutionError,),
            clock=clock,
        )
        self.model_cache: _SingleFlightCache[ModelKey, BlobProperties] = _SingleFlightCache(
            version_of=lambda properties: normalize_etag(properties.etag),
            on_success=self._fetched,
            ttl=ttl_seconds,
            error_ttl=error_ttl_seconds,
            cacheable_errors=(ModelResolutionError,),
            clock=clock,
        )
        self.images = CachingImageResolver(self, images)
        self.models = CachingModelResolver(self, models)
        # app -> {key: version the app last saw (None: its resolution failed)}
        self._apps: dict[AppKey, dict[WatchKey, str | None]] = {}
        self._followers: dict[WatchKey, set[AppKey]] = {}
        self._pending: set[AppKey] = set()
        self._flush: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._expecting: dict[tuple[WatchKey, str], asyncio.Task[bool]] = {}
        self._stats = WatchStats()
        self._requests_at_last_poll = 0

    def set_on_change(self, on_change: ChangeCallback | None) -> None:
        self._on_change = on_change

    # subscriptions ------------------------------------------------------------------------

    def track(
        self,
        app: AppKey,
        image: ImageKey | None = None,
        model: ModelKey | None = None,
        *,
        seen: Mapping[WatchKey, str | None] | None = None,
    ) -> None:
        """Replace app's subscription: the keys it follows and the versions it last saw.

        Without `seen`, the app is assumed to have seen each key's current version."""
        wanted: dict[WatchKey, str | None] = {}
        for key in (image, model):
            if key is not None:
                wanted[key] = self._version(key)
        if seen:
            wanted.update(seen)
        self._unfollow(app)
        if not wanted:
            return
        self._apps[app] = wanted
        for key in wanted:
            self._followers.setdefault(key, set()).add(app)

    def untrack(self, app: AppKey) -> None:
        self._unfollow(app)
        self._pending.discard(app)

    def _unfollow(self, app: AppKey) -> None:
        for key in self._apps.pop(app, {}):
            followers = self._followers.get(key)
            if followers is not None:
                followers.discard(app)
                if not followers:
                    del self._followers[key]

    def tracked(self, app: AppKey) -> Mapping[WatchKey, str | None]:
        return dict(self._apps.get(app, {}))

    def invalidate_app(self, app: AppKey) -> None:
        """Forget the cached tag and blob resolutions of one app, so its next reconcile asks afresh."""
        for key in self.tracked(app):
            if isinstance(key, ImageKey):
                self.image_cache.invalidate(key)
            else:
                self.model_cache.invalidate(key)

    def followers(self, key: WatchKey) -> frozenset[AppKey]:
        return frozenset(self._followers.get(key, ()))

    def _version(self, key: WatchKey) -> str | None:
        if isinstance(key, ImageKey):
            return self.image_cache.version(key)
        return self.model_cache.version(key)

    # change detection ---------------------------------------------------------------------

    def _is_stale(self, app: AppKey) -> bool:
        for key, seen in self._apps.get(app, {}).items():
            current = self._version(key)
            if current is not None and current != seen:
                return True
        return False

    def _fetched(self, key: WatchKey, version: str) -> None:
        """Every successful fetch lands here: followers that saw another version must reconcile."""
        stale = {app for app in self._followers.get(key, ()) if self._apps[app].get(key) != version}
        if not stale:
            return
        self._stats.changes += 1
        _log.info("%s is now %s: %d ModelApp(s) to reconcile", key.reference, version, len(stale))
        self._pending |= stale
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self._coalesce, self._start_flush)

    def _start_flush(self) -> None:
        self._flush = None
        apps, self._pending = self._pending, set()
        # Re-check: a reconcile that ran meanwhile may already have seen the new versions.
        stale = sorted(app for app in apps if self._is_stale(app))
        if not stale:
            return
        task = asyncio.create_task(self._dispatch(stale), name="modelapp-watch-dispatch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, apps: Iterable[AppKey]) -> None:
        on_change = self._on_change
        if on_change is None:
            return
        limit = asyncio.Semaphore(self._concurrency)

        async def request(app: AppKey) -> None:
            seen = self._apps.get(app)
            if seen is None:
                return  # untracked meanwhile (deleted)
            before = dict(seen)
            # Optimistic: another event for the same change must not ask again before this reconcile runs.
            for key in seen:
                seen[key] = self._version(key) or seen[key]
            async with limit:
                try:
                    await on_change(app)
                except Exception as error:
                    self._stats.reconcile_request_failures += 1
                    if getattr(error, "status", None) == 404:
                        self.untrack(app)  # the ModelApp is gone
                        return
                    _log.warning(
                        "cannot request a reconcile of %s/%s: %s",
                        app[0],
                        app[1],
                        redact(f"{type(error).__name__}: {error}")[:300],
                    )
                    if self._apps.get(app) is seen:  # not re-tracked meanwhile: ask again on the next fetch
                        seen.update(before)
                else:
                    self._stats.reconcile_requests += 1

        await asyncio.gather(*(request(app) for app in apps))

    # notifications -------------------------------------------------------------------------

    async def notify_image_pushed(self, host: str | None, repository: str, tag: str, digest: str | None) -> int:
        """A registry says repository:tag was pushed (host None: any registry). Returns keys refreshed."""
        self._stats.notifications += 1
        wanted_host = host.lower() if host else None
        keys = [
            key
            for key in self.image_cache.states
            if key.path == repository and key.tag == tag and (wanted_host is None or key.host == wanted_host)
        ]
        return await self._refresh(self.image_cache, keys, digest)

    async def notify_blob_changed(self, account: str, container: str, blob: str, etag: str | None) -> int:
        """A blob was (re)written. account: the account URL or the account name. Returns keys refreshed."""
        self._stats.notifications += 1
        by_url = "://" in account
        wanted = normalize_account_url(account) if by_url else account.lower()
        keys = [
            key
            for key in self.model_cache.states
            if key.container == container
            and key.blob == blob
            and (key.account_url == wanted if by_url else key.account_name == wanted)
        ]
        return await self._refresh(self.model_cache, keys, normalize_etag(etag) if etag else None)

    async def _refresh(self, cache: _SingleFlightCache[K, V], keys: list[K], expect: str | None) -> int:
        refreshed = 0
        for key in keys:
            if not self._followers.get(key):
                # Nobody follows it now: forget the cached value so a new ModelApp gets the new one.
                cache.invalidate(key)
        followed = [key for key in keys if self._followers.get(key)]

        async def one(key: K) -> None:
            nonlocal refreshed
            refreshed += await self._resolve_after_event(cache, key, None)

        async def one_expecting(key: K, announced: str) -> None:
            nonlocal refreshed
            # Several events announcing the same version share one job (and so its requests).
            job_key: tuple[WatchKey, str] = (key, announced)
            job = self._expecting.get(job_key)
            if job is None:
                job = asyncio.create_task(
                    self._resolve_after_event(cache, key, announced), name=f"modelapp-watch-event:{key}"
                )
                self._expecting[job_key] = job

                def forget(done: asyncio.Task[bool]) -> None:
                    if self._expecting.get(job_key) is done:
                        del self._expecting[job_key]

                job.add_done_callback(forget)
            refreshed += await asyncio.shield(job)

        if expect is None:
            await asyncio.gather(*(one(key) for key in followed))
        else:
            await asyncio.gather(*(one_expecting(key, expect) for key in followed))
        return refreshed

    async def _resolve_after_event(self, cache: _SingleFlightCache[K, V], key: K, expect: str | None) -> bool:
        """Re-resolve after an event until the service shows the announced version.

        Services can lag their own events: distribution notifies before it writes the tag
        link (a HEAD right after may answer the old digest or a 500), ACR geo-replicas and
        blob reads may trail too. So retry with backoff (about 8 s in all) before giving
        up; the poll loop remains the safety net."""
        if expect is None:
            cache.invalidate(key)
        problem = ""
        for delay in (0.0, *NOTIFY_RETRY_DELAYS):
            if delay:
                await asyncio.sleep(delay)
            try:
                if expect is None:
                    await cache.get(key, fresh=True)
                    return True
                await cache.get(key, expect=expect)
            except Exception as error:
                problem = _describe(error)
                continue
            if cache.version(key) == expect:
                return True
            problem = f"it still answers {cache.version(key)}"
        _log.warning(
            "re-resolving %s after a notification (announced %s) failed: %s",
            key.reference,
            expect or "a change",
            problem,
        )
        return False

    # polling --------------------------------------------------------------------------------

    async def poll_once(self) -> PollReport:
        """Re-resolve every followed key once (bounded concurrency); changes reach on_change."""
        started = self._clock()
        limit = asyncio.Semaphore(self._concurrency)
        errors = 0
        changes_before = self._stats.changes
        image_keys = [k for k in self._followers if isinstance(k, ImageKey) and k in self.image_cache.states]
        model_keys = [k for k in self._followers if isinstance(k, ModelKey) and k in self.model_cache.states]

        async def one(fetch: Callable[[], Awaitable[object]], reference: str) -> None:
            nonlocal errors
            async with limit:
                try:
                    await fetch()
                except Exception as error:
                    errors += 1
                    _log.debug("polling %s failed: %s", reference, _describe(error))

        await asyncio.gather(
            *(one(functools.partial(self.image_cache.get, k, fresh=True), k.reference) for k in image_keys),
            *(one(functools.partial(self.model_cache.get, k, fresh=True), k.reference) for k in model_keys),
        )
        following = self._followers.__contains__
        self.image_cache.purge(following)
        self.model_cache.purge(following)
        total = self.image_cache.requests + self.model_cache.requests
        report = PollReport(
            image_keys=len(image_keys),
            model_keys=len(model_keys),
            requests=total - self._requests_at_last_poll,
            changed_keys=self._stats.changes - changes_before,
            errors=errors,
            seconds=self._clock() - started,
        )
        self._requests_at_last_poll = total
        self._stats.polls += 1
        return report

    async def run_polling(self, interval: float) -> None:
        """Poll every `interval` seconds until cancelled; one log line per poll (the bench reads it)."""
        next_at = self._clock() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - self._clock()))
            next_at = max(next_at + interval, self._clock())
            try:
                report = await self.poll_once()
            except Exception as error:  # the loop must outlive any bug in one cycle
                _log.error("watch poll failed: %s", _describe(error))
                continue
            stats = self.stats()
            _log.info(
                "watch poll: %d image keys, %d model keys, %d requests since last poll, %d changed, %d errors, "
                "%d apps tracked, in %.3fs",
                report.image_keys,
                report.model_keys,
                report.requests,
                report.changed_keys,
                report.errors,
                stats.tracked_apps,
                report.seconds,
            )

    def stats(self) -> WatchStats:
        self._stats.image_requests = self.image_cache.requests
        self._stats.model_requests = self.model_cache.requests
        self._stats.tracked_apps = len(self._apps)
        self._stats.tracked_image_keys = sum(1 for k in self._followers if isinstance(k, ImageKey))
        self._stats.tracked_model_keys = sum(1 for k in self._followers if isinstance(k, ModelKey))
        return WatchStats(**vars(self._stats))

    async def close(self) -> None:
        """Stop pending flushes, dispatches and fetches (the wrapped resolvers are closed by their owner)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        tasks: list[asyncio.Task[None] | asyncio.Task[bool]] = [*self._tasks, *self._expecting.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.image_cache.cancel_all()
        await self.model_cache.cancel_all()


def _describe(error: BaseException) -> str:
    if isinstance(error, ResolutionError):
        return f"{error.reason}: {error.message}"
    return redact(f"{type(error).__name__}: {error}")[:300]
