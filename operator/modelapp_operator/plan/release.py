"""The (image, model) pair a ModelApp runs: what each side resolved to, and the pair as a value.

Pure: no I/O. A Release is what the Deployment's pod template runs; a Pair is its identity
(image digest, model version without quotes), as history and failedPairs record it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from modelapp_contract.blob import PinnedVersion, normalize_etag
from modelapp_operator.api.modelapp_types import ModelAppSpec


@dataclass(frozen=True)
class ResolvedImage:
    repository: str
    digest: str  # sha256:<64 hex>
    tag: str | None = None

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"

    @property
    def short_digest(self) -> str:
        return short_digest(self.digest)


@dataclass(frozen=True)
class ResolvedModel:
    url: str
    version: str  # the ETag exactly as the blob service returns it (quoted)
    sha256: str
    format: str
    size: int | None = None
    last_modified: str | None = None
    # What never changes: the version ID or the operator's snapshot of `version` (none: ETag only).
    pin: PinnedVersion = field(default_factory=PinnedVersion)
    # Where the expected sha256 came from: spec (spec.model.sha256), metadata (the blob's), signature.
    verified_by: str = "metadata"
    signer: str | None = None  # the signature's key fingerprint or certificate subject


def pin_fields(model: ResolvedModel) -> dict[str, str]:
    """The pin as status and history record it (absent keys: not pinned)."""
    fields = {"versionId": model.pin.version_id, "snapshot": model.pin.snapshot}
    return {k: v for k, v in fields.items() if v}


def pin_from(record: Mapping[str, Any], prefix: str = "") -> PinnedVersion:
    """The pin a status.model (prefix "") or a history entry (prefix "model") recorded."""

    def read(name: str) -> str | None:
        key = f"{prefix}{name[0].upper()}{name[1:]}" if prefix else name
        value = record.get(key)
        return value if isinstance(value, str) and value else None

    version_id, snapshot = read("versionId"), read("snapshot")
    return PinnedVersion(version_id=version_id, snapshot=None if version_id else snapshot)


@dataclass(frozen=True)
class Release:
    """The (image digest, model version) pair a Deployment runs."""

    image: ResolvedImage
    model: ResolvedModel


def short_digest(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


def release_from_status(status: Mapping[str, Any]) -> Release | None:
    """The pair the last reconcile deployed, as recorded in status (None before the first)."""
    image = status.get("image") or {}
    model = status.get("model") or {}
    try:
        return Release(
            image=ResolvedImage(repository=image["repository"], digest=image["digest"], tag=image.get("tag")),
            model=ResolvedModel(
                url=model["url"],
                version=model["version"],
                sha256=model["sha256"],
                format=model["format"],
                size=model.get("size"),
                last_modified=model.get("lastModified"),
                pin=pin_from(model),
                verified_by=str(model.get("verifiedBy") or "metadata"),
                signer=model.get("signer"),
            ),
        )
    except (KeyError, TypeError):
        return None


def pinned_image(spec: ModelAppSpec, status: Mapping[str, Any]) -> ResolvedImage | None:
    """The image needing no registry call: a pinned digest, or a tag resolved before with followTag false."""
    if spec.image.digest is not None:
        return ResolvedImage(repository=spec.image.repository, digest=spec.image.digest)
    if spec.image.follows_tag:
        return None
    recorded = status.get("image") or {}
    if (
        recorded.get("repository") == spec.image.repository
        and recorded.get("tag") == spec.image.tag
        and isinstance(recorded.get("digest"), str)
    ):
        return ResolvedImage(repository=spec.image.repository, digest=recorded["digest"], tag=spec.image.tag)
    return None


Pair = tuple[str, str]  # (image digest, model version without quotes)


def pair_of(image_digest: str, model_version: str) -> Pair:
    return image_digest, normalize_etag(model_version)


def release_pair(release: Release) -> Pair:
    return pair_of(release.image.digest, release.model.version)


def entry_pair(entry: Mapping[str, Any]) -> Pair:
    return pair_of(str(entry.get("imageDigest") or ""), str(entry.get("modelVersion") or ""))


def describe_pair(image_digest: str, model_version: str) -> str:
    return f"image {short_digest(image_digest)} model {model_version}"
