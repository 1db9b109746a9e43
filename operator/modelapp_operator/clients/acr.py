"""Azure Container Registry pull tokens from the operator's own Entra ID identity (workload identity).

The flow (ACR's documented OAuth2 exchange):
  1. Entra ID access token for scope https://containerregistry.azure.net/.default
  2. POST https://<registry>/oauth2/exchange
       grant_type=access_token, service=<registry>, access_token=<Entra token>[, tenant=<tenant>]
     -> {"refresh_token": "..."}          (a JWT, valid for hours; cached per registry)
  3. POST https://<registry>/oauth2/token
       grant_type=refresh_token, service=<registry>, scope=repository:<repo>:pull, refresh_token=<...>
     -> {"access_token": "..."}           (a JWT; cached per registry and repository)
  4. `Authorization: Bearer <access token>` on /v2/.

Tokens are cached until shortly before their `exp` (read from the JWT without verifying it:
the registry verifies it, we only need to know when to renew). Nothing here logs a token.
The Entra ID credential gives tokens for the ACR audience only (clients/limits.py), the form carrying
it is never sent on to a redirect's host, and a token answer is read up to config.TOKEN_RESPONSE_MAX_BYTES.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from azure.identity.aio import DefaultAzureCredential
from modelapp_operator.clients.limits import ACR_SCOPE, ResponseTooLarge, ScopedCredential, read_json_capped
from modelapp_operator.config import TOKEN_RESPONSE_MAX_BYTES
from modelapp_operator.names import Reason

__all__ = ["ACR_SCOPE", "AcrTokenError", "AcrTokenProvider", "jwt_expiry"]
REFRESH_TOKEN_FALLBACK_SECONDS = 3600.0  # when a refresh token carries no readable exp
ACCESS_TOKEN_FALLBACK_SECONDS = 300.0


class AcrTokenError(Exception):
    """No ACR token now. `reason` is meant for the ImageResolved condition."""

    def __init__(self, reason: str, message: str, *, retry_after: float = 30.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class AccessTokenLike(Protocol):
    @property
    def token(self) -> str: ...


class AsyncTokenCredential(Protocol):
    """azure.identity.aio credentials (DefaultAzureCredential, WorkloadIdentityCredential) fit this."""

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessTokenLike: ...


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim (epoch seconds) of a JWT, unverified; None when it is not a readable JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


@dataclass
class _Token:
    value: str = field(repr=False)
    expires_at: float  # epoch seconds


class AcrTokenProvider:
    """`await authorization(host, repository)` -> "Bearer <access token>" for pulling that repository."""

    def __init__(
        self,
        *,
        credential: AsyncTokenCredential | None = None,
        tenant_id: str | None = None,
        ca_file: Path | None = None,
        insecure_hosts: frozenset[str] = frozenset(),
        timeout_seconds: float = 10.0,
        clock: Callable[[], float] = time.time,
        refresh_margin_seconds: float = 300.0,
        access_margin_seconds: float = 60.0,
    ) -> None:
        # Whatever the credential, it gives tokens for the ACR audience only.
        self._credential: AsyncTokenCredential | None = (
            ScopedCredential(credential, {ACR_SCOPE}) if credential is not None else None
        )
        self._owns_credential = credential is None
        self._tenant_id = tenant_id
        self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._insecure_hosts = insecure_hosts
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._refresh_margin = refresh_margin_seconds
        self._access_margin = access_margin_seconds
        self._refresh_tokens: dict[str, _Token] = {}
        self._access_tokens: dict[tuple[str, str], _Token] = {}
        self._locks: dict[object, asyncio.Lock] = {}
        self.exchanges = 0  # Entra token -> refresh token exchanges made (tests, metrics)
        self.token_requests = 0  # refresh token -> access token requests made

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._owns_credential and self._credential is not None:
            close = getattr(self._credential, "close", None)
            if close is not None:
                await close()
            self._credential = None

    def invalidate(self, host: str, repository: str | None = None) -> None:
        """Forget cached tokens after the registry refused one (401)."""
        host = host.lower()
        if repository is None:
            self._refresh_tokens.pop(host, None)
            for key in [k for k in self._access_tokens if k[0] == host]:
                del self._access_tokens[key]
        else:
            self._access_tokens.pop((host, repository), None)

    async def authorization(self, host: str, repository: str) -> str:
        """The Authorization header value for pulling `repository` (path inside the registry) from `host`."""
        host = host.lower()
        key = (host, repository)
        cached = self._fresh(self._access_tokens.get(key), self._access_margin)
        if cached is not None:
            return f"Bearer {cached}"
        async with self._lock(key):
            cached = self._fresh(self._access_tokens.get(key), self._access_margin)
            if cached is None:
                cached = await self._new_access_token(host, repository)
        return f"Bearer {cached}"

    # internals -----------------------------------------------------------------------------

    def _lock(self, key: object) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _fresh(self, token: _Token | None, margin: float) -> str | None:
        if token is not None and token.expires_at - margin > self._clock():
            return token.value
        return None

    def _expiry(self, token: str, fallback: float) -> float:
        exp = jwt_expiry(token)
        return exp if exp is not None else self._clock() + fallback

    async def _new_access_token(self, host: str, repository: str) -> str:
        for attempt in (1, 2):
            refresh = await self._refresh_token(host)
            form = {
                "grant_type": "refresh_token",
                "service": host,
                "scope": f"repository:{repository}:pull",
                "refresh_token": refresh,
            }
            status, document = await self._post(host, "/oauth2/token", form)
            if status == 401 and attempt == 1:
                self._refresh_tokens.pop(host, None)  # revoked or expired early: exchange again, once
                continue
            self.token_requests += 1
            token = self._token_from(status, document, "access_token", host, "/oauth2/token")
            self._access_tokens[(host, repository)] = _Token(token, self._expiry(token, ACCESS_TOKEN_FALLBACK_SECONDS))
            return token
        raise AssertionError("unreachable")  # pragma: no cover

    async def _refresh_token(self, host: str) -> str:
        cached = self._fresh(self._refresh_tokens.get(host), self._refresh_margin)
        if cached is not None:
            return cached
        async with self._lock(host):
            cached = self._fresh(self._refresh_tokens.get(host), self._refresh_margin)
            if cached is not None:
                return cached
            entra = await self._entra_token()
            form = {"grant_type": "access_token", "service": host, "access_token": entra}
            if self._tenant_id:
                form["tenant"] = self._tenant_id
            status, document = await self._post(host, "/oauth2/exchange", form)
            self.exchanges += 1
            token = self._token_from(status, document, "refresh_token", host, "/oauth2/exchange")
            self._refresh_tokens[host] = _Token(token, self._expiry(token, REFRESH_TOKEN_FALLBACK_SECONDS))
            return token

    async def _entra_token(self) -> str:
        if self._credential is None:
            self._credential = ScopedCredential(DefaultAzureCredential(), {ACR_SCOPE})
        try:
            kwargs: dict[str, Any] = {"tenant_id": self._tenant_id} if self._tenant_id else {}
            access = await self._credential.get_token(ACR_SCOPE, **kwargs)
        except Exception as error:  # credential chains raise many types; report, never crash
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise AcrTokenError(
                Reason.AZURE_IDENTITY_UNAVAILABLE,
                f"no Entra ID token for the registry: {type(error).__name__}: {first_line} "
                "(check the operator's workload identity)",
                retry_after=60,
            ) from None
        return access.token

    def _url(self, host: str, path: str) -> str:
        scheme = "http" if host in self._insecure_hosts else "https"
        return f"{scheme}://{host}{path}"

    async def _post(self, host: str, path: str, form: dict[str, str]) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            # No redirects: the form carries a token, which goes to the registry named and nowhere else.
            async with self._session.post(
                self._url(host, path), data=form, ssl=self._ssl, allow_redirects=False
            ) as response:
                status = response.status
                document = await read_json_capped(response, TOKEN_RESPONSE_MAX_BYTES) if status == 200 else None
                return status, document
        except ResponseTooLarge as error:
            raise AcrTokenError(Reason.REGISTRY_RESPONSE_TOO_LARGE, f"{host}{path}: {error}", retry_after=300) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise AcrTokenError(
                Reason.REGISTRY_UNAVAILABLE, f"cannot reach {host}{path}: {type(error).__name__}", retry_after=30
            ) from None

    @staticmethod
    def _token_from(status: int, document: Any, field_name: str, host: str, path: str) -> str:
        if status in (401, 403):
            raise AcrTokenError(
                Reason.REGISTRY_UNAUTHORIZED,
                f"{host}{path} refused the operator's identity ({status}): grant it AcrPull on the registry",
                retry_after=120,
            )
        if status != 200:
            raise AcrTokenError(Reason.REGISTRY_UNAVAILABLE, f"{host}{path} answered {status}", retry_after=30)
        token = document.get(field_name) if isinstance(document, dict) else None
        if not isinstance(token, str) or not token:
            raise AcrTokenError(Reason.REGISTRY_UNAVAILABLE, f"{host}{path} sent no {field_name}", retry_after=30)
        return token
