"""Azure Blob Storage: the model blob's current ETag, size and the sha256/format metadata the publisher wrote,
and the immutable version it is pinned to. Raw reads and writes only: what they mean for a ModelApp (which
version, whether it may run) is decided in plan/model_check.py.

The operator asks the blob service for properties only (no download). With a
connection-string Secret it uses that; with workload identity it uses its own
DefaultAzureCredential, which gives tokens for the storage audience only (clients/limits.py: a 401
challenge naming another resource gets none). Which accounts it may reach at all is decided before
(plan/sources.py); `account_url_of` says which account a credential reaches. Every body it reads is
capped (config.STORAGE_RESPONSE_MAX_BYTES; headers by aiohttp's own limits).

Pinning: where the account keeps blob versions, the version ID the properties name; else a snapshot
taken with If-Match on the resolved ETag (so a concurrent overwrite is never captured), marked with
METADATA_PINNED_BY. Taking and deleting snapshots needs write access (Storage Blob Data
Contributor); a read-only identity gets ETag pinning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import aiohttp
from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import DefaultAzureCredential
from azure.storage.blob import BlobServiceClient
from azure.storage.blob.aio import BlobClient, ContainerClient
from modelapp_contract.blob import METADATA_PINNED_BY, PinnedVersion
from modelapp_operator.api.modelapp_types import BlobLocation
from modelapp_operator.clients.errors import ResolutionError
from modelapp_operator.clients.limits import (
    STORAGE_SCOPE,
    AsyncCredential,
    ResponseTooLarge,
    ScopedCredential,
    ScopeNotAllowed,
    capped_response_class,
)
from modelapp_operator.config import STORAGE_RESPONSE_MAX_BYTES
from modelapp_operator.names import Reason
from modelapp_operator.redact import redact


class ModelResolutionError(ResolutionError):
    """The model could not be resolved now. `reason` becomes the ModelResolved condition's reason."""


class PinNotAllowed(ModelResolutionError):
    """The identity may read the blob but not snapshot it (HTTP 403): the version stays pinned by ETag only."""


@dataclass(frozen=True)
class ConnectionStringCredential:
    connection_string: str = field(repr=False)


@dataclass(frozen=True)
class OperatorIdentityCredential:
    """The operator's own DefaultAzureCredential (workload identity in the cluster)."""


BlobCredential = ConnectionStringCredential | OperatorIdentityCredential

# Snapshots listed per page when pruning: a page of the listing stays far below STORAGE_RESPONSE_MAX_BYTES.
LIST_PAGE_SIZE = 200


def account_url_of(location: BlobLocation, credential: BlobCredential) -> str:
    """The account the operator's requests for this blob go to: a connection string names its own endpoint
    (spec.model.blob.accountUrl is what the pods are told). Raise ModelResolutionError when it names none."""
    if isinstance(credential, OperatorIdentityCredential):
        return location.account_url
    try:
        return str(BlobServiceClient.from_connection_string(credential.connection_string).url)
    except ValueError as error:
        raise ModelResolutionError(
            Reason.STORAGE_CREDENTIAL_INVALID, f"the connection string is not usable: {error}", retry_after=300
        ) from None


@dataclass(frozen=True)
class BlobProperties:
    etag: str
    size: int | None
    last_modified: str | None
    metadata: Mapping[str, str]
    version_id: str | None = None  # set only where the account keeps blob versions


class ModelResolver(Protocol):
    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        """Return the blob's properties; raise ModelResolutionError."""
        ...


class BlobReader(Protocol):
    async def read_blob(self, location: BlobLocation, credential: BlobCredential) -> bytes:
        """A small blob's bytes, capped."""
        ...


class ModelPinner(Protocol):
    """Immutable model versions: read one, take a snapshot, delete the operator's own snapshots."""

    async def pinned_properties(
        self, location: BlobLocation, credential: BlobCredential, pin: PinnedVersion
    ) -> BlobProperties:
        """The properties of a snapshot or version; raise ModelResolutionError (MODEL_VERSION_GONE on 404)."""
        ...

    async def snapshot(
        self, location: BlobLocation, credential: BlobCredential, properties: BlobProperties, owner: str
    ) -> PinnedVersion:
        """Snapshot the blob if it still has properties.etag; raise PinNotAllowed or ModelResolutionError."""
        ...

    async def prune(self, location: BlobLocation, credential: BlobCredential, owner: str, keep: set[str]) -> int:
        """Delete the snapshots `owner` took of the blob that are not in keep; return how many."""
        ...


class AzureBlobResolver:
    """ModelResolver on azure-storage-blob's async client. Close it with `close()`."""

    def __init__(self, *, timeout_seconds: float = 10.0, identity: AsyncCredential | None = None) -> None:
        """identity: the operator's own credential (default: DefaultAzureCredential, created on first use)."""
        self._timeout = timeout_seconds
        # Whatever the credential, it gives tokens for the storage audience only.
        self._identity: ScopedCredential | None = ScopedCredential(identity, {STORAGE_SCOPE}) if identity else None
        # One HTTP session for every blob client: a client of its own per call opened a new connection
        # each time (a cold start of 1,000 ModelApps pins 1,000 model versions).
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._identity is not None:
            await self._identity.close()
        if self._session is not None:
            await self._session.close()

    def _transport(self) -> AioHttpTransport:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                trust_env=True,  # proxies from the environment, as the SDK's own
                response_class=capped_response_class(STORAGE_RESPONSE_MAX_BYTES),
            )
        return AioHttpTransport(
            session=self._session,
            session_owner=False,
            connection_timeout=self._timeout,
            read_timeout=self._timeout,
        )

    def _client(
        self,
        location: BlobLocation,
        credential: BlobCredential,
        *,
        container_only: bool = False,
        pin: PinnedVersion | None = None,
    ) -> Any:
        # Fail fast: the reconcile retries with its own backoff, the SDK must not stall it.
        options: dict[str, Any] = {
            "transport": self._transport(),
            "retry_total": 1,
            # The storage SDK's own ExponentialRetry (it ignores retry_backoff_factor) waits 15 s +/- 3 s
            # before its retry: an unreachable account took 16-21 s to fail and held up the status.
            # Its wait is initial_backoff + increment_base ** retry: 0.5 s +/- 0.2 s before the one retry.
            "initial_backoff": 0.5,
            "increment_base": 0,
            "random_jitter_range": 0.2,
        }
        if pin is not None and not container_only:
            options.update(snapshot=pin.snapshot, version_id=pin.version_id)
        if isinstance(credential, ConnectionStringCredential):
            if container_only:
                return ContainerClient.from_connection_string(
                    credential.connection_string, location.container, **options
                )
            return BlobClient.from_connection_string(
                credential.connection_string, location.container, location.name, **options
            )
        if self._identity is None:
            try:
                self._identity = ScopedCredential(DefaultAzureCredential(), {STORAGE_SCOPE})
            except ValueError as error:  # e.g. an AZURE_CLIENT_ID that is no client ID
                raise ModelResolutionError(
                    Reason.AZURE_IDENTITY_UNAVAILABLE, f"the operator's Azure identity is not usable: {error}"
                ) from None
        if container_only:
            return ContainerClient(
                location.account_url.rstrip("/"), location.container, credential=self._identity, **options
            )
        return BlobClient(
            location.account_url.rstrip("/"), location.container, location.name, credential=self._identity, **options
        )

    def _client_for(self, location: BlobLocation, credential: BlobCredential, pin: PinnedVersion | None = None) -> Any:
        try:
            return self._client(location, credential, pin=pin)
        except ValueError as error:
            raise ModelResolutionError(
                Reason.STORAGE_CREDENTIAL_INVALID, f"the connection string is not usable: {error}", retry_after=300
            ) from None

    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        client = self._client_for(location, credential)
        where = f"{location.container}/{location.name}"
        try:
            async with client:
                properties = await client.get_blob_properties()
        except Exception as error:
            raise _storage_error(error, where, "read") from None
        return _properties(properties)

    async def read_blob(self, location: BlobLocation, credential: BlobCredential) -> bytes:
        """A small blob's bytes (the release gate's test set), read up to the session's cap
        (STORAGE_RESPONSE_MAX_BYTES: a larger one fails StorageResponseTooLarge)."""
        client = self._client_for(location, credential)
        where = f"{location.container}/{location.name}"
        try:
            async with client:
                stream = await client.download_blob()
                return bytes(await stream.readall())
        except Exception as error:
            raise _storage_error(error, where, "read") from None

    async def pinned_properties(
        self, location: BlobLocation, credential: BlobCredential, pin: PinnedVersion
    ) -> BlobProperties:
        client = self._client_for(location, credential, pin)
        where = f"{location.container}/{location.name} {pin.describe()}"
        try:
            async with client:
                properties = await client.get_blob_properties()
        except ResourceNotFoundError:
            raise ModelResolutionError(
                Reason.MODEL_VERSION_GONE,
                f"{where} no longer exists: that model version cannot be restored",
                retry_after=300,
            ) from None
        except Exception as error:
            raise _storage_error(error, where, "read") from None
        return _properties(properties)

    async def snapshot(
        self, location: BlobLocation, credential: BlobCredential, properties: BlobProperties, owner: str
    ) -> PinnedVersion:
        client = self._client_for(location, credential)
        where = f"{location.container}/{location.name}"
        # A snapshot gets the metadata given here instead of the blob's: keep the blob's, add the mark.
        metadata = {**properties.metadata, METADATA_PINNED_BY: owner}
        try:
            async with client:
                created = await client.create_snapshot(
                    metadata=metadata, etag=properties.etag, match_condition=MatchConditions.IfNotModified
                )
        except ResourceModifiedError:
            raise ModelResolutionError(
                Reason.MODEL_VERSION_MISMATCH,
                f"{where} changed after it was resolved to {properties.etag}: resolving it again",
                retry_after=2,
            ) from None
        except Exception as error:
            failure = _storage_error(error, where, "snapshot")
            if failure.reason == Reason.STORAGE_ACCESS_DENIED:
                raise PinNotAllowed(failure.reason, failure.message, retry_after=failure.retry_after) from None
            raise failure from None
        return PinnedVersion(snapshot=str(created["snapshot"]))

    async def prune(self, location: BlobLocation, credential: BlobCredential, owner: str, keep: set[str]) -> int:
        client = self._client_for(location, credential)
        where = f"{location.container}/{location.name}"
        deleted = 0
        try:
            async with client:
                container = self._client(location, credential, container_only=True)
                async with container:
                    listing = container.list_blobs(
                        name_starts_with=location.name,
                        include=["snapshots", "metadata"],
                        results_per_page=LIST_PAGE_SIZE,
                    )
                    async for item in listing:
                        if item.name != location.name or not item.snapshot or item.snapshot in keep:
                            continue
                        if (item.metadata or {}).get(METADATA_PINNED_BY) != owner:
                            continue  # a user's snapshot, or another ModelApp's: never ours to delete
                        try:
                            await container.get_blob_client(location.name, snapshot=item.snapshot).delete_blob()
                        except ResourceNotFoundError:
                            continue
                        deleted += 1
        except Exception as error:
            raise _storage_error(error, where, "delete snapshots of") from None
        return deleted


def _properties(properties: Any) -> BlobProperties:
    last_modified = properties.last_modified
    return BlobProperties(
        etag=str(properties.etag),
        size=int(properties.size) if properties.size is not None else None,
        last_modified=last_modified.isoformat() if isinstance(last_modified, datetime) else None,
        metadata=dict(properties.metadata or {}),
        version_id=getattr(properties, "version_id", None) or None,
    )


def _storage_error(error: Exception, where: str, verb: str) -> ModelResolutionError:
    """An SDK error as a ModelResolutionError naming what to look at."""
    if isinstance(error, ModelResolutionError):
        return error
    if isinstance(error, ScopeNotAllowed):
        return ModelResolutionError(
            Reason.TOKEN_SCOPE_NOT_ALLOWED, f"no token sent for {where}: {_first_line(error)}", retry_after=300
        )
    too_large = _cause(error, ResponseTooLarge)
    if too_large is not None:
        return ModelResolutionError(
            Reason.STORAGE_RESPONSE_TOO_LARGE, f"{verb} {where}: {_first_line(too_large)}", retry_after=300
        )
    if isinstance(error, ResourceNotFoundError):
        return ModelResolutionError(Reason.BLOB_NOT_FOUND, f"blob {where} does not exist", retry_after=30)
    if isinstance(error, ClientAuthenticationError):
        return ModelResolutionError(
            Reason.STORAGE_ACCESS_DENIED, f"not allowed to {verb} {where}: {_first_line(error)}", retry_after=120
        )
    if isinstance(error, ServiceRequestError | ServiceResponseError):
        return ModelResolutionError(
            Reason.STORAGE_UNAVAILABLE,
            f"cannot reach the blob service for {where}: {_first_line(error)}",
            retry_after=30,
        )
    if isinstance(error, HttpResponseError):
        code = error.status_code or 0
        if code in (401, 403):
            return ModelResolutionError(
                Reason.STORAGE_ACCESS_DENIED, f"not allowed to {verb} {where} ({code})", retry_after=120
            )
        return ModelResolutionError(
            Reason.STORAGE_UNAVAILABLE,
            f"blob service answered {code} for {where}: {_first_line(error)}",
            retry_after=30,
        )
    # Credential chains raise their own types; never crash on them.
    return ModelResolutionError(
        Reason.STORAGE_UNAVAILABLE,
        f"{verb} {where} failed: {type(error).__name__}: {_first_line(error)}",
        retry_after=60,
    )


def _cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in the chain the SDK wraps (inner_exception, __cause__, __context__)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        inner = getattr(current, "inner_exception", None)
        current = inner if isinstance(inner, BaseException) else current.__cause__ or current.__context__
    return None


def _first_line(error: BaseException) -> str:
    return redact(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)[:300]
