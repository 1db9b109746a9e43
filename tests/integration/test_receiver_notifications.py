"""The receiver with the real local registry's push notifications and Azurite.

The registry fixture posts its notifications to 127.0.0.1:<registry_notify_port>/webhooks/registry
with `Authorization: Bearer <registry_notify_token>`; the receiver listens there during these tests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from azure.storage.blob import BlobServiceClient
from modelapp_localstack import Azurite, Registry
from modelapp_operator.api.modelapp_types import BlobLocation
from modelapp_operator.clients.blob_storage import (
    AzureBlobResolver,
    BlobCredential,
    BlobProperties,
    ConnectionStringCredential,
)
from modelapp_operator.clients.registry import RegistryClient, RegistryCredentials
from modelapp_operator.metrics import Source
from modelapp_operator.receiver.server import Receiver
from modelapp_operator.watch.hub import WatchHub
from modelapp_operator.watch.keys import AppKey
from modelapp_operator.watch.resolvers import track_resolutions

pytestmark = pytest.mark.integration


@dataclass
class CountingImages:
    inner: RegistryClient
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)  # digest -> resolutions that returned it

    async def resolve(self, repository: str, tag: str, credentials: RegistryCredentials | None) -> str:
        self.calls[(repository, tag)] += 1
        digest = await self.inner.resolve(repository, tag, credentials)
        self.answers[digest] += 1
        return digest


@dataclass
class CountingModels:
    inner: AzureBlobResolver
    calls: Counter[str] = field(default_factory=Counter)

    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        self.calls[location.url] += 1
        return await self.inner.get_properties(location, credential)


@dataclass
class Setup:
    hub: WatchHub
    receiver: Receiver
    images: CountingImages
    models: CountingModels
    requested: list[tuple[AppKey, float]]
    session: aiohttp.ClientSession
    token: str

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.receiver.port}{path}"

    async def post(self, path: str, body: Any, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        async with self.session.post(self.url(path), json=body, headers=headers) as response:
            return response.status, await response.json()

    async def wait_requested(self, app: AppKey, within: float) -> float:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for seen, at in self.requested:
                if seen == app:
                    return at
            await asyncio.sleep(0.01)
        raise AssertionError(f"no reconcile request for {app} within {within}s; got {self.requested}")


@pytest.fixture
async def setup(registry: Registry, registry_notify_port: int, registry_notify_token: str) -> AsyncIterator[Setup]:
    registry_client = RegistryClient(ca_file=registry.ca_file)
    blob_resolver = AzureBlobResolver(timeout_seconds=10)
    images, models = CountingImages(registry_client), CountingModels(blob_resolver)
    requested: list[tuple[AppKey, float]] = []

    def submit(app: AppKey, source: Source) -> None:
        requested.append((app, time.monotonic()))

    hub = WatchHub(images, models, submit=submit, coalesce_seconds=0.05, ttl_seconds=300)
    receiver = Receiver(hub, registry_notify_token, bind="127.0.0.1", port=registry_notify_port)
    await receiver.start()
    session = aiohttp.ClientSession()
    try:
        yield Setup(hub, receiver, images, models, requested, session, registry_notify_token)
    finally:
        await session.close()
        await receiver.stop()
        await hub.close()
        await registry_client.close()
        await blob_resolver.close()


async def test_registry_push_is_seen_within_2s_and_resolved_once(setup: Setup, registry: Registry) -> None:
    path = f"receiver-test/app-{uuid.uuid4().hex[:8]}"
    repository = f"{registry.host}/{path}"
    credentials = RegistryCredentials(registry.username, registry.password)
    app = ("team", "pushed")
    first = await asyncio.to_thread(registry.push_random_image, path, "stable")
    with track_resolutions(setup.hub, app):
        assert await setup.hub.images.resolve(repository, "stable", credentials) == first
    await asyncio.sleep(1.0)  # the first push's own notifications arrive and change nothing
    assert setup.requested == []
    calls_before = setup.images.calls[(repository, "stable")]
    received_before = setup.receiver.received

    pushed_at = time.monotonic()
    second = await asyncio.to_thread(registry.push_random_image, path, "stable")
    requested_at = await setup.wait_requested(app, within=2.0)
    assert requested_at - pushed_at < 2.0
    await asyncio.sleep(1.5)  # let any further notifications for that push arrive

    assert setup.receiver.received > received_before  # the registry's notification reached us
    # Resolved to the new digest exactly once, however many events came. (distribution notifies
    # before writing the tag link, so an extra early HEAD may still see the old digest.)
    assert setup.images.answers[second] == 1
    extra_calls = setup.images.calls[(repository, "stable")] - calls_before - 1
    assert extra_calls <= 2
    assert [a for a, _ in setup.requested] == [app]
    assert setup.hub.tracked(app) != {}
    # The reconcile that follows is served the new digest from the cache, without a request.
    with track_resolutions(setup.hub, app):
        assert await setup.hub.images.resolve(repository, "stable", credentials) == second
    assert setup.images.answers[second] == 1

    # An ACR-style and an Event Grid ImagePushed for the same push are accepted and cost nothing.
    acr = {
        "id": "1",
        "timestamp": "2024-05-02T09:14:07Z",
        "action": "push",
        "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1, "length": 1}
        | {"digest": second, "repository": path, "tag": "stable"},
        "request": {"id": "r", "host": registry.host, "method": "PUT", "useragent": "test"},
    }
    assert await setup.post("/webhooks/acr", acr) == (202, {"accepted": 1})
    eventgrid = [
        {
            "id": "2",
            "topic": "/subscriptions/x/resourceGroups/y/providers/Microsoft.ContainerRegistry/registries/local",
            "subject": f"{path}:stable",
            "eventType": "Microsoft.ContainerRegistry.ImagePushed",
            "eventTime": "2024-05-02T09:14:07Z",
            "data": {"action": "push", "target": acr["target"], "request": acr["request"]},
            "dataVersion": "1.0",
            "metadataVersion": "1",
        }
    ]
    assert await setup.post("/webhooks/eventgrid", eventgrid) == (200, {"accepted": 1})
    await setup.receiver.drain()
    assert setup.images.answers[second] == 1
    assert setup.images.calls[(repository, "stable")] - calls_before == 1 + extra_calls


async def test_eventgrid_blob_created_reresolves_the_blob(setup: Setup, azurite: Azurite) -> None:
    container_name, blob_name = "receiver-test", f"model-{uuid.uuid4().hex[:8]}.onnx"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = service.get_container_client(container_name)
    if not await asyncio.to_thread(container.exists):
        await asyncio.to_thread(container.create_container)
    blob = container.get_blob_client(blob_name)
    await asyncio.to_thread(blob.upload_blob, b"v1", overwrite=True)
    location = BlobLocation.model_validate(
        {"accountUrl": azurite.blob_endpoint, "container": container_name, "name": blob_name}
    )
    credential = ConnectionStringCredential(azurite.connection_string)
    app = ("team", "blob")
    with track_resolutions(setup.hub, app):
        first = await setup.hub.models.get_properties(location, credential)

    uploaded = await asyncio.to_thread(blob.upload_blob, b"v2", overwrite=True)
    assert uploaded["etag"] != first.etag
    event = {
        "topic": "/subscriptions/x/resourceGroups/y/providers/Microsoft.Storage/storageAccounts/"
        + azurite.account_name,
        "subject": f"/blobServices/default/containers/{container_name}/blobs/{blob_name}",
        "eventType": "Microsoft.Storage.BlobCreated",
        "id": str(uuid.uuid4()),
        "eventTime": "2024-05-02T09:20:00Z",
        "data": {
            "api": "PutBlob",
            "eTag": uploaded["etag"].strip('"'),
            "contentLength": 2,
            "blobType": "BlockBlob",
            "url": f"{azurite.blob_endpoint}/{container_name}/{blob_name}",
        },
        "dataVersion": "",
        "metadataVersion": "1",
    }
    assert await setup.post("/webhooks/eventgrid", [event, event]) == (200, {"accepted": 1})
    await setup.post("/webhooks/eventgrid", [event])
    await setup.wait_requested(app, within=2.0)
    await setup.receiver.drain()
    assert setup.models.calls[location.url] == 2
    with track_resolutions(setup.hub, app):
        assert (await setup.hub.models.get_properties(location, credential)).etag == uploaded["etag"]
    service.close()


async def test_auth_and_bad_bodies(setup: Setup) -> None:
    async with setup.session.post(setup.url("/webhooks/registry"), json={"events": []}) as response:
        assert response.status == 401
    assert (await setup.post("/webhooks/registry", {"events": []}, token="wrong"))[0] == 401
    status, body = await setup.post("/webhooks/registry", {"events": [{"action": "push"}]})
    assert status == 400 and "target" in body["message"]
    async with setup.session.post(
        setup.url("/webhooks/acr"), data=b"{", headers={"Authorization": f"Bearer {setup.token}"}
    ) as response:
        assert response.status == 400 and "not JSON" in (await response.json())["message"]
    envelope = {"events": [{"action": "push", "target": {"repository": "nobody/follows", "tag": "x"}}]}
    assert await setup.post("/webhooks/registry", envelope) == (202, {"accepted": 1})
    await setup.receiver.drain()
