"""The CLI's one storage read: does the model version a rollback restores still exist?

I/O only (the decision is cli.status.pin_problem). Credentials are the ones publish-model uses:
a connection string, else DefaultAzureCredential (az login, workload identity) on the blob's own
account URL.
"""

from __future__ import annotations

from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.storage.blob import BlobClient, ExponentialRetry
from modelapp_operator.cli.status import PinCheck
from modelapp_serving.model_blob import parse_blob_url


class StorageCheckError(Exception):
    """Storage could not answer (unreachable, no credentials, forbidden): nothing is known."""


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def pinned_etag(check: PinCheck, connection_string: str | None, *, timeout: float = 10.0) -> str | None:
    """The ETag of the pinned snapshot/version (or of the blob when unpinned); None when it is gone."""
    location = parse_blob_url(check.url)
    options: dict[str, Any] = {
        "snapshot": check.pin.snapshot,
        "version_id": check.pin.version_id,
        # A person waits at the prompt: one retry after about a second (the storage SDK's default
        # backoff starts at 15 s: ~40 s before an unreachable endpoint is reported).
        "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=1, random_jitter_range=1),
        "connection_timeout": timeout,
        "read_timeout": timeout,
    }
    if connection_string:
        client = BlobClient.from_connection_string(connection_string, location.container, location.blob, **options)
    else:
        from azure.identity import DefaultAzureCredential  # noqa: PLC0415

        client = BlobClient(
            location.account_url, location.container, location.blob, credential=DefaultAzureCredential(), **options
        )
    try:
        with client:
            return str(client.get_blob_properties().etag)
    except ResourceNotFoundError:
        return None
    except ClientAuthenticationError as error:
        raise StorageCheckError(f"no usable storage credentials for {location.url}: {_first_line(error)}") from None
    except HttpResponseError as error:
        if error.status_code == 403:
            raise StorageCheckError(f"storage refused the read of {location.url} (HTTP 403)") from None
        raise StorageCheckError(f"{location.url}: HTTP {error.status_code}: {_first_line(error)}") from None
    except ServiceRequestError as error:
        endpoint = f"{client.scheme}://{client.primary_hostname}"  # the connection string's, if one was given
        raise StorageCheckError(f"storage at {endpoint} cannot be reached: {_first_line(error)}") from None
    except AzureError as error:
        raise StorageCheckError(f"{location.url}: {_first_line(error)}") from None
