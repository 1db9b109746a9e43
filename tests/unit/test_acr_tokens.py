"""ACR token flow against a loopback double of ACR's documented /oauth2/exchange and /oauth2/token."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from modelapp_operator.clients.acr import ACR_SCOPE, AcrTokenError, AcrTokenProvider, jwt_expiry

pytestmark = pytest.mark.unit

ENTRA_TOKEN = "entra-access-token-value"
NOW = 1_700_000_000.0


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@dataclass
class AccessToken:
    token: str
    expires_on: int


@dataclass
class Credential:
    calls: list[tuple[tuple[str, ...], dict[str, Any]]] = field(default_factory=list)
    failure: Exception | None = None

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls.append((scopes, kwargs))
        if self.failure is not None:
            raise self.failure
        return AccessToken(ENTRA_TOKEN, int(NOW) + 3600)


@dataclass
class Acr:
    """What ACR's token endpoints do, as documented: form in, JSON out."""

    host: str = ""
    exchanges: list[dict[str, str]] = field(default_factory=list)
    tokens: list[dict[str, str]] = field(default_factory=list)
    refresh_lifetime: float = 3 * 3600
    access_lifetime: float = 75 * 60
    exchange_status: int = 200
    token_statuses: list[int] = field(default_factory=list)  # consumed first, then 200
    delay: float = 0.0
    issued: int = 0
    html_tokens: bool = False  # a proxy's error page instead of JSON
    now: float = NOW  # issue time of new tokens

    async def exchange(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.exchanges.append({k: str(v) for k, v in form.items()})
        await asyncio.sleep(self.delay)
        if self.exchange_status != 200:
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=self.exchange_status)
        self.issued += 1
        token = jwt({"jti": f"r{self.issued}", "exp": self.now + self.refresh_lifetime, "grant_type": "refresh_token"})
        return web.json_response({"refresh_token": token})

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.tokens.append({k: str(v) for k, v in form.items()})
        await asyncio.sleep(self.delay)
        if self.token_statuses:
            status = self.token_statuses.pop(0)
            if status != 200:
                return web.Response(status=status, text="no")
        if self.html_tokens:
            return web.Response(text="<html>oops</html>", content_type="text/html")
        self.issued += 1
        return web.json_response(
            {"access_token": jwt({"jti": f"a{self.issued}", "exp": self.now + self.access_lifetime})}
        )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def acr() -> AsyncIterator[Acr]:
    double = Acr()
    app = web.Application()
    app.router.add_post("/oauth2/exchange", double.exchange)
    app.router.add_post("/oauth2/token", double.token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    double.host = f"127.0.0.1:{port}"
    try:
        yield double
    finally:
        await runner.cleanup()


def provider(acr: Acr, credential: Credential, clock: Clock, **kwargs: Any) -> AcrTokenProvider:
    return AcrTokenProvider(credential=credential, insecure_hosts=frozenset({acr.host}), clock=clock, **kwargs)


async def test_exchange_then_token_with_documented_form_fields(acr: Acr) -> None:
    credential, clock = Credential(), Clock()
    tokens = provider(acr, credential, clock, tenant_id="72f988bf-0000-0000-0000-2d7cd011db47")
    try:
        authorization = await tokens.authorization(acr.host, "team/iris-api")
    finally:
        await tokens.close()
    assert authorization.startswith("Bearer ") and jwt_expiry(authorization.removeprefix("Bearer ")) is not None
    assert credential.calls == [((ACR_SCOPE,), {"tenant_id": "72f988bf-0000-0000-0000-2d7cd011db47"})]
    assert acr.exchanges == [
        {
            "grant_type": "access_token",
            "service": acr.host,
            "access_token": ENTRA_TOKEN,
            "tenant": "72f988bf-0000-0000-0000-2d7cd011db47",
        }
    ]
    (token_form,) = acr.tokens
    assert token_form["grant_type"] == "refresh_token"
    assert token_form["service"] == acr.host
    assert token_form["scope"] == "repository:team/iris-api:pull"
    assert jwt_expiry(token_form["refresh_token"]) == NOW + acr.refresh_lifetime


async def test_tokens_are_cached_until_near_expiry(acr: Acr) -> None:
    credential, clock = Credential(), Clock()
    tokens = provider(acr, credential, clock)
    try:
        first = await tokens.authorization(acr.host, "team/a")
        assert await tokens.authorization(acr.host.upper(), "team/a") == first
        await tokens.authorization(acr.host, "team/b")  # another repository: new access token, same refresh token
        assert (len(acr.exchanges), len(acr.tokens)) == (1, 2)
        clock.now += acr.access_lifetime - 30  # inside the access margin: renewed
        assert await tokens.authorization(acr.host, "team/a") != first
        assert (len(acr.exchanges), len(acr.tokens)) == (1, 3)
        clock.now = acr.now = NOW + acr.refresh_lifetime - 200  # inside the refresh margin: exchanged again
        await tokens.authorization(acr.host, "team/a")
        assert (len(acr.exchanges), len(acr.tokens)) == (2, 4)
        tokens.invalidate(acr.host, "team/a")
        await tokens.authorization(acr.host, "team/a")
        assert (len(acr.exchanges), len(acr.tokens)) == (2, 5)
        tokens.invalidate(acr.host)
        await tokens.authorization(acr.host, "team/a")
        assert (len(acr.exchanges), len(acr.tokens)) == (3, 6)
        assert (tokens.exchanges, tokens.token_requests) == (3, 6)
    finally:
        await tokens.close()


async def test_concurrent_callers_share_one_exchange_and_one_token(acr: Acr) -> None:
    acr.delay = 0.05
    tokens = provider(acr, Credential(), Clock())
    try:
        results = await asyncio.gather(*(tokens.authorization(acr.host, "team/a") for _ in range(20)))
    finally:
        await tokens.close()
    assert len(set(results)) == 1
    assert (len(acr.exchanges), len(acr.tokens)) == (1, 1)


async def test_revoked_refresh_token_is_exchanged_again_once(acr: Acr) -> None:
    tokens = provider(acr, Credential(), Clock())
    try:
        await tokens.authorization(acr.host, "team/a")
        acr.token_statuses = [401]
        await tokens.authorization(acr.host, "team/b")
        assert (len(acr.exchanges), len(acr.tokens)) == (2, 3)
        acr.token_statuses = [401, 401]
        with pytest.raises(AcrTokenError) as caught:
            await tokens.authorization(acr.host, "team/c")
        assert caught.value.reason == "RegistryUnauthorized"
    finally:
        await tokens.close()


async def test_refusals_and_failures_become_reasons_without_secrets(acr: Acr) -> None:
    credential = Credential()
    tokens = provider(acr, credential, Clock())
    try:
        acr.exchange_status = 401
        with pytest.raises(AcrTokenError) as caught:
            await tokens.authorization(acr.host, "team/a")
        assert caught.value.reason == "RegistryUnauthorized" and "AcrPull" in caught.value.message
        assert ENTRA_TOKEN not in caught.value.message
        acr.exchange_status = 503
        with pytest.raises(AcrTokenError, match="answered 503") as caught:
            await tokens.authorization(acr.host, "team/a")
        assert caught.value.reason == "RegistryUnavailable"
        credential.failure = RuntimeError("no managed identity endpoint\nsecond line")
        with pytest.raises(AcrTokenError) as caught:
            await tokens.authorization(acr.host, "team/a")
        assert caught.value.reason == "AzureIdentityUnavailable" and "second line" not in caught.value.message
    finally:
        await tokens.close()


async def test_unreachable_registry_and_non_json_answers(acr: Acr) -> None:
    tokens = AcrTokenProvider(credential=Credential(), insecure_hosts=frozenset({"127.0.0.1:9"}), timeout_seconds=2)
    try:
        with pytest.raises(AcrTokenError) as caught:
            await tokens.authorization("127.0.0.1:9", "team/a")
        assert caught.value.reason == "RegistryUnavailable"
    finally:
        await tokens.close()
    tokens = provider(acr, Credential(), Clock())
    try:
        acr.html_tokens = True
        with pytest.raises(AcrTokenError, match="sent no access_token"):
            await tokens.authorization(acr.host, "team/a")
        acr.html_tokens = False
        acr.access_lifetime = -1000  # an already expired token is never served from the cache
        await tokens.authorization(acr.host, "team/a")
        await tokens.authorization(acr.host, "team/a")
        assert len(acr.tokens) == 3 and len(acr.exchanges) == 1
    finally:
        await tokens.close()


def test_jwt_expiry_reads_exp_without_verifying() -> None:
    assert jwt_expiry(jwt({"exp": 1234567890})) == 1234567890.0
    assert jwt_expiry(jwt({"sub": "x"})) is None
    assert jwt_expiry(jwt({"exp": True})) is None
    assert jwt_expiry("not-a-jwt") is None
    assert jwt_expiry("a.!!!.c") is None
    assert jwt_expiry("a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c") is None
