"""What the operator takes from hosts outside the cluster, bounded: bodies read up to a cap, and Azure tokens
only for the two audiences it needs.

A tenant names the registry and the storage account; a platform admin allows them (plan/sources.py), but an
allowed host can still misbehave. Bodies are read in chunks and given up past their cap (config.py's
*_MAX_BYTES), so an endless manifest or token answer fails one resolution instead of growing the operator's
memory. `ScopedCredential` wraps the credential handed to the Azure SDK: a 401 challenge naming another
resource (`resource_id=https://management.azure.com`) makes the storage SDK ask for a token for it, which
this refuses before any token is fetched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

import aiohttp
from azure.core.credentials import AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError

STORAGE_SCOPE = "https://storage.azure.com/.default"
ACR_SCOPE = "https://containerregistry.azure.net/.default"
_CHUNK = 64 * 1024


class ResponseTooLarge(aiohttp.ClientPayloadError):
    """A body past its cap; what was read is dropped and the connection closed."""

    def __init__(self, url: object, limit: int) -> None:
        host = getattr(url, "host", None) or str(url)
        super().__init__(f"{host} sent a body larger than {limit} bytes: not read further")
        self.limit = limit


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, read in chunks; ResponseTooLarge (connection closed) as soon as it passes `limit` bytes."""
    if response.method == "HEAD" or response.status in (204, 304):
        # No body by HTTP's rules; a HEAD's Content-Length is the size of what a GET would send (a blob's
        # properties of a 300 MiB model declare 300 MiB), never bytes to read here.
        return b""
    declared = response.content_length
    if declared is not None and declared > limit:
        response.close()
        raise ResponseTooLarge(response.url, limit)
    body = bytearray()
    while True:
        chunk = await response.content.read(min(_CHUNK, limit + 1 - len(body)))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            response.close()
            raise ResponseTooLarge(response.url, limit)


async def read_json_capped(response: aiohttp.ClientResponse, limit: int) -> Any:
    """The body as JSON (None when it is not JSON, or nested too deep to parse); ResponseTooLarge past `limit`."""
    body = await read_capped(response, limit)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def capped_response_class(limit: int) -> type[aiohttp.ClientResponse]:
    """An aiohttp response class whose `read()` (what the Azure SDK's transport calls) stops at `limit` bytes."""

    class CappedResponse(aiohttp.ClientResponse):
        async def read(self) -> bytes:
            if self._body is None:
                self._body = await read_capped(self, limit)
            return await super().read()

    return CappedResponse


class ScopeNotAllowed(ClientAuthenticationError):
    """A token was asked for an audience the operator never needs: none is fetched."""


class AsyncCredential(Protocol):
    """What azure.identity.aio's credentials offer (DefaultAzureCredential, WorkloadIdentityCredential)."""

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any: ...


class ScopedCredential:
    """An azure.identity async credential that gives tokens only for `allowed` scopes (and says why not)."""

    def __init__(self, inner: AsyncCredential, allowed: Iterable[str]) -> None:
        self._inner = inner
        self._allowed = frozenset(allowed)

    def _check(self, scopes: tuple[str, ...]) -> None:
        refused = [scope for scope in scopes if scope not in self._allowed]
        if refused or not scopes:
            raise ScopeNotAllowed(
                f"a token for {', '.join(refused) or 'no scope'} was asked (a 401 challenge naming another "
                f"resource?); the operator's identity is used only for {', '.join(sorted(self._allowed))}"
            )

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        self._check(scopes)
        return await self._inner.get_token(*scopes, **kwargs)

    async def get_token_info(self, *scopes: str, options: Any = None) -> Any:
        self._check(scopes)
        get_token_info = getattr(self._inner, "get_token_info", None)
        if get_token_info is not None:
            return await get_token_info(*scopes, options=options)
        token = await self._inner.get_token(*scopes, **dict(options or {}))
        return AccessTokenInfo(token.token, token.expires_on)

    async def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            await close()

    async def __aenter__(self) -> ScopedCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # The SDK's clients close their credential when used as context managers; the resolver owns it.
        return None
