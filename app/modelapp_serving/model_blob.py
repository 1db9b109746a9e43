"""The model-blob contract, as the app's modules import it: it lives in `modelapp_contract.blob` (shared with
the operator and the publisher); this module only re-exports it."""

from __future__ import annotations

from modelapp_contract.blob import (
    CONNECTION_STRING_ENVS,
    EMULATOR_ACCOUNT,
    FORMAT_BY_SUFFIX,
    METADATA_FORMAT,
    METADATA_PINNED_BY,
    METADATA_SHA256,
    METADATA_SIGNATURE,
    MODEL_FORMATS,
    SIGNATURE_SUFFIX,
    BlobAddress,
    ModelFormat,
    PinnedVersion,
    account_name_of,
    blob_url,
    is_emulator,
    normalize_account_url,
    normalize_etag,
    parse_blob_url,
    published_metadata,
    read_published_metadata,
    redact_url,
    try_parse_blob_url,
)

__all__ = [
    "CONNECTION_STRING_ENVS",
    "EMULATOR_ACCOUNT",
    "FORMAT_BY_SUFFIX",
    "METADATA_FORMAT",
    "METADATA_PINNED_BY",
    "METADATA_SHA256",
    "METADATA_SIGNATURE",
    "MODEL_FORMATS",
    "SIGNATURE_SUFFIX",
    "BlobAddress",
    "ModelFormat",
    "PinnedVersion",
    "account_name_of",
    "blob_url",
    "is_emulator",
    "normalize_account_url",
    "normalize_etag",
    "parse_blob_url",
    "published_metadata",
    "read_published_metadata",
    "redact_url",
    "try_parse_blob_url",
]
