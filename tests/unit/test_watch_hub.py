"""The watch hub: single-flight caches, subscriptions, polling, coalescing and notifications.

Every wait (TTLs, the coalescing window, retries after a notification, poll intervals and bounds) is on a
virtual scheduler (tests/unit/virtual_time.py): no test waits in real time."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from modelapp_operator.api.modelapp_types import BlobLocation
from modelapp_operator.clients.blob_storage import (
    BlobCredential,
    BlobProperties,
    ConnectionStringCredential,
    ModelResolutionError,
    OperatorIdentityCredential,
)
from modelapp_operator.clients.registry import ImageResolutionError, RegistryCredentials
from modelapp_operator.config import ConfigError, WatchConfig
from modelapp_operator.metrics import Source
from modelapp_operator.watch import hub as watch
from modelapp_operator.watch import polling
from modelapp_operator.watch.hub import WatchHub
from modelapp_operator.watch.keys import AppKey, ImageKey, image_key, model_key
from modelapp_operator.watch.resolvers import track_resolutions
from modelapp_serving.model_blob import BlobAddress
from modelapp_serving.model_blob import try_parse_blob_url as parse_blob_url

from tests.unit.virtual_time import VirtualScheduler

pytestmark = pytest.mark.unit

REGISTRY = "registry.example.com:5000"
ACCOUNT = "https://acct.blob.core.windows.net"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


@dataclass
class Images:
    """An ImageResolver double: tags -> digests, counting calls; `gate` holds calls until set."""

    digests: dict[tuple[str, str], str] = field(default_factory=dict)
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    gate: asyncio.Event | None = None
    failure: Exception | None = None
    script: list[str | Exception] = field(default_factory=list)  # answered first, e.g. a lagging registry

    async def resolve(self, repository: str, tag: str, credentials: RegistryCredentials | None) -> str:
        self.calls[(repository, tag)] += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        if self.script:
            answer = self.script.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        try:
            return self.digests[(repository, tag)]
        except KeyError:
            raise ImageResolutionError("ImageNotFound", f"{repository}:{tag} does not exist") from None


@dataclass
class Models:
    etags: dict[str, str] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        self.calls[location.url] += 1
        etag = self.etags.get(location.url)
        if etag is None:
            raise ModelResolutionError("BlobNotFound", f"{location.url} does not exist")
        return BlobProperties(etag=etag, size=10, last_modified=None, metadata={"sha256": "0" * 64})


@dataclass
class Requests:
    """The reconcile queue's door as the hub sees it: what was submitted, and who learned of the change."""

    apps: list[AppKey] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)

    def __call__(self, app: AppKey, source: Source) -> None:
        self.apps.append(app)
        self.sources.append(source)


def location(name: str) -> BlobLocation:
    return BlobLocation.model_validate({"accountUrl": ACCOUNT, "container": "models", "name": name})


CREDENTIAL = OperatorIdentityCredential()


COALESCE_SECONDS = 0.01


def make_hub(images: Any, models: Any, requests: Requests, clock: VirtualScheduler, **options: Any) -> WatchHub:
    settings: dict[str, Any] = {"ttl_seconds": 30.0, "error_ttl_seconds": 5.0, "coalesce_seconds": COALESCE_SECONDS}
    return WatchHub(images, models, submit=requests, scheduler=clock, **(settings | options))


async def reconcile_like(hub: WatchHub, app: AppKey, repo: str, tag: str, blob: str) -> tuple[str | None, str | None]:
    """What reconcile does: resolve image and model concurrently inside track_resolutions."""

    async def image() -> str | None:
        try:
            return await hub.images.resolve(f"{REGISTRY}/{repo}", tag, None)
        except ImageResolutionError:
            return None

    async def model() -> str | None:
        try:
            return (await hub.models.get_properties(location(blob), CREDENTIAL)).etag
        except ModelResolutionError:
            return None

    with track_resolutions(hub, app):
        digest, etag = await asyncio.gather(image(), model())
    return digest, etag


async def settle(clock: VirtualScheduler) -> None:
    """Let the coalescing window pass (the hub then submits what changed)."""
    await clock.advance(COALESCE_SECONDS)


Parts = tuple[Images, Models, Requests, VirtualScheduler]


@pytest.fixture
async def parts() -> Parts:
    images = Images({(f"{REGISTRY}/team/app{i}", "stable"): DIGEST_A for i in range(10)})
    models = Models({f"{ACCOUNT}/models/m{i}.onnx": '"0x1"' for i in range(10)})
    return images, models, Requests(), VirtualScheduler()


async def test_thousand_apps_sharing_ten_images_and_ten_models_cost_twenty_requests(
    parts: Parts,
) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    apps = [(f"ns{i % 7}", f"app{i}") for i in range(1000)]
    await asyncio.gather(
        *(reconcile_like(hub, app, f"team/app{i % 10}", "stable", f"m{i % 10}.onnx") for i, app in enumerate(apps))
    )
    assert sum(images.calls.values()) == 10 and sum(models.calls.values()) == 10
    stats = hub.stats()
    assert (stats.tracked_apps, stats.tracked_image_keys, stats.tracked_model_keys) == (1000, 10, 10)

    # One poll re-resolves each distinct key once; nothing changed, nobody is asked to reconcile.
    clock.now += 30
    report = await hub.poll_once()
    assert (report.image_keys, report.model_keys, report.requests) == (10, 10, 40)  # 20 cold + 20 poll
    report = await hub.poll_once()
    assert report.requests == 20 and report.changed_keys == 0
    await settle(clock)
    assert requests.apps == []
    await hub.close()


async def test_cache_serves_until_ttl_and_keys_include_credentials(
    parts: Parts,
) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    repository = f"{REGISTRY}/team/app1"
    assert await hub.images.resolve(repository, "stable", None) == DIGEST_A
    clock.now += 29
    assert await hub.images.resolve(repository, "stable", None) == DIGEST_A
    assert images.calls[(repository, "stable")] == 1
    clock.now += 2
    await hub.images.resolve(repository, "stable", None)
    assert images.calls[(repository, "stable")] == 2
    # Other credentials are another key: a changed pull Secret is not served a cached answer.
    await hub.images.resolve(repository, "stable", RegistryCredentials("u", "p"))
    assert images.calls[(repository, "stable")] == 3
    assert image_key(repository, "stable", RegistryCredentials("u", "p")) != image_key(repository, "stable", None)
    assert "secret-password" not in repr(image_key(repository, "stable", RegistryCredentials("u", "secret-password")))
    await hub.close()


async def test_errors_are_shared_cached_briefly_and_first_success_triggers(
    parts: Parts,
) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    app = ("ns", "new")
    digest, _ = await reconcile_like(hub, app, "team/missing", "v1", "m1.onnx")
    assert digest is None
    key = image_key(f"{REGISTRY}/team/missing", "v1", None)
    assert hub.tracked(app)[key] is None
    with pytest.raises(ImageResolutionError):
        await hub.images.resolve(f"{REGISTRY}/team/missing", "v1", None)
    assert images.calls[(f"{REGISTRY}/team/missing", "v1")] == 1  # the error was cached
    # The tag appears: the next poll resolves it and asks the app to reconcile.
    images.digests[(f"{REGISTRY}/team/missing", "v1")] = DIGEST_B
    clock.now += 6
    await hub.poll_once()
    await settle(clock)
    assert requests.apps == [app]
    await hub.close()


async def test_poll_change_requests_each_following_app_once(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    followers = [("ns", f"a{i}") for i in range(5)]
    for app in followers:
        await reconcile_like(hub, app, "team/app1", "stable", "m1.onnx")
    other = ("ns", "other")
    await reconcile_like(hub, other, "team/app2", "stable", "m2.onnx")

    images.digests[(f"{REGISTRY}/team/app1", "stable")] = DIGEST_B
    report = await hub.poll_once()
    assert report.changed_keys == 1
    await settle(clock)
    assert sorted(requests.apps) == followers
    # A second poll before the reconciles ran does not ask again.
    await hub.poll_once()
    await settle(clock)
    assert len(requests.apps) == 5
    await hub.close()


async def test_image_and_model_changed_together_make_one_request(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock, coalesce_seconds=0.25)
    app = ("ns", "both")
    await reconcile_like(hub, app, "team/app3", "stable", "m3.onnx")
    images.digests[(f"{REGISTRY}/team/app3", "stable")] = DIGEST_B
    models.etags[f"{ACCOUNT}/models/m3.onnx"] = '"0x2"'
    await hub.notify_image_pushed(REGISTRY, "team/app3", "stable", DIGEST_B)
    await clock.advance(0.125)  # the model's event lands a moment later, inside the window
    assert requests.apps == []
    await hub.notify_blob_changed(ACCOUNT, "models", "m3.onnx", "0x2")
    await clock.advance(0.125)  # the window (0.25 s from the first change) closes
    assert requests.apps == [app] and requests.sources == ["webhook"]
    await clock.advance(1.0)
    assert requests.apps == [app]
    await hub.close()


async def test_reconcile_that_already_saw_the_change_is_not_asked_again(
    parts: Parts,
) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock, coalesce_seconds=0.1)
    app = ("ns", "quick")
    await reconcile_like(hub, app, "team/app4", "stable", "m4.onnx")
    images.digests[(f"{REGISTRY}/team/app4", "stable")] = DIGEST_B
    await hub.poll_once()
    # The reconcile (e.g. a spec edit) runs inside the window and sees the new digest.
    digest, _ = await reconcile_like(hub, app, "team/app4", "stable", "m4.onnx")
    assert digest == DIGEST_B
    await clock.advance(0.1)
    assert requests.apps == []
    await hub.close()


async def test_flood_of_push_events_costs_one_request(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    app = ("ns", "flood")
    repository = f"{REGISTRY}/team/app5"
    await reconcile_like(hub, app, "team/app5", "stable", "m5.onnx")
    images.digests[(repository, "stable")] = DIGEST_B
    images.gate = asyncio.Event()
    pending = [
        asyncio.create_task(hub.notify_image_pushed(REGISTRY.upper(), "team/app5", "stable", DIGEST_B))
        for _ in range(20)
    ]
    await clock.settle()
    images.gate.set()
    await asyncio.gather(*pending)
    # Late duplicates: the digest is known now.
    assert await hub.notify_image_pushed(REGISTRY, "team/app5", "stable", DIGEST_B) == 1
    assert images.calls[(repository, "stable")] == 2  # the reconcile's + one re-resolution
    await settle(clock)
    assert requests.apps == [app]
    await hub.close()


async def test_notification_does_not_join_a_fetch_started_before_it(
    parts: Parts,
) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    repository = f"{REGISTRY}/team/app6"
    app = ("ns", "race")
    await reconcile_like(hub, app, "team/app6", "stable", "m6.onnx")
    images.gate = asyncio.Event()
    polling = asyncio.create_task(hub.poll_once())  # starts a fetch that will answer the old digest
    await clock.settle()
    images.digests[(repository, "stable")] = DIGEST_B
    notified = asyncio.create_task(hub.notify_image_pushed(REGISTRY, "team/app6", "stable", DIGEST_B))
    await clock.settle()
    images.gate.set()
    await asyncio.gather(polling, notified)
    assert await hub.images.resolve(repository, "stable", None) == DIGEST_B
    await settle(clock)
    assert requests.apps == [app]
    await hub.close()


async def test_notifications_without_digest_and_for_unfollowed_keys(
    parts: Parts,
) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    repository = f"{REGISTRY}/team/app7"
    app = ("ns", "nodigest")
    await reconcile_like(hub, app, "team/app7", "stable", "m7.onnx")
    assert await hub.notify_image_pushed(None, "team/app7", "stable", None) == 1
    assert images.calls[(repository, "stable")] == 2  # unknown digest: always re-resolved
    assert await hub.notify_image_pushed("other.example.com", "team/app7", "stable", None) == 0

    # Nobody follows it any more: the cached digest is dropped, not re-resolved.
    hub.untrack(app)
    images.digests[(repository, "stable")] = DIGEST_B
    assert await hub.notify_image_pushed(REGISTRY, "team/app7", "stable", DIGEST_B) == 0
    assert images.calls[(repository, "stable")] == 2
    assert await hub.images.resolve(repository, "stable", None) == DIGEST_B
    await settle(clock)
    assert requests.apps == []
    await hub.close()


async def test_blob_notifications_match_by_account_url_or_name(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    app = ("ns", "blob")
    await reconcile_like(hub, app, "team/app8", "stable", "m8.onnx")
    url = f"{ACCOUNT}/models/m8.onnx"
    models.etags[url] = '"0x9"'
    assert await hub.notify_blob_changed("acct", "models", "m8.onnx", '"0x9"') == 1
    assert await hub.notify_blob_changed("ACCT", "models", "m8.onnx", "0x9") == 1  # known now: no request
    assert await hub.notify_blob_changed(ACCOUNT.upper() + "/", "models", "m8.onnx", "0x9") == 1
    assert await hub.notify_blob_changed("other", "models", "m8.onnx", "0x9") == 0
    assert models.calls[url] == 2
    await settle(clock)
    assert requests.apps == [app]
    await hub.close()


async def test_retracking_and_untracking(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    app = ("ns", "moves")
    await reconcile_like(hub, app, "team/app1", "stable", "m1.onnx")
    await reconcile_like(hub, app, "team/app2", "stable", "m1.onnx")  # the spec moved to another image
    assert {k.path for k in hub.tracked(app) if isinstance(k, ImageKey)} == {"team/app2"}
    images.digests[(f"{REGISTRY}/team/app1", "stable")] = DIGEST_B
    await hub.notify_image_pushed(REGISTRY, "team/app1", "stable", DIGEST_B)
    await settle(clock)
    assert requests.apps == []
    hub.untrack(app)
    assert hub.stats().tracked_apps == 0
    # Explicit tracking: keys without a seen version take the current one.
    key = image_key(f"{REGISTRY}/team/app2", "stable", None)
    hub.track(app, image=key, model=model_key(location("m1.onnx"), CREDENTIAL))
    assert hub.tracked(app)[key] == DIGEST_A
    assert hub.followers(key) == frozenset({app})
    await hub.close()


async def test_a_deleted_app_or_a_standby_replica_submits_nothing(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    await reconcile_like(hub, ("ns", "deleted"), "team/app9", "stable", "m9.onnx")
    await reconcile_like(hub, ("ns", "kept"), "team/app9", "stable", "m9.onnx")
    images.digests[(f"{REGISTRY}/team/app9", "stable")] = DIGEST_B
    await hub.poll_once()
    hub.untrack(("ns", "deleted"))  # deleted inside the coalescing window
    await settle(clock)
    assert requests.apps == [("ns", "kept")] and requests.sources == ["poll"]
    assert hub.stats().submitted == 1

    active = False
    hub.set_active_check(lambda: active)
    images.digests[(f"{REGISTRY}/team/app9", "stable")] = DIGEST_A
    await hub.poll_once()
    await settle(clock)
    assert requests.apps == [("ns", "kept")]  # the active replica reconciles
    active = True
    await hub.poll_once()
    await settle(clock)
    assert requests.apps == [("ns", "kept")] * 2
    await hub.close()


async def test_a_change_is_submitted_with_who_fetched_it(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    repository = f"{REGISTRY}/team/app1"
    await reconcile_like(hub, ("ns", "a"), "team/app1", "stable", "m1.onnx")
    await reconcile_like(hub, ("ns", "b"), "team/app1", "stable", "m1.onnx")
    images.digests[(repository, "stable")] = DIGEST_B
    clock.now += 31  # expired: the next read asks the registry
    await hub.images.resolve(repository, "stable", None)  # a reconcile's own read (of another ModelApp, say)
    await settle(clock)
    assert requests.sources == ["reconcile", "reconcile"]
    images.digests[(repository, "stable")] = DIGEST_A
    clock.now += 31
    await hub.images.asked_by("webhook").resolve(repository, "stable", None)  # a reconcile run for a webhook
    await settle(clock)
    assert requests.sources[2:] == ["webhook", "webhook"]
    await hub.close()


async def test_invalidate_and_purge(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    repository = f"{REGISTRY}/team/app1"
    await hub.images.resolve(repository, "stable", None)
    hub.images.invalidate(image_key(repository, "stable", None))
    await hub.images.resolve(repository, "stable", None)
    assert images.calls[(repository, "stable")] == 2
    await hub.models.get_properties(location("m1.onnx"), ConnectionStringCredential("AccountKey=x"))
    hub.models.invalidate(model_key(location("m1.onnx"), ConnectionStringCredential("AccountKey=x")))
    clock.now += 100
    await hub.poll_once()  # nobody follows these keys: forgotten once expired
    assert hub.image_cache.states == {} and hub.model_cache.states == {}
    await hub.close()


async def test_invalidate_app_makes_its_next_reconcile_ask_afresh(
    parts: Parts,
) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    await reconcile_like(hub, ("ml", "a"), "team/app1", "stable", "m1.onnx")
    await reconcile_like(hub, ("ml", "a"), "team/app1", "stable", "m1.onnx")
    assert images.calls[(f"{REGISTRY}/team/app1", "stable")] == 1
    hub.invalidate_app(("ml", "a"))
    await reconcile_like(hub, ("ml", "a"), "team/app1", "stable", "m1.onnx")
    assert images.calls[(f"{REGISTRY}/team/app1", "stable")] == 2
    assert models.calls[f"{ACCOUNT}/models/m1.onnx"] == 2
    await hub.close()


async def test_run_polling_polls_and_stops_on_cancel(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock, coalesce_seconds=0.0)
    app = ("ns", "loop")
    await reconcile_like(hub, app, "team/app1", "stable", "m1.onnx")
    images.digests[(f"{REGISTRY}/team/app1", "stable")] = DIGEST_B
    task = asyncio.create_task(hub.run_polling(5.0))
    await clock.advance(4.9)
    assert requests.apps == []
    await clock.advance(0.1)
    assert requests.apps == [app] and requests.sources == ["poll"]
    assert hub.stats().polls >= 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await hub.close()


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    repository = f"{REGISTRY}/team/app2"
    images.gate = asyncio.Event()
    first = asyncio.create_task(hub.images.resolve(repository, "stable", None))
    second = asyncio.create_task(hub.images.resolve(repository, "stable", None))
    await clock.settle()
    first.cancel()
    images.gate.set()
    assert await second == DIGEST_A
    with pytest.raises(asyncio.CancelledError):
        await first
    assert images.calls[(repository, "stable")] == 1
    await hub.close()


def test_blob_urls_and_keys() -> None:
    assert parse_blob_url("https://Acct.blob.core.windows.net/models/a/b%20c.onnx") == BlobAddress(
        "https://acct.blob.core.windows.net", "models", "a/b c.onnx"
    )
    azurite = parse_blob_url("http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx")
    assert azurite == BlobAddress("http://127.0.0.1:10000/devstoreaccount1", "models", "iris.onnx")
    assert azurite.account_name == "devstoreaccount1"
    assert parse_blob_url("https://acct.dfs.core.windows.net/c/f.onnx") == BlobAddress(
        "https://acct.blob.core.windows.net", "c", "f.onnx"
    )
    for bad in (
        "ftp://x/c/b",
        "https://acct.blob.core.windows.net/only-container",
        "not a url",
        "http://127.0.0.1/a/b",
    ):
        assert parse_blob_url(bad) is None
    key = model_key(location("m.onnx"), ConnectionStringCredential("AccountKey=topsecret"))
    assert key.account_name == "acct" and "topsecret" not in repr(key)
    assert key != model_key(location("m.onnx"), CREDENTIAL)


def test_watch_config_from_env() -> None:
    assert WatchConfig.from_env({}) == WatchConfig()
    config = WatchConfig.from_env({"MODELAPP_CHANGE_COALESCE_SECONDS": "1.5", "MODELAPP_WATCH_CONCURRENCY": "4"})
    assert (config.coalesce_seconds, config.concurrency) == (1.5, 4)
    with pytest.raises(ConfigError, match="MODELAPP_CHANGE_COALESCE_SECONDS"):
        WatchConfig.from_env({"MODELAPP_CHANGE_COALESCE_SECONDS": "soon"})
    with pytest.raises(ConfigError, match="MODELAPP_WATCH_CONCURRENCY"):
        WatchConfig.from_env({"MODELAPP_WATCH_CONCURRENCY": "0"})


async def test_failed_or_hubless_blocks_leave_subscriptions_alone(
    parts: Parts,
) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    app = ("ns", "kept")
    await reconcile_like(hub, app, "team/app1", "stable", "m1.onnx")
    before = hub.tracked(app)
    with pytest.raises(RuntimeError), track_resolutions(hub, app):
        await hub.images.resolve(f"{REGISTRY}/team/app2", "stable", None)
        raise RuntimeError("the reconcile failed half-way")
    assert hub.tracked(app) == before
    with track_resolutions(None, app):
        await hub.images.resolve(f"{REGISTRY}/team/app3", "stable", None)
    assert hub.tracked(app) == before
    await hub.close()


async def test_close_cancels_fetches_under_way(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    images.gate = asyncio.Event()
    waiting = asyncio.create_task(hub.images.resolve(f"{REGISTRY}/team/app1", "stable", None))
    await clock.settle()
    await hub.close()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_registry_lagging_its_event_is_retried_until_it_shows_the_digest(parts: Parts) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    repository = f"{REGISTRY}/team/app3"
    app = ("ns", "lagging")
    await reconcile_like(hub, app, "team/app3", "stable", "m3.onnx")
    # distribution notifies before it writes the tag link: old digest, then a 500, then the new one.
    images.digests[(repository, "stable")] = DIGEST_B
    images.script = [DIGEST_A, ImageResolutionError("RegistryUnavailable", "registry answered 500")]
    events = asyncio.gather(*(hub.notify_image_pushed(REGISTRY, "team/app3", "stable", DIGEST_B) for _ in range(5)))
    first, second = watch.NOTIFY_RETRY_DELAYS[:2]
    await clock.advance(first + second)  # asked at once, after the first delay, and after the second
    assert await events == [1] * 5
    assert images.calls[(repository, "stable")] == 1 + 3  # the reconcile's, then one job for all 5 events
    await settle(clock)
    assert requests.apps == [app]

    # A registry that never shows the announced digest: give up, say so, leave it to the poll loop.
    images.script = [DIGEST_B] * 10
    gave_up = asyncio.ensure_future(hub.notify_image_pushed(REGISTRY, "team/app3", "stable", "sha256:" + "c" * 64))
    await clock.advance(sum(watch.NOTIFY_RETRY_DELAYS))
    assert await gave_up == 0
    await hub.close()


async def test_an_unavailable_registry_reaches_every_follower_once_and_recovery_too(
    parts: Parts,
) -> None:
    images, models, requests, clock = parts
    hub = make_hub(images, models, requests, clock)
    apps = [("ns", "one"), ("ns", "two")]
    for app in apps:
        await reconcile_like(hub, app, "team/app1", "stable", f"m{app[1]}.onnx")
    images.failure = ImageResolutionError("RegistryUnavailable", "cannot reach the registry")
    await hub.poll_once()
    await settle(clock)
    assert sorted(requests.apps) == apps  # both say so, not only the one being reconciled
    for app in apps:  # their reconciles see the failure (the status says RegistryUnavailable)
        await reconcile_like(hub, app, "team/app1", "stable", f"m{app[1]}.onnx")
    requests.apps.clear()
    clock.now += 10
    await hub.poll_once()  # still down: nothing new to say
    await settle(clock)
    assert requests.apps == []
    images.failure = None
    await hub.poll_once()  # back, same digest: the status recovers by itself
    await settle(clock)
    assert sorted(requests.apps) == apps
    await hub.close()


@dataclass
class HangingModels:
    """A storage account that accepts the request and never answers."""

    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_hanging_storage_account_does_not_delay_the_registry_polls() -> None:
    clock = VirtualScheduler()
    images = Images({(f"{REGISTRY}/team/app1", "stable"): DIGEST_A})
    hub = make_hub(images, HangingModels(), Requests(), clock)
    app = ("ns", "app")
    resolving = asyncio.create_task(reconcile_like(hub, app, "team/app1", "stable", "m1.onnx"))
    await clock.settle()
    resolving.cancel()  # the model never answers
    with contextlib.suppress(asyncio.CancelledError):
        await resolving
    hub.track(app, image_key(f"{REGISTRY}/team/app1", "stable", None), model_key(location("m1.onnx"), CREDENTIAL))
    stamps: list[float] = []
    resolve = images.resolve

    async def stamped(repository: str, tag: str, credentials: RegistryCredentials | None) -> str:
        stamps.append(clock.time())
        return await resolve(repository, tag, credentials)

    images.resolve = stamped  # type: ignore[method-assign]
    interval = 5.0
    task = asyncio.create_task(hub.run_polling(interval))
    await clock.advance(12 * interval)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    # Each storage cycle waits out its bound (the interval); the registry's keep their own pace.
    assert len(stamps) == 12 and max(gaps) == pytest.approx(interval), gaps
    await hub.close()


def test_backoff_grows_with_jitter_and_is_bounded() -> None:
    assert polling.backoff_delay(2.0, 0) == 2.0
    assert polling.backoff_delay(2.0, 1, rand=lambda: 0.0) == pytest.approx(1.6)
    assert polling.backoff_delay(2.0, 1, rand=lambda: 1.0) == pytest.approx(2.4)
    assert polling.backoff_delay(2.0, 3, rand=lambda: 0.5) == pytest.approx(8.0)
    assert polling.backoff_delay(2.0, 30, rand=lambda: 1.0) == pytest.approx(2.0 * polling.MAX_BACKOFF_FACTOR * 1.2)
