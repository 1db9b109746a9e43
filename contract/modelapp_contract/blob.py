"""The model-blob contract: what the publisher writes, the operator resolves and the app downloads.

One module for the publisher (`modelapp publish-model`), the operator and the serving app, so the three
cannot drift apart.

- A model is one blob whose metadata holds its sha256 and format (METADATA_SHA256, METADATA_FORMAT).
- Formats: onnx, skops, pickle (ModelFormat); a file's suffix names its format.
- Blob URLs: https://<account>.blob.core.windows.net/<container>/<blob>, or path-style for the
  Azurite emulator, http://<host>:<port>/<account>/<container>/<blob>. The blob name is
  percent-quoted in a URL and unquoted when parsed.
- ETags compare without their quotes and weak prefix.
- A model version is pinned to something that never changes (PinnedVersion): the blob's version ID
  where the account keeps versions, else a snapshot the operator took conditionally on the ETag it
  resolved. Snapshots the operator took carry METADATA_PINNED_BY, so it deletes only its own.
- A signed model carries its OpenSSF model-signing bundle (base64) in METADATA_SIGNATURE, so the
  signature is part of the same immutable version as the bytes it covers; the publisher also
  writes it next to the model as `<blob>.sig` for the model_signing command line.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from modelapp_contract import container
from modelapp_contract.settings import ConfigError

# Blob metadata the publisher writes and the operator checks.
METADATA_SHA256 = "sha256"
METADATA_FORMAT = "format"
METADATA_SIGNATURE = "modelsignature"
# On snapshots the operator took: the uid of the ModelApp that pinned it (metadata keys are C# identifiers).
METADATA_PINNED_BY = "modelapppinnedby"
SIGNATURE_SUFFIX = ".sig"

# The emulator's well-known account (Azurite, the storage emulator).
EMULATOR_ACCOUNT = "devstoreaccount1"

# Where the publisher and the `modelapp` CLI look for a storage connection string, in this order.
CONNECTION_STRING_ENVS = (container.MODEL_CONNECTION_STRING, "AZURE_STORAGE_CONNECTION_STRING")


class ModelFormat(StrEnum):
    ONNX = "onnx"
    SKOPS = "skops"
    PICKLE = "pickle"

    @classmethod
    def from_suffix(cls, path: str) -> ModelFormat:
        """Infer the format from a file name: .onnx, .skops, .pkl/.pickle/.joblib."""
        suffix = Path(path).suffix.lower()
        if suffix not in FORMAT_BY_SUFFIX:
            raise ConfigError(
                f"cannot infer the model format from {Path(path).name!r}: use .onnx, .skops, .pkl or .joblib"
            )
        return FORMAT_BY_SUFFIX[suffix]


MODEL_FORMATS: tuple[str, ...] = tuple(f.value for f in ModelFormat)
FORMAT_BY_SUFFIX = {
    ".onnx": ModelFormat.ONNX,
    ".skops": ModelFormat.SKOPS,
    ".pkl": ModelFormat.PICKLE,
    ".pickle": ModelFormat.PICKLE,
    ".joblib": ModelFormat.PICKLE,
}


def published_metadata(sha256: str, model_format: ModelFormat | str) -> dict[str, str]:
    """The blob metadata a published model carries."""
    return {METADATA_SHA256: sha256, METADATA_FORMAT: str(model_format)}


def read_published_metadata(metadata: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(sha256, format) as published, lowercased and stripped; None where absent. Keys match in any case."""
    lowered = {k.lower(): v for k, v in metadata.items()}
    sha256 = lowered.get(METADATA_SHA256, "").strip().lower() or None
    model_format = lowered.get(METADATA_FORMAT, "").strip().lower() or None
    return sha256, model_format


@dataclass(frozen=True)
class PinnedVersion:
    """An immutable address of one model version: a blob version ID or a snapshot time (at most one)."""

    version_id: str | None = None
    snapshot: str | None = None

    def __post_init__(self) -> None:
        if self.version_id is not None and self.snapshot is not None:
            raise ValueError("a model version is pinned by a version ID or a snapshot, not both")

    @property
    def pinned(self) -> bool:
        return self.version_id is not None or self.snapshot is not None

    @property
    def kind(self) -> str:
        """versionId, snapshot or etag (nothing immutable: only the ETag, checked with If-Match)."""
        return "versionId" if self.version_id else "snapshot" if self.snapshot else "etag"

    @property
    def query(self) -> str:
        """The blob URL's query that addresses it: `versionid=...` or `snapshot=...` (empty when unpinned)."""
        if self.version_id:
            return f"versionid={quote(self.version_id, safe='')}"
        if self.snapshot:
            return f"snapshot={quote(self.snapshot, safe='')}"
        return ""

    def describe(self) -> str:
        return f"version {self.version_id}" if self.version_id else f"snapshot {self.snapshot}" if self.snapshot else ""

    @classmethod
    def from_query(cls, query: str) -> PinnedVersion:
        """Parse `versionid=...` or `snapshot=...` (what `query` renders); raise ValueError otherwise."""
        key, _, value = query.strip().partition("=")
        value = unquote(value)
        if not value or key.lower() not in ("versionid", "snapshot"):
            raise ValueError(f"expected versionid=<id> or snapshot=<time>, not {query[:80]!r}")
        return cls(version_id=value) if key.lower() == "versionid" else cls(snapshot=value)


def normalize_etag(etag: str) -> str:
    """ETags compare without their quotes and weak prefix: '"0x8D"' == '0x8D' == 'W/"0x8D"'."""
    return etag.strip().removeprefix("W/").strip('"')


def is_emulator(host: str, first_path_segment: str) -> bool:
    """Whether a blob endpoint is path-style (the account is the first path segment), as Azurite's is.

    By host (localhost or an IP address, as the Azure SDK decides) or by the emulator's
    well-known account name (Azurite behind a DNS name, e.g. a Service in the cluster)."""
    if first_path_segment == EMULATOR_ACCOUNT or host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def blob_url(account_url: str, container: str, blob: str) -> str:
    """The URL of a blob: the name percent-quoted (slashes kept), no query string."""
    return f"{account_url.rstrip('/')}/{container}/{quote(blob)}"


def normalize_account_url(url: str) -> str:
    """Lowercased scheme and host, no trailing slash: the form account URLs are compared in."""
    parts = urlsplit(url.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def account_name_of(account_url: str) -> str:
    """The storage account an account URL names: the path segment for the emulator, else the host's first label."""
    parts = urlsplit(account_url)
    segments = [s for s in parts.path.split("/") if s]
    if segments:
        return segments[0].lower()
    return (parts.hostname or "").split(".", 1)[0].lower()


@dataclass(frozen=True)
class BlobAddress:
    account_url: str
    """`https://acct.blob.core.windows.net` or `http://127.0.0.1:10000/devstoreaccount1`: lowercased host, no query."""
    container: str
    blob: str

    @property
    def url(self) -> str:
        """The blob URL without any query string (SAS tokens never leave this module)."""
        return blob_url(self.account_url, self.container, self.blob)

    @property
    def account_name(self) -> str:
        return account_name_of(self.account_url)


def parse_blob_url(url: str) -> BlobAddress:
    """Split a blob URL into account URL, container and blob name; raise ValueError saying what is wrong.

    https://acct.blob.core.windows.net/c/a/b.onnx -> (https://acct.blob.core.windows.net, c, a/b.onnx);
    http://127.0.0.1:10000/devstoreaccount1/c/b.onnx -> (http://127.0.0.1:10000/devstoreaccount1, c, b.onnx).
    Data Lake (dfs) URLs name the same blob as the blob endpoint."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
    except ValueError:
        raise ValueError(f"not an http(s) blob URL: {redact_url(url)!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        raise ValueError(f"not an http(s) blob URL: {redact_url(url)!r}")
    if parts.username or parts.password:
        raise ValueError("the blob URL must not carry a user name or password")
    segments = [unquote(s) for s in parts.path.split("/")]
    segments = segments[1:] if segments and segments[0] == "" else segments
    base = f"{scheme}://{parts.netloc.lower().replace('.dfs.core.', '.blob.core.')}"
    if segments and is_emulator(host, segments[0]):
        if len(segments) < 3 or not segments[0]:
            raise ValueError(f"the blob URL needs an account, a container and a blob name: {redact_url(url)!r}")
        base, segments = f"{base}/{segments[0]}", segments[1:]
    if len(segments) < 2 or not segments[0] or not all(segments[1:]):
        raise ValueError(f"the blob URL needs a container and a blob name: {redact_url(url)!r}")
    return BlobAddress(base, segments[0], "/".join(segments[1:]))


def try_parse_blob_url(url: str) -> BlobAddress | None:
    """parse_blob_url, or None when url is not a blob URL (for events that may name anything)."""
    try:
        return parse_blob_url(url)
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """Drop the query string and fragment (a SAS token is a credential) and any user info."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
