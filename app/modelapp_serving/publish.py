"""Publish a model file to Blob Storage with its sha256 and format as metadata.

A first upload is conditional on the blob being absent (If-None-Match: *); replacing a different model
needs overwrite=True and is conditional on the ETag that was checked (If-Match), so a concurrent
upload is never clobbered silently. Publishing the same content again is a no-op.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.identity import DefaultAzureCredential
from azure.storage.blob import BlobClient, BlobServiceClient, ContainerClient, ContentSettings
from cryptography.hazmat.primitives import serialization
from modelapp_contract.blob import (
    CONNECTION_STRING_ENVS,
    METADATA_SHA256,
    METADATA_SIGNATURE,
    SIGNATURE_SUFFIX,
    ModelFormat,
    parse_blob_url,
    published_metadata,
    redact_url,
)
from modelapp_contract.signing import SignatureError, encode_bundle, key_fingerprint, sign_model_file
from tqdm import tqdm

from modelapp_serving.config import ConfigError
from modelapp_serving.download import file_sha256

CONTENT_TYPES = {
    ModelFormat.ONNX: "application/octet-stream",
    ModelFormat.SKOPS: "application/zip",
    ModelFormat.PICKLE: "application/octet-stream",
}
UPLOAD_BLOCK_BYTES = 8 << 20
UPLOAD_CONCURRENCY = 8


class PublishError(Exception):
    """Publishing was refused or failed; the message says why and what to do."""


@dataclass(frozen=True)
class PublishedModel:
    etag: str
    sha256: str
    size: int
    url: str
    """Without any query string."""
    format: str
    uploaded: bool
    """False when the same content was already there (nothing was written)."""
    signer: str | None = None
    """The signing key's fingerprint when the model was published signed."""


def publish_model(
    path: str | os.PathLike[str],
    destination: str | tuple[str, str],
    *,
    connection_string: str | None = None,
    credential: Any = None,
    account_url: str | None = None,
    format: str | ModelFormat | None = None,
    overwrite: bool = False,
    progress: bool = True,
    sign_key: str | os.PathLike[str] | None = None,
) -> PublishedModel:
    """Upload `path` to `destination` (a blob URL, or (container, blob) with a connection string or
    account_url) and return its ETag and sha256, the values a ModelApp pins.

    Credentials: `connection_string`, else `credential` (any azure-identity credential, a SAS string
    or an account key), else a SAS in the URL, else DefaultAzureCredential.

    sign_key: an EC private key (PEM). The file is signed with OpenSSF model signing; the signature
    goes into the blob's metadata (so every snapshot or version of the blob carries the signature of
    exactly its bytes) and next to it as `<blob>.sig` for the model_signing command line.
    """
    model_path = Path(path)
    if not model_path.is_file():
        raise PublishError(f"{model_path} is not a file")
    try:
        model_format = ModelFormat(format) if format is not None else ModelFormat.from_suffix(model_path.name)
    except ValueError as error:
        raise PublishError(str(error)) from None
    container, blob = _clients(destination, connection_string, credential, account_url)
    shown_url = redact_url(blob.url)
    size = model_path.stat().st_size
    sha256 = file_sha256(model_path)
    metadata = published_metadata(sha256, model_format)
    signature: bytes | None = None
    signer: str | None = None
    if sign_key is not None:
        try:
            signature = sign_model_file(model_path, Path(sign_key))
            private = serialization.load_pem_private_key(Path(sign_key).read_bytes(), password=None)
            signer = key_fingerprint(
                private.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        except (SignatureError, OSError, ValueError, TypeError) as error:
            raise PublishError(f"cannot sign {model_path.name}: {error}") from None
        metadata[METADATA_SIGNATURE] = encode_bundle(signature)
    try:
        _ensure_container(container)
        existing = _existing_properties(blob)
        if existing is not None:
            existing_sha = (existing.metadata or {}).get(METADATA_SHA256, "")
            existing_signature = (existing.metadata or {}).get(METADATA_SIGNATURE)
            if existing_sha == sha256 and (signature is None or existing_signature == metadata[METADATA_SIGNATURE]):
                return PublishedModel(existing.etag, sha256, existing.size, shown_url, model_format.value, False)
            if not overwrite and existing_sha != sha256:
                shown = existing_sha or "no sha256 metadata"
                raise PublishError(
                    f"{shown_url} already holds a different model ({shown}); pass overwrite=True (--overwrite) "
                    "to replace it, or publish under a new name"
                )
            conditions: dict[str, Any] = {"etag": existing.etag, "match_condition": MatchConditions.IfNotModified}
        else:
            conditions = {"match_condition": MatchConditions.IfMissing}
        with (
            model_path.open("rb") as data,
            tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"upload {model_path.name}",
                file=sys.stderr,
                disable=not (progress and sys.stderr.isatty()),
            ) as bar,
        ):

            def report(current: int, total: int | None) -> None:
                bar.update(current - bar.n)

            result = blob.upload_blob(
                data,
                length=size,
                overwrite=True,
                metadata=metadata,
                content_settings=ContentSettings(content_type=CONTENT_TYPES[model_format]),
                max_concurrency=UPLOAD_CONCURRENCY,
                progress_hook=report,
                **conditions,
            )
    except (ResourceModifiedError, ResourceExistsError) as error:
        status = getattr(error, "status_code", None)
        raise PublishError(
            f"{shown_url} changed while publishing (HTTP {status}): someone else uploaded it; check and retry"
        ) from None
    except PublishError:
        raise
    except AzureError as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PublishError(f"publishing to {shown_url} failed: {first_line}") from None
    if signature is not None:
        # Next to the model for `model_signing verify`; the operator and the app read the metadata copy.
        try:
            container.get_blob_client(blob.blob_name + SIGNATURE_SUFFIX).upload_blob(signature, overwrite=True)
        except AzureError as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise PublishError(f"the model is published; writing its .sig blob failed: {first_line}") from None
    return PublishedModel(str(result["etag"]), sha256, size, shown_url, model_format.value, True, signer)


def _clients(
    destination: str | tuple[str, str], connection_string: str | None, credential: Any, account_url: str | None
) -> tuple[ContainerClient, BlobClient]:
    tuning: dict[str, Any] = {
        "max_block_size": UPLOAD_BLOCK_BYTES,
        "max_single_put_size": UPLOAD_BLOCK_BYTES,
        # Fail in seconds, not minutes, when the endpoint is down: a person is waiting at the prompt.
        "retry_total": 3,
        "connection_timeout": 10,
    }
    if isinstance(destination, tuple):
        container_name, blob_name = destination
        if connection_string:
            service = BlobServiceClient.from_connection_string(connection_string, **tuning)
        elif account_url:
            service = BlobServiceClient(account_url, credential=credential or DefaultAzureCredential(), **tuning)
        else:
            raise PublishError("with (container, blob) give a connection string or an account_url")
    else:
        try:
            location = parse_blob_url(destination)
        except ValueError as error:
            raise PublishError(str(error)) from None
        container_name, blob_name = location.container, location.blob
        if connection_string:
            service = BlobServiceClient.from_connection_string(connection_string, **tuning)
        elif credential is None and "?" in destination:
            # The URL carries a SAS token: it is the credential.
            sas = destination.split("?", 1)[1]
            service = BlobServiceClient(f"{location.account_url}?{sas}", **tuning)
        else:
            service = BlobServiceClient(
                location.account_url, credential=credential or DefaultAzureCredential(), **tuning
            )
    container = service.get_container_client(container_name)
    return container, container.get_blob_client(blob_name)


def _ensure_container(container: ContainerClient) -> None:
    try:
        container.create_container()
    except ResourceExistsError:
        pass
    except HttpResponseError as error:
        # A SAS scoped to one blob may not list or create containers: try the upload anyway.
        if error.status_code != 403:
            raise


def _existing_properties(blob: BlobClient) -> Any:
    try:
        return blob.get_blob_properties()
    except ResourceNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modelapp_serving.publish",
        description=(
            "Upload a model file to Azure Blob Storage with its sha256 and format as metadata, and print "
            "the ETag and sha256 to pin in a ModelApp. Refuses to replace a different model unless "
            "--overwrite; publishing the same content again changes nothing."
        ),
        epilog=(
            "credentials: --connection-string, else $MODELAPP_MODEL_CONNECTION_STRING or "
            "$AZURE_STORAGE_CONNECTION_STRING, else a SAS in the URL, else DefaultAzureCredential "
            "(az login, workload identity, managed identity)."
        ),
    )
    parser.add_argument("path", type=Path, help="model file (.onnx, .skops, .pkl/.joblib)")
    parser.add_argument("url", help="blob URL, e.g. https://acct.blob.core.windows.net/models/iris.onnx")
    parser.add_argument("--connection-string", help="storage connection string (prefer the env var)")
    parser.add_argument("--format", choices=[f.value for f in ModelFormat], help="default: from the suffix")
    parser.add_argument("--overwrite", action="store_true", help="replace a different model at this name")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    connection_string = args.connection_string or next(
        (os.environ[name] for name in CONNECTION_STRING_ENVS if os.environ.get(name)), None
    )
    try:
        published = publish_model(
            args.path,
            args.url,
            connection_string=connection_string,
            format=args.format,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (PublishError, ConfigError) as error:
        print(f"publish: {error}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(published), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
