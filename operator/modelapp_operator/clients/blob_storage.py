"""Azure Blob Storage: the model blob's current ETag, size and the sha256/format metadata the publisher wrote.

The operator asks the blob service for properties only (no download). With a
connection-string Secret it uses that; with workload identity it uses its own
DefaultAzureCredential (the operator's identity needs read access to the blob).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity.aio import DefaultAzureCredential
from azure.storage.blob.aio import BlobClient
from modelapp_operator.api.modelapp_types import BlobLocation, ModelSpec
from modelapp_operator.clients.errors import ResolutionError
from modelapp_operator.names import Reason
from modelapp_operator.plan.release import ResolvedModel
from modelapp_operator.redact import redact
from modelapp_serving.model_blob import MODEL_FORMATS, normalize_etag, read_published_metadata

_SHA256 = re.compile(r"^[a-f0-9]{64}$")


class ModelResolutionError(ResolutionError):
    """The model could not be resolved now. `reason` becomes the ModelResolved condition's reason."""


@dataclass(frozen=True)
class ConnectionStringCredential:
    connection_string: str = field(repr=False)


@dataclass(frozen=True)
class OperatorIdentityCredential:
    """The operator's own DefaultAzureCredential (workload identity in the cluster)."""


BlobCredential = ConnectionStringCredential | OperatorIdentityCredential


@dataclass(frozen=True)
class BlobProperties:
    etag: str
    size: int | None
    last_modified: str | None
    metadata: Mapping[str, str]


class ModelResolver(Protocol):
    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        """Return the blob's properties; raise ModelResolutionError."""
        ...


def check_model(model: ModelSpec, properties: BlobProperties) -> ResolvedModel:
    """Combine the spec's pins with what the blob service reports; raise ModelResolutionError on mismatch."""
    if model.version is not None and normalize_etag(model.version) != normalize_etag(properties.etag):
        raise ModelResolutionError(
            Reason.MODEL_VERSION_MISMATCH,
            f"pinned version {model.version} is no longer the blob's current version {properties.etag}: "
            "the blob was overwritten; pin the new version or republish the old content",
            retry_after=300,
        )
    published_sha, published_format = read_published_metadata(properties.metadata)
    if published_sha is not None and not _SHA256.match(published_sha):
        raise ModelResolutionError(
            Reason.MODEL_METADATA_INVALID, "blob metadata sha256 is not 64 hex characters", retry_after=300
        )
    if model.sha256 is not None and published_sha is not None and model.sha256 != published_sha:
        raise ModelResolutionError(
            Reason.MODEL_CHECKSUM_MISMATCH,
            f"spec.model.sha256 {model.sha256[:12]}... differs from the blob's metadata sha256 {published_sha[:12]}...",
            retry_after=300,
        )
    sha256 = model.sha256 or published_sha
    if sha256 is None:
        raise ModelResolutionError(
            Reason.MODEL_CHECKSUM_MISSING,
            "no sha256: set spec.model.sha256 or publish the blob with metadata sha256",
            retry_after=300,
        )
    if published_format is not None and published_format not in MODEL_FORMATS:
        raise ModelResolutionError(
            Reason.MODEL_FORMAT_UNKNOWN,
            f"blob metadata format {published_format[:32]!r} is not onnx, skops or pickle",
            retry_after=300,
        )
    if model.format is not None and published_format is not None and model.format != published_format:
        raise ModelResolutionError(
            Reason.MODEL_FORMAT_MISMATCH,
            f"spec.model.format {model.format} differs from the blob's metadata format {published_format}",
            retry_after=300,
        )
    model_format = model.format or published_format
    if model_format is None:
        raise ModelResolutionError(
            Reason.MODEL_FORMAT_UNKNOWN,
            "no format: set spec.model.format or publish the blob with metadata format",
            retry_after=300,
        )
    if model_format == "pickle" and not model.allow_pickle:
        raise ModelResolutionError(
            Reason.PICKLE_NOT_ALLOWED,
            "the blob is a pickle model: set spec.model.allowPickle: true to load it",
            retry_after=300,
        )
    return ResolvedModel(
        url=model.blob.url,
        version=properties.etag,
        sha256=sha256,
        format=model_format,
        size=properties.size,
        last_modified=properties.last_modified,
    )


class AzureBlobResolver:
    """ModelResolver on azure-storage-blob's async client. Close it with `close()`."""

    def __init__(self, *, timeout_seconds: float = 10.0) -> None:
        self._timeout = timeout_seconds
        self._identity: Any = None  # DefaultAzureCredential, created on first use

    async def close(self) -> None:
        if self._identity is not None:
            await self._identity.close()

    def _client(self, location: BlobLocation, credential: BlobCredential) -> Any:
        # Fail fast: the reconcile retries with its own backoff, the SDK must not stall it.
        options: dict[str, Any] = {
            "connection_timeout": self._timeout,
            "read_timeout": self._timeout,
            "retry_total": 1,
            "retry_backoff_factor": 0.5,
        }
        if isinstance(credential, ConnectionStringCredential):
            return BlobClient.from_connection_string(
                credential.connection_string, location.container, location.name, **options
            )
        if self._identity is None:
            self._identity = DefaultAzureCredential()
        return BlobClient(
            location.account_url.rstrip("/"), location.container, location.name, credential=self._identity, **options
        )

    async def get_properties(self, location: BlobLocation, credential: BlobCredential) -> BlobProperties:
        try:
            client = self._client(location, credential)
        except ValueError as error:
            raise ModelResolutionError(
                Reason.STORAGE_CREDENTIAL_INVALID, f"the connection string is not usable: {error}", retry_after=300
            ) from None
        where = f"{location.container}/{location.name}"
        try:
            async with client:
                properties = await client.get_blob_properties()
        except ResourceNotFoundError:
            raise ModelResolutionError(Reason.BLOB_NOT_FOUND, f"blob {where} does not exist", retry_after=30) from None
        except ClientAuthenticationError as error:
            raise ModelResolutionError(
                Reason.STORAGE_ACCESS_DENIED, f"not allowed to read {where}: {_first_line(error)}", retry_after=120
            ) from None
        except (ServiceRequestError, ServiceResponseError) as error:
            raise ModelResolutionError(
                Reason.STORAGE_UNAVAILABLE,
                f"cannot reach the blob service for {where}: {_first_line(error)}",
                retry_after=30,
            ) from None
        except HttpResponseError as error:
            code = error.status_code or 0
            if code in (401, 403):
                raise ModelResolutionError(
                    Reason.STORAGE_ACCESS_DENIED, f"not allowed to read {where} ({code})", retry_after=120
                ) from None
            raise ModelResolutionError(
                Reason.STORAGE_UNAVAILABLE,
                f"blob service answered {code} for {where}: {_first_line(error)}",
                retry_after=30,
            ) from None
        except Exception as error:  # credential chains raise their own types; never crash on them
            raise ModelResolutionError(
                Reason.STORAGE_UNAVAILABLE,
                f"reading {where} failed: {type(error).__name__}: {_first_line(error)}",
                retry_after=60,
            ) from None
        last_modified = properties.last_modified
        return BlobProperties(
            etag=str(properties.etag),
            size=int(properties.size) if properties.size is not None else None,
            last_modified=last_modified.isoformat() if isinstance(last_modified, datetime) else None,
            metadata=dict(properties.metadata or {}),
        )


def _first_line(error: BaseException) -> str:
    return redact(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)[:300]
