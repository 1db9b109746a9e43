"""The model side's decisions, over the facts the blob service returned: which version to read, which pin
names it, and whether what was read is a model the spec allows (sha256, format, pickle, signature).

Pure: reconcile/resolve.py reads (clients/blob_storage.py) and verifies a signature, then asks these
functions; a refusal comes back as a `ModelRefusal` value (the ModelResolved condition's reason and message),
never as an exception.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from modelapp_contract.blob import (
    METADATA_SIGNATURE,
    MODEL_FORMATS,
    PinnedVersion,
    normalize_etag,
    read_published_metadata,
)
from modelapp_contract.signing import VerifiedSignature
from modelapp_operator.api.modelapp_types import ModelSpec
from modelapp_operator.names import Reason
from modelapp_operator.plan.history import known_pin
from modelapp_operator.plan.release import ResolvedModel

# A refusal stands until the blob or the spec changes (either makes a new reconcile): look again only rarely.
REFUSAL_RETRY_SECONDS = 300.0

_SHA256 = re.compile(r"^[a-f0-9]{64}$")


class BlobFacts(Protocol):
    """What the blob service said about one version of the model blob (clients/blob_storage.BlobProperties)."""

    @property
    def etag(self) -> str: ...

    @property
    def size(self) -> int | None: ...

    @property
    def last_modified(self) -> str | None: ...

    @property
    def metadata(self) -> Mapping[str, str]: ...

    @property
    def version_id(self) -> str | None: ...


@dataclass(frozen=True)
class ModelRefusal:
    """Why the model cannot be run: the ModelResolved condition's reason and message."""

    reason: str
    message: str
    retry_after: float = REFUSAL_RETRY_SECONDS


def version_to_read(
    model: ModelSpec, current: BlobFacts, status: Mapping[str, Any], *, can_restore: bool
) -> PinnedVersion | ModelRefusal | None:
    """Which version of the blob the spec wants: None for the current one (no spec.model.version, or the one
    it names); the pin of the earlier version spec.model.version names (a rollback), which status recorded;
    a refusal when that version can no longer be read (never the blob's current bytes in its place)."""
    if model.version is None or normalize_etag(model.version) == normalize_etag(current.etag):
        return None
    known = known_pin(status, model.blob.url, model.version)
    if known is None or not can_restore:
        return ModelRefusal(
            Reason.MODEL_VERSION_MISMATCH,
            f"pinned version {model.version} is no longer the blob's current version {current.etag} "
            "and no snapshot or version of it is recorded: it cannot be restored; pin the current "
            "version or republish the old content",
        )
    return known


def existing_pin(model: ModelSpec, read: BlobFacts, status: Mapping[str, Any]) -> PinnedVersion | None:
    """What already pins the version read: its version ID (an account with versioning) or a snapshot status
    names; None: a snapshot must be taken."""
    if read.version_id:
        return PinnedVersion(version_id=read.version_id)
    return known_pin(status, model.blob.url, read.etag)


def signature_bundle(model: ModelSpec, read: BlobFacts) -> str | None:
    """The signature to verify: the version's bundle (base64) when the spec names a key; None otherwise."""
    if model.signature is None:
        return None
    return {k.lower(): v for k, v in read.metadata.items()}.get(METADATA_SIGNATURE) or None


def check_model(
    model: ModelSpec, read: BlobFacts, signed: VerifiedSignature | None = None
) -> ResolvedModel | ModelRefusal:
    """The version read, checked against the spec's pins and the published metadata; a refusal on a mismatch.

    signed: the version's verified signature; its sha256 is then the expected one (never the metadata's)."""
    if signed is None and model.requires_signature:
        return ModelRefusal(
            Reason.SIGNATURE_MISSING,
            f"model version {read.etag} is not signed (no {METADATA_SIGNATURE} metadata) and "
            "spec.model.signature.required is true: publish it with `modelapp publish-model --sign-key`",
        )
    published_sha, published_format = read_published_metadata(read.metadata)
    refusal = _sha256_refusal(model, published_sha, signed) or _format_refusal(model, published_format)
    if refusal is not None:
        return refusal
    sha256 = signed.sha256 if signed is not None else model.sha256 or published_sha
    model_format = model.format or published_format
    assert sha256 is not None and model_format is not None  # both refused above when absent
    return ResolvedModel(
        url=model.blob.url,
        version=read.etag,
        sha256=sha256,
        format=model_format,
        size=read.size,
        last_modified=read.last_modified,
        verified_by="signature" if signed is not None else "spec" if model.sha256 is not None else "metadata",
        signer=signed.signer if signed is not None else None,
    )


def _sha256_refusal(model: ModelSpec, published: str | None, signed: VerifiedSignature | None) -> ModelRefusal | None:
    if published is not None and not _SHA256.match(published):
        return ModelRefusal(Reason.MODEL_METADATA_INVALID, "blob metadata sha256 is not 64 hex characters")
    if signed is not None and published is not None and published != signed.sha256:
        return ModelRefusal(
            Reason.SIGNATURE_INVALID,
            f"the blob's metadata sha256 {published[:12]}... is not the signed sha256 {signed.sha256[:12]}...",
        )
    if model.sha256 is not None and signed is not None and model.sha256 != signed.sha256:
        return ModelRefusal(
            Reason.MODEL_CHECKSUM_MISMATCH,
            f"spec.model.sha256 {model.sha256[:12]}... differs from the signed sha256 {signed.sha256[:12]}...",
        )
    if model.sha256 is not None and published is not None and model.sha256 != published:
        return ModelRefusal(
            Reason.MODEL_CHECKSUM_MISMATCH,
            f"spec.model.sha256 {model.sha256[:12]}... differs from the blob's metadata sha256 {published[:12]}...",
        )
    if signed is None and model.sha256 is None and published is None:
        return ModelRefusal(
            Reason.MODEL_CHECKSUM_MISSING, "no sha256: set spec.model.sha256 or publish the blob with metadata sha256"
        )
    return None


def _format_refusal(model: ModelSpec, published: str | None) -> ModelRefusal | None:
    if published is not None and published not in MODEL_FORMATS:
        return ModelRefusal(
            Reason.MODEL_FORMAT_UNKNOWN, f"blob metadata format {published[:32]!r} is not onnx, skops or pickle"
        )
    if model.format is not None and published is not None and model.format != published:
        return ModelRefusal(
            Reason.MODEL_FORMAT_MISMATCH,
            f"spec.model.format {model.format} differs from the blob's metadata format {published}",
        )
    model_format = model.format or published
    if model_format is None:
        return ModelRefusal(
            Reason.MODEL_FORMAT_UNKNOWN, "no format: set spec.model.format or publish the blob with metadata format"
        )
    if model_format == "pickle" and not model.allow_pickle:
        return ModelRefusal(
            Reason.PICKLE_NOT_ALLOWED, "the blob is a pickle model: set spec.model.allowPickle: true to load it"
        )
    return None
