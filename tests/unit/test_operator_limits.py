"""What the operator takes from outside, bounded (clients/limits.py): bodies past their cap are dropped without
being read whole, and Azure tokens are asked only for the storage and ACR audiences."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from modelapp_operator.clients.limits import (
    ACR_SCOPE,
    STORAGE_SCOPE,
    ResponseTooLarge,
    ScopedCredential,
    ScopeNotAllowed,
    capped_response_class,
    read_capped,
    read_json_capped,
)
from modelapp_operator.clients.registry import ImageResolutionError, RegistryClient
from modelapp_operator.config import MANIFEST_MAX_BYTES
from modelapp_operator.names import Reason

pytestmark = pytest.mark.unit

CHUNK = b" " * 65536


class Served:
    def __init__(self) -> None:
        self.sent = 0


async def _endless_server(served: Served, *, declared: int | None = None) -> TestServer:
    """A body that never ends (or one that declares its length up front)."""

    async def endless(request: web.Request) -> web.StreamResponse:
        if declared is not None:
            return web.Response(body=b"x" * 16, headers={"Content-Length": str(declared)})
        response = web.StreamResponse(headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        await response.prepare(request)
        try:
            while served.sent < 1024**3:
                await response.write(CHUNK)
                served.sent += len(CHUNK)
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    async def head(request: web.Request) -> web.Response:
        return web.Response(status=200)  # no Docker-Content-Digest: the client must GET and hash the body

    app = web.Application()
    app.router.add_route("HEAD", "/v2/apps/x/manifests/v1", head)
    app.router.add_get("/v2/apps/x/manifests/v1", endless, allow_head=False)
    app.router.add_get("/body", endless)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


def test_an_endless_body_is_dropped_past_its_cap() -> None:
    async def run() -> int:
        served = Served()
        server = await _endless_server(served)
        try:
            async with aiohttp.ClientSession() as session, session.get(server.make_url("/body")) as response:
                with pytest.raises(ResponseTooLarge, match="larger than 100000 bytes"):
                    await read_capped(response, 100_000)
        finally:
            await server.close()
        return served.sent

    sent = asyncio.run(run())
    assert sent < 64 * 1024 * 1024  # the server was hung up on, not read to its end


def test_a_declared_length_past_the_cap_is_not_read_at_all() -> None:
    async def run() -> None:
        server = await _endless_server(Served(), declared=10**9)
        try:
            async with aiohttp.ClientSession() as session, session.get(server.make_url("/body")) as response:
                with pytest.raises(ResponseTooLarge):
                    await read_json_capped(response, 1000)
        finally:
            await server.close()

    asyncio.run(run())


def test_the_sdks_session_reads_capped_too() -> None:
    """The Azure SDK's transport calls response.read(): the response class caps it."""

    async def run() -> None:
        server = await _endless_server(Served())
        try:
            capped = capped_response_class(50_000)
            async with (
                aiohttp.ClientSession(response_class=capped) as session,
                session.get(server.make_url("/body")) as r,
            ):
                with pytest.raises(ResponseTooLarge):
                    await r.read()
        finally:
            await server.close()

    asyncio.run(run())


def test_a_head_declaring_a_large_entity_is_no_body_past_the_cap() -> None:
    """get_blob_properties is a HEAD whose Content-Length is the blob's size: a several-hundred-MiB model's
    properties were refused as a body past the 4 MiB storage cap (StorageResponseTooLarge)."""

    async def run() -> bytes:
        async def head(request: web.Request) -> web.Response:
            return web.Response(status=200, headers={"Content-Length": str(300 * 2**20)})

        app = web.Application()
        app.router.add_route("HEAD", "/blob", head)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            capped = capped_response_class(4 * 2**20)
            async with (
                aiohttp.ClientSession(response_class=capped) as session,
                session.head(server.make_url("/blob")) as response,
            ):
                return await response.read()
        finally:
            await server.close()

    assert asyncio.run(run()) == b""


def test_an_endless_manifest_fails_the_resolution_with_its_reason() -> None:
    async def run() -> ImageResolutionError:
        served = Served()
        server = await _endless_server(served)
        client = RegistryClient(insecure_hosts=frozenset({f"127.0.0.1:{server.port}"}))
        try:
            with pytest.raises(ImageResolutionError) as caught:
                await client.resolve(f"127.0.0.1:{server.port}/apps/x", "v1", None)
        finally:
            await client.close()
            await server.close()
        assert served.sent < 64 * 1024 * 1024
        return caught.value

    error = asyncio.run(run())
    assert error.reason == Reason.REGISTRY_RESPONSE_TOO_LARGE and str(MANIFEST_MAX_BYTES) in error.message


def test_json_nested_too_deep_is_not_json() -> None:
    async def run() -> Any:
        async def deep(request: web.Request) -> web.Response:
            return web.Response(body=b"[" * 50_000)

        app = web.Application()
        app.router.add_get("/", deep)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session, session.get(server.make_url("/")) as response:
                return await read_json_capped(response, 65536)
        finally:
            await server.close()

    assert asyncio.run(run()) is None


class Recording:
    def __init__(self) -> None:
        self.asked: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        self.asked.append(scopes)
        return type("Token", (), {"token": "t", "expires_on": 0})()


@pytest.mark.parametrize(
    "scope",
    [
        "https://management.azure.com/.default",
        "https://vault.azure.net/.default",
        "https://graph.microsoft.com/.default",
    ],
)
def test_a_scope_other_than_storage_or_acr_gets_no_token(scope: str) -> None:
    inner = Recording()
    credential = ScopedCredential(inner, {STORAGE_SCOPE})
    for call in (
        credential.get_token(scope),
        credential.get_token_info(scope),
        credential.get_token(STORAGE_SCOPE, scope),
    ):
        with pytest.raises(ScopeNotAllowed, match=r"management|vault|graph"):
            asyncio.run(call)
    assert inner.asked == []  # refused before the identity was asked


def test_the_allowed_scope_is_passed_through() -> None:
    inner = Recording()
    asyncio.run(ScopedCredential(inner, {ACR_SCOPE}).get_token(ACR_SCOPE, tenant_id="t"))
    info = asyncio.run(ScopedCredential(inner, {ACR_SCOPE}).get_token_info(ACR_SCOPE))
    assert inner.asked == [(ACR_SCOPE,), (ACR_SCOPE,)] and info.token == "t"
    with pytest.raises(ScopeNotAllowed):
        asyncio.run(ScopedCredential(inner, {ACR_SCOPE}).get_token(STORAGE_SCOPE))
