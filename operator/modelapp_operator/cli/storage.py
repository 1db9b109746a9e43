"""The CLI's one storage read: does the model version a rollback restores still exist?

I/O only (the decision is cli.status.pin_problem). Credentials are the ones publish-model uses:
a connection string, else DefaultAzureCredential (az login, workload identity) on the blob's own
account URL. Every failure to get an answer is a StorageCheckError, so the caller can say
"nothing changed" and what to give, whatever went wrong.
"""

from __future__ import annotations

import contextlib
from typing import Any

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.storage.blob import BlobClient, ExponentialRetry
from modelapp_contract.blob import parse_blob_url
from modelapp_operator.cli.status import PinCheck


class StorageCheckError(Exception):
    """Storage could not answer (unreachable, no credentials, forbidden): nothing is known."""


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def pinned_etag(check: PinCheck, connection_string: str | None, *, timeout: float = 10.0) -> str | None:
    """The ETag of the pinned snapshot/version (or of the blob when unpinned); None when it is gone."""
    try:
        location = parse_blob_url(check.url)
    except ValueError as error:
        raise StorageCheckError(f"the history entry's model URL cannot be read: {error}") from None
    if not connection_string and location.account_url.startswith("http:"):
        # The storage SDK refuses token credentials over plain http ("Token credential is only
        # supported with HTTPS."); say so before trying, in terms of what the user can change.
        raise StorageCheckError(
            f"storage at {location.account_url} is reached over http, where Entra ID credentials "
            "(DefaultAzureCredential) cannot be used: it needs a connection string"
        )
    options: dict[str, Any] = {
        "snapshot": check.pin.snapshot,
        "version_id": check.pin.version_id,
        # A person waits at the prompt: one retry after about a second (the storage SDK's default
        # backoff starts at 15 s: ~40 s before an unreachable endpoint is reported).
        "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=1, random_jitter_range=1),
        "connection_timeout": timeout,
        "read_timeout": timeout,
    }
    endpoint = location.account_url
    try:
        with contextlib.ExitStack() as stack:
            if connection_string:
                client = BlobClient.from_connection_string(
                    connection_string, location.container, location.blob, **options
                )
            else:
                from azure.identity import DefaultAzureCredential  # noqa: PLC0415

                credential = stack.enter_context(DefaultAzureCredential())
                client = BlobClient(
                    location.account_url, location.container, location.blob, credential=credential, **options
                )
            endpoint = f"{client.scheme}://{client.primary_hostname}"  # the connection string's, if one was given
            stack.enter_context(client)
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
        raise StorageCheckError(f"storage at {endpoint} cannot be reached: {_first_line(error)}") from None
    except AzureError as error:
        raise StorageCheckError(f"{location.url}: {_first_line(error)}") from None
    except ValueError as error:
        # The SDK refuses its arguments before any request: a malformed connection string, a
        # credential it cannot use on that endpoint.
        raise StorageCheckError(f"the storage client refused the settings: {_first_line(error)}") from None
    except Exception as error:
        # Anything else still means "nothing is known": the rollback must not go ahead unchecked.
        raise StorageCheckError(f"{location.url}: {type(error).__name__}: {_first_line(error)}") from None
