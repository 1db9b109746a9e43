"""The watch hub: one place that knows which image tags and model blobs the ModelApps follow.

Why a hub: 1,000 ModelApps sharing 10 images and 10 models must cost 20 requests per
poll interval, not 2,000. So every resolution goes through a cache keyed by what is
asked (registry host, repository, tag, credentials / account, container, blob,
credentials), with single-flight: concurrent calls for one key share one request.

- `CachingImageResolver` / `CachingModelResolver` (`hub.images`, `hub.models`) implement
  the same Protocols as clients/registry.py / clients/blob_storage.py and wrap the real resolvers
  (watch/resolvers.py); keys are in watch/keys.py, the cache in watch/single_flight.py.
- Subscriptions: reconcile resolves inside `track_resolutions(hub, (namespace, name))`;
  the keys it resolved, and the version it saw for each, become that app's subscription
  (replacing the previous one: a ModelApp that moves to another tag stops following the
  old one). `hub.track` / `hub.untrack` do the same explicitly.
- Change detection: whenever any fetch of a key succeeds (poll loop, webhook
  notification, a reconcile's cache miss) and the version differs from what a
  subscribed app last saw, or fails where it answered before, that app is submitted to
  the reconcile queue: `submit(app, source)`, the source being who fetched (poll,
  webhook, reconcile). The queue runs it and retries it; the hub never reconciles.
- Coalescing: submissions wait `coalesce_seconds` after the first change of a batch (a
  timer on the hub's scheduler), so an image and a model changed together become one
  reconcile, hence one rollout.
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
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from modelapp_contract.blob import normalize_account_url, normalize_etag
from modelapp_operator.clients.blob_storage import BlobProperties, ModelResolutionError, ModelResolver
from modelapp_operator.clients.registry import ImageResolutionError, ImageResolver
from modelapp_operator.config import DEFAULT_COALESCE_SECONDS, DEFAULT_CONCURRENCY, DEFAULT_ERROR_TTL_SECONDS
from modelapp_operator.metrics import METRICS, Source
from modelapp_operator.scheduler import LOOP, Scheduler, Timer
from modelapp_operator.watch.keys import AppKey, ImageKey, ModelKey, WatchKey
from modelapp_operator.watch.polling import HubPolling, describe_error
from modelapp_operator.watch.resolvers import CachingImageResolver, CachingModelResolver
from modelapp_operator.watch.single_flight import SingleFlightCache

_log = logging.getLogger(__name__)

# The reconcile queue's door (reconcile/queue.py ReconcileQueue.submit): this app, and who learned of its change.
Submit = Callable[[AppKey, Source], None]
K = TypeVar("K", ImageKey, ModelKey)
V = TypeVar("V")

# After an event: retry until the service shows the announced version (it may lag its own event).
NOTIFY_RETRY_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass
class WatchStats:
    image_requests: int = 0
    model_requests: int = 0
    polls: int = 0
    notifications: int = 0
    changes: int = 0  # keys whose version moved while someone followed them
    submitted: int = 0  # ModelApps handed to the reconcile queue after a change
    tracked_apps: int = 0
    tracked_image_keys: int = 0
    tracked_model_keys: int = 0


class WatchHub(HubPolling):
    """Shared caches, subscriptions, the poll loop and the notification entry points."""

    def __init__(
        self,
        images: ImageResolver,
        models: ModelResolver,
        *,
        submit: Submit | None = None,
        ttl_seconds: float = 30.0,
        error_ttl_seconds: float = DEFAULT_ERROR_TTL_SECONDS,
        coalesce_seconds: float = DEFAULT_COALESCE_SECONDS,
        concurrency: int = DEFAULT_CONCURRENCY,
        scheduler: Scheduler = LOOP,
    ) -> None:
        self._submit = submit
        self._coalesce = coalesce_seconds
        self._concurrency = concurrency
        self._scheduler = scheduler
        clock = scheduler.time
        self.image_cache: SingleFlightCache[ImageKey, str] = SingleFlightCache(
            version_of=lambda digest: digest,
            on_success=self._fetched,
            on_failure=self._failed,
            ttl=ttl_seconds,
            error_ttl=error_ttl_seconds,
            cacheable_errors=(ImageResolutionError,),
            clock=clock,
        )
        self.model_cache: SingleFlightCache[ModelKey, BlobProperties] = SingleFlightCache(
            version_of=lambda properties: normalize_etag(properties.etag),
            on_success=self._fetched,
            on_failure=self._failed,
            ttl=ttl_seconds,
            error_ttl=error_ttl_seconds,
            cacheable_errors=(ModelResolutionError,),
            clock=clock,
        )
        self.images = CachingImageResolver(self, self.image_cache, images)
        self.models = CachingModelResolver(self, self.model_cache, models)
        # app -> {key: version the app last saw (None: its resolution failed)}
        self._apps: dict[AppKey, dict[WatchKey, str | None]] = {}
        self._followers: dict[WatchKey, set[AppKey]] = {}
        self._pending: dict[AppKey, Source] = {}  # to submit when the window closes, with who learned first
        self._flush: Timer | None = None
        self._expecting: dict[tuple[WatchKey, str], asyncio.Task[bool]] = {}
        self._stats = WatchStats()
        self._requests_at_last_poll = 0
        self._failing: set[WatchKey] = set()  # keys whose newest fetch failed
        self._changes_at_last_poll = 0
        self._active: Callable[[], bool] = lambda: True  # False on a standby replica: it neither polls nor acts

    def set_active_check(self, active: Callable[[], bool]) -> None:
        self._active = active

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
        self._pending.pop(app, None)

    def _unfollow(self, app: AppKey) -> None:
        for key in self._apps.pop(app, {}):
            followers = self._followers.get(key)
            if followers is not None:
                followers.discard(app)
                if not followers:
                    del self._followers[key]
                    self._failing.discard(key)

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
            if key in self._failing:
                if seen is not None:  # it answered before, not now: the status must say so
                    return True
            elif current is not None and current != seen:
                return True
        return False

    def _failed(self, key: WatchKey, error: Exception, source: Source) -> None:
        """A fetch failed: followers whose last reconcile saw this key answer must say it no longer does.

        Once their reconcile records the failure (seen None), further failures ask nothing; the
        next success differs from None, so the status recovers by itself."""
        self._failing.add(key)
        if any(job_key == key for job_key, _ in self._expecting):
            return  # a service lagging its own event is retried there; the next poll reports a lasting failure
        stale = {app for app in self._followers.get(key, ()) if self._apps[app].get(key) is not None}
        if not stale:
            return
        _log.warning("%s: %s; %d ModelApp(s) to update", key.reference, describe_error(error), len(stale))
        self._collect(stale, source)

    def _fetched(self, key: WatchKey, version: str, source: Source) -> None:
        """Every successful fetch lands here: followers that saw another version must reconcile."""
        self._failing.discard(key)
        stale = {app for app in self._followers.get(key, ()) if self._apps[app].get(key) != version}
        if not stale:
            return
        self._stats.changes += 1
        METRICS.change_learned(stale, "image" if isinstance(key, ImageKey) else "model", version, source)
        _log.info("%s is now %s: %d ModelApp(s) to reconcile", key.reference, version, len(stale))
        self._collect(stale, source)

    def _collect(self, apps: set[AppKey], source: Source) -> None:
        """Submit these apps when the coalescing window closes (the first source to learn of a change names it)."""
        for app in apps:
            self._pending.setdefault(app, source)
        if self._flush is None:
            self._flush = self._scheduler.call_later(self._coalesce, self._submit_pending)

    def _submit_pending(self) -> None:
        self._flush = None
        pending, self._pending = self._pending, {}
        if self._submit is None or not self._active():
            return  # a standby replica: the active one reconciles (its own polls find the change)
        for app in sorted(pending):
            seen = self._apps.get(app)
            # Untracked meanwhile (deleted), or a reconcile that ran meanwhile already saw the new versions.
            if seen is None or not self._is_stale(app):
                continue
            # Optimistic: another event for the same change must not submit it again before its reconcile
            # runs. That reconcile records what it saw as the subscription; if it fails, the queue retries it.
            for key in seen:
                seen[key] = None if key in self._failing else self._version(key) or seen[key]
            self._stats.submitted += 1
            self._submit(app, pending[app])

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

    async def _refresh(self, cache: SingleFlightCache[K, V], keys: list[K], expect: str | None) -> int:
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

    async def _resolve_after_event(self, cache: SingleFlightCache[K, V], key: K, expect: str | None) -> bool:
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
                await self._scheduler.sleep(delay)
            try:
                if expect is None:
                    await cache.get(key, fresh=True, source="webhook")
                    return True
                await cache.get(key, expect=expect, source="webhook")
            except Exception as error:
                problem = describe_error(error)
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

    def stats(self) -> WatchStats:
        self._stats.image_requests = self.image_cache.requests
        self._stats.model_requests = self.model_cache.requests
        self._stats.tracked_apps = len(self._apps)
        self._stats.tracked_image_keys = sum(1 for k in self._followers if isinstance(k, ImageKey))
        self._stats.tracked_model_keys = sum(1 for k in self._followers if isinstance(k, ModelKey))
        return WatchStats(**vars(self._stats))

    async def close(self) -> None:
        """Stop the pending submissions and the fetches (the wrapped resolvers are closed by their owner)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._pending.clear()
        tasks = list(self._expecting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.image_cache.cancel_all()
        await self.model_cache.cancel_all()
