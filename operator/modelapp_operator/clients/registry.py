"""Resolve an image tag to its manifest digest through the OCI distribution (registry v2) API.

HEAD /v2/<repository>/manifests/<tag> with the manifest media types in Accept,
read Docker-Content-Digest. On 401 the WWW-Authenticate challenge says how to log
in: Basic (credentials from the pull Secret) or a Bearer token from the realm
(anonymous, or with the same credentials as basic auth, as ACR and Docker Hub do).
A manifest is read up to config.MANIFEST_MAX_BYTES and a token answer up to config.TOKEN_RESPONSE_MAX_BYTES,
in chunks: a registry streaming an endless body fails the resolution, it does not grow the operator.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from modelapp_operator.clients.acr import AcrTokenError, AcrTokenProvider
from modelapp_operator.clients.errors import ResolutionError
from modelapp_operator.clients.limits import ResponseTooLarge, read_capped, read_json_capped
from modelapp_operator.config import MANIFEST_MAX_BYTES, TOKEN_RESPONSE_MAX_BYTES
from modelapp_operator.names import Reason

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_CHALLENGE_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


class ImageResolutionError(ResolutionError):
    """The tag could not be resolved now. `reason` becomes the ImageResolved condition's reason."""


@dataclass(frozen=True)
class RegistryCredentials:
    username: str
    password: str = field(repr=False)


class ImageResolver(Protocol):
    async def resolve(self, repository: str, tag: str, credentials: RegistryCredentials | None) -> str:
        """Return the digest (sha256:...) the tag points at; raise ImageResolutionError."""
        ...


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lowercased
    params: Mapping[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse a WWW-Authenticate header with one challenge, e.g.
    `Bearer realm="https://auth.example/token",service="example",scope="repository:a/b:pull"`."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return Challenge(scheme=scheme.lower(), params=params)


def _host_key(value: str) -> str:
    """Normalize a docker-config auths key ('https://host/v1/', 'host') to 'host'."""
    if "://" in value:
        value = urlsplit(value).netloc
    return value.split("/", 1)[0].lower()


def credentials_from_dockerconfig(config_json: bytes | str, host: str) -> RegistryCredentials | None:
    """Credentials for host from a .dockerconfigjson document; None when it has none for host.

    Raises ValueError (without echoing the document) when it is not a docker config."""
    try:
        document = json.loads(config_json)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the Secret's .dockerconfigjson is not JSON") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict):
        raise ValueError("the Secret's .dockerconfigjson has no 'auths' object")
    wanted = host.lower()
    for key, entry in auths.items():
        if _host_key(key) != wanted or not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):
            # ACR refresh token: basic auth with the all-zero user name.
            return RegistryCredentials("00000000-0000-0000-0000-000000000000", str(entry["identitytoken"]))
        if entry.get("username") and entry.get("password") is not None:
            return RegistryCredentials(str(entry["username"]), str(entry["password"]))
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise ValueError(f"the auth entry for {host} is not base64 of user:password") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise ValueError(f"the auth entry for {host} is not base64 of user:password")
            return RegistryCredentials(username, password)
    return None


def basic_authorization(credentials: RegistryCredentials) -> str:
    """The Authorization header value for HTTP Basic auth."""
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def make_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """System trust store, plus an extra CA bundle for registries with a private CA."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


class RegistryClient:
    """ImageResolver over HTTPS (or plain HTTP for hosts listed as insecure)."""

    def __init__(
        self,
        *,
        ca_file: Path | None = None,
        insecure_hosts: frozenset[str] = frozenset(),
        timeout_seconds: float = 10.0,
        acr: AcrTokenProvider | None = None,
        azure_identity_hosts: frozenset[str] = frozenset(),
    ) -> None:
        """acr / azure_identity_hosts: registries (host globs such as *.azurecr.io) that a ModelApp
        without a pull Secret reaches with the operator's own Entra ID identity."""
        self._ssl = make_ssl_context(ca_file)
        self._insecure_hosts = insecure_hosts
        self._acr = acr
        self._azure_identity_hosts = azure_identity_hosts
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_seconds), raise_for_status=False
        )
        # (host, repository, credentials hash) -> (Authorization header, monotonic expiry)
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}

    async def close(self) -> None:
        await self._session.close()
        if self._acr is not None:
            await self._acr.close()

    def _uses_azure_identity(self, host: str) -> bool:
        host = host.lower()
        return self._acr is not None and any(fnmatch.fnmatchcase(host, p.lower()) for p in self._azure_identity_hosts)

    def _base_url(self, host: str) -> str:
        return f"http://{host}" if host in self._insecure_hosts else f"https://{host}"

    async def resolve(self, repository: str, tag: str, credentials: RegistryCredentials | None) -> str:
        host, _, path = repository.partition("/")
        url = f"{self._base_url(host)}/v2/{path}/manifests/{tag}"
        # Keyed by a hash of the credentials: a changed pull Secret must not reuse the old token.
        identity = basic_authorization(credentials) if credentials else ""
        cache_key = (host, path, hashlib.sha256(identity.encode()).hexdigest())
        cached = self._tokens.get(cache_key)
        authorization = cached[0] if cached and cached[1] > time.monotonic() else None
        try:
            if credentials is None and self._uses_azure_identity(host):
                status, headers, body = await self._acr_manifest(url, host, path)
                return self._digest_of(status, headers, body, repository, tag)
            status, headers, body = await self._manifest(url, authorization)
            if status == 401:
                challenge = parse_challenge(headers.get("WWW-Authenticate", ""))
                authorization = await self._authorize(challenge, path, credentials, cache_key)
                status, headers, body = await self._manifest(url, authorization)
        except ResponseTooLarge as error:
            raise ImageResolutionError(Reason.REGISTRY_RESPONSE_TOO_LARGE, str(error), retry_after=300) from None
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError) as error:
            raise ImageResolutionError(
                Reason.REGISTRY_TLS_ERROR,
                f"TLS with {host} failed ({_tls_detail(error)}); set MODELAPP_REGISTRY_CA_FILE for a private CA",
                retry_after=120,
            ) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ImageResolutionError(
                Reason.REGISTRY_UNAVAILABLE, f"cannot reach {host}: {type(error).__name__}: {error}", retry_after=30
            ) from None
        return self._digest_of(status, headers, body, repository, tag)

    async def _acr_manifest(self, url: str, host: str, path: str) -> tuple[int, Mapping[str, str], bytes]:
        """The manifest with an ACR token from the operator's identity; a refused token is renewed once."""
        assert self._acr is not None
        try:
            status, headers, body = await self._manifest(url, await self._acr.authorization(host, path))
            if status == 401:
                self._acr.invalidate(host)
                status, headers, body = await self._manifest(url, await self._acr.authorization(host, path))
        except AcrTokenError as error:
            raise ImageResolutionError(error.reason, error.message, retry_after=error.retry_after) from None
        return status, headers, body

    async def _manifest(self, url: str, authorization: str | None) -> tuple[int, Mapping[str, str], bytes]:
        headers = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}
        if authorization:
            headers["Authorization"] = authorization
        async with self._session.head(url, headers=headers, ssl=self._ssl, allow_redirects=True) as response:
            if response.status == 200 and _DIGEST.match(response.headers.get("Docker-Content-Digest", "")):
                return response.status, response.headers, b""
            if response.status != 200:
                return response.status, response.headers, b""
        # Some registries omit the digest header on HEAD: hash the manifest itself.
        async with self._session.get(url, headers=headers, ssl=self._ssl) as response:
            if response.status != 200:
                return response.status, response.headers, b""
            return response.status, response.headers, await read_capped(response, MANIFEST_MAX_BYTES)

    async def _authorize(
        self,
        challenge: Challenge | None,
        path: str,
        credentials: RegistryCredentials | None,
        cache_key: tuple[str, str, str],
    ) -> str:
        if challenge is None:
            raise ImageResolutionError(
                Reason.REGISTRY_UNAUTHORIZED, "registry answered 401 without a challenge", retry_after=120
            )
        if challenge.scheme == "basic":
            if credentials is None:
                raise ImageResolutionError(
                    Reason.REGISTRY_UNAUTHORIZED,
                    "registry requires credentials: set spec.image.pullSecretName to a dockerconfigjson Secret",
                    retry_after=120,
                )
            return basic_authorization(credentials)
        if challenge.scheme != "bearer" or not challenge.params.get("realm"):
            raise ImageResolutionError(
                Reason.REGISTRY_UNAUTHORIZED, f"unsupported authentication scheme {challenge.scheme!r}", retry_after=300
            )
        realm = challenge.params["realm"]
        if not realm.startswith("https://") and urlsplit(realm).netloc not in self._insecure_hosts:
            raise ImageResolutionError(
                Reason.REGISTRY_UNAUTHORIZED, f"token realm {realm} is not HTTPS", retry_after=300
            )
        params: dict[str, str] = {"scope": challenge.params.get("scope") or f"repository:{path}:pull"}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = {"Authorization": basic_authorization(credentials)} if credentials else {}
        async with self._session.get(realm, params=params, headers=headers, ssl=self._ssl) as response:
            if response.status in (401, 403):
                raise ImageResolutionError(
                    Reason.REGISTRY_UNAUTHORIZED,
                    f"token endpoint refused the credentials ({response.status})",
                    retry_after=120,
                )
            if response.status != 200:
                raise ImageResolutionError(
                    Reason.REGISTRY_UNAVAILABLE, f"token endpoint answered {response.status}", retry_after=30
                )
            document: Any = await read_json_capped(response, TOKEN_RESPONSE_MAX_BYTES)
            if document is None:
                raise ImageResolutionError(Reason.REGISTRY_UNAVAILABLE, "token endpoint sent no JSON", retry_after=30)
        token = (document.get("token") or document.get("access_token")) if isinstance(document, dict) else None
        if not isinstance(token, str) or not token:
            raise ImageResolutionError(Reason.REGISTRY_UNAVAILABLE, "token endpoint sent no token", retry_after=30)
        expires_in = document.get("expires_in", 60)
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 60.0
        header = f"Bearer {token}"
        self._tokens[cache_key] = (header, time.monotonic() + max(lifetime - 10.0, 0.0))
        return header

    @staticmethod
    def _digest_of(status: int, headers: Mapping[str, str], body: bytes, repository: str, tag: str) -> str:
        if status == 200:
            digest = headers.get("Docker-Content-Digest", "")
            if _DIGEST.match(digest):
                return digest
            if body:
                return "sha256:" + hashlib.sha256(body).hexdigest()
            raise ImageResolutionError(Reason.REGISTRY_UNAVAILABLE, "registry sent no digest for the manifest")
        if status == 404:
            raise ImageResolutionError(Reason.IMAGE_NOT_FOUND, f"{repository}:{tag} does not exist", retry_after=60)
        if status in (401, 403):
            raise ImageResolutionError(
                Reason.REGISTRY_UNAUTHORIZED,
                f"not allowed to pull {repository} ({status}): check the pull Secret",
                retry_after=120,
            )
        if status == 429 or status >= 500:
            raise ImageResolutionError(Reason.REGISTRY_UNAVAILABLE, f"registry answered {status}", retry_after=30)
        raise ImageResolutionError(
            Reason.IMAGE_RESOLUTION_FAILED, f"registry answered {status} for {repository}:{tag}", retry_after=60
        )


def _tls_detail(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return str(error.certificate_error)
    return str(error)[:200]
