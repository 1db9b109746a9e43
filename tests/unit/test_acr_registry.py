"""RegistryClient with the operator's Entra ID identity: ACR's token exchange in front of /v2/.

A loopback double of ACR: /oauth2/exchange and /oauth2/token as documented, and a manifest
endpoint that only accepts the access tokens it issued."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from modelapp_operator.clients.acr import AcrTokenProvider
from modelapp_operator.clients.registry import ImageResolutionError, RegistryClient, RegistryCredentials

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "5e" * 32


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


@dataclass
class Token:
    token: str = "entra-token"


@dataclass
class Credential:
    fail: bool = False

    async def get_token(self, *scopes: str, **kwargs: Any) -> Token:
        if self.fail:
            raise RuntimeError("no identity")
        return Token()


@dataclass
class Acr:
    host: str = ""
    issued: set[str] = field(default_factory=set)
    revoked: set[str] = field(default_factory=set)
    exchanges: int = 0
    manifests: list[str] = field(default_factory=list)

    async def exchange(self, request: web.Request) -> web.Response:
        form = await request.post()
        assert form["grant_type"] == "access_token" and form["access_token"] == "entra-token"
        self.exchanges += 1
        return web.json_response({"refresh_token": jwt({"exp": 4_000_000_000, "n": self.exchanges})})

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        assert form["scope"] == "repository:team/app:pull"
        access = jwt({"exp": 4_000_000_000, "n": len(self.issued)})
        self.issued.add(access)
        return web.json_response({"access_token": access})

    async def manifest(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        self.manifests.append(header)
        token = header.removeprefix("Bearer ")
        if token not in self.issued or token in self.revoked:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="x",service="y"'})
        return web.Response(headers={"Docker-Content-Digest": DIGEST})


@pytest.fixture
async def acr() -> AsyncIterator[Acr]:
    double = Acr()
    app = web.Application()
    app.router.add_post("/oauth2/exchange", double.exchange)
    app.router.add_post("/oauth2/token", double.token)
    app.router.add_route("*", "/v2/team/app/manifests/{tag}", double.manifest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    double.host = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield double
    finally:
        await runner.cleanup()


def client(acr: Acr, credential: Credential, hosts: frozenset[str]) -> RegistryClient:
    insecure = frozenset({acr.host})
    provider = AcrTokenProvider(credential=credential, insecure_hosts=insecure)
    return RegistryClient(insecure_hosts=insecure, acr=provider, azure_identity_hosts=hosts)


async def test_operator_identity_pulls_with_an_acr_access_token(acr: Acr) -> None:
    registry = client(acr, Credential(), frozenset({"127.0.0.1:*"}))
    try:
        assert await registry.resolve(f"{acr.host}/team/app", "stable", None) == DIGEST
        assert await registry.resolve(f"{acr.host}/team/app", "v2", None) == DIGEST
    finally:
        await registry.close()
    assert acr.exchanges == 1 and len(acr.issued) == 1
    assert all(header.startswith("Bearer ") for header in acr.manifests)


async def test_revoked_token_is_renewed_once(acr: Acr) -> None:
    registry = client(acr, Credential(), frozenset({"127.0.0.1:*"}))
    try:
        await registry.resolve(f"{acr.host}/team/app", "stable", None)
        acr.revoked |= acr.issued
        assert await registry.resolve(f"{acr.host}/team/app", "stable", None) == DIGEST
        assert acr.exchanges == 2
    finally:
        await registry.close()


async def test_identity_failure_is_an_image_resolution_error(acr: Acr) -> None:
    registry = client(acr, Credential(fail=True), frozenset({"127.0.0.1:*"}))
    try:
        with pytest.raises(ImageResolutionError) as caught:
            await registry.resolve(f"{acr.host}/team/app", "stable", None)
    finally:
        await registry.close()
    assert caught.value.reason == "AzureIdentityUnavailable"


async def test_pull_secret_or_other_hosts_do_not_use_the_identity(acr: Acr) -> None:
    registry = client(acr, Credential(), frozenset({"*.azurecr.io"}))
    try:
        with pytest.raises(ImageResolutionError):
            await registry.resolve(f"{acr.host}/team/app", "stable", None)
        with pytest.raises(ImageResolutionError):
            await registry.resolve(f"{acr.host}/team/app", "stable", RegistryCredentials("u", "p"))
    finally:
        await registry.close()
    assert acr.exchanges == 0
