"""Serving configuration, read from `MODELAPP_*` env vars and validated once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from modelapp_serving.model_blob import BlobAddress, ModelFormat, PinnedVersion, parse_blob_url
from modelapp_serving.settings import ConfigError, env_bool, env_int, env_required

__all__ = ["ConfigError", "ModelFormat", "ModelSpec", "ServingConfig"]

DEFAULT_CACHE_DIR = Path("/var/cache/modelapp")
DEFAULT_PORT = 8080
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: ~25k iris rows, far more than an online request needs.
DEFAULT_DOWNLOAD_CONCURRENCY = 8
DEFAULT_DOWNLOAD_CHUNK_BYTES = 8 << 20

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
"""A model name in the Open Inference Protocol's URLs (/v2/models/<name>): one path segment, nothing to quote."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to serve: where it is and what it must be."""

    url: str
    etag: str
    sha256: str
    format: ModelFormat
    pin: PinnedVersion = field(default_factory=PinnedVersion)
    """The immutable version to download (MODELAPP_MODEL_PIN); unpinned: the blob, If-Match the ETag."""
    signature_public_key: bytes | None = field(default=None, repr=False)
    """PEM public key (MODELAPP_MODEL_SIGNATURE_PUBLIC_KEY): the model must carry a signature made with it."""

    @property
    def location(self) -> BlobAddress:
        return parse_blob_url(self.url)


@dataclass(frozen=True)
class ServingConfig:
    model: ModelSpec | None
    """None only for tests and tools that hand the app an in-memory model."""
    connection_string: str | None = field(default=None, repr=False)
    cache_dir: Path = DEFAULT_CACHE_DIR
    port: int = DEFAULT_PORT
    allow_pickle: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    download_concurrency: int = DEFAULT_DOWNLOAD_CONCURRENCY
    download_chunk_bytes: int = DEFAULT_DOWNLOAD_CHUNK_BYTES
    onnx_threads: int = 1
    """Threads per ONNX session; 1 because gunicorn already runs one process per core."""
    image: str | None = None
    """The image this pod runs, by digest (the operator sets it); shown by /version and /metrics."""
    model_name: str | None = None
    """The model's name in the Open Inference Protocol (MODELAPP_MODEL_NAME); None: oip.served_model_name's rule."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingConfig:
        """Read and check every setting; raise ConfigError naming the first bad env var."""
        env = os.environ if env is None else env
        etag = env_required(env, "MODELAPP_MODEL_ETAG")
        sha256 = env_required(env, "MODELAPP_MODEL_SHA256").lower()
        if not _SHA256_HEX.fullmatch(sha256):
            raise ConfigError("MODELAPP_MODEL_SHA256 must be 64 hex characters (the sha256 of the model file)")
        url = env_required(env, "MODELAPP_MODEL_URL")
        try:
            parse_blob_url(url)
        except ValueError as error:
            raise ConfigError(f"MODELAPP_MODEL_URL: {error}") from None
        format_name = env_required(env, "MODELAPP_MODEL_FORMAT").lower()
        try:
            model_format = ModelFormat(format_name)
        except ValueError:
            allowed = ", ".join(f.value for f in ModelFormat)
            raise ConfigError(f"MODELAPP_MODEL_FORMAT must be one of {allowed}, not {format_name!r}") from None
        allow_pickle = env_bool(env, "MODELAPP_ALLOW_PICKLE", default=False)
        if model_format is ModelFormat.PICKLE and not allow_pickle:
            raise ConfigError(
                "MODELAPP_MODEL_FORMAT=pickle needs MODELAPP_ALLOW_PICKLE=true (loading a pickle runs code)"
            )
        try:
            pin = PinnedVersion.from_query(env["MODELAPP_MODEL_PIN"]) if env.get("MODELAPP_MODEL_PIN") else None
        except ValueError as error:
            raise ConfigError(f"MODELAPP_MODEL_PIN: {error}") from None
        public_key = env.get("MODELAPP_MODEL_SIGNATURE_PUBLIC_KEY", "").strip()
        cache_dir = Path(env.get("MODELAPP_MODEL_CACHE_DIR", "") or DEFAULT_CACHE_DIR)
        model_name = env.get("MODELAPP_MODEL_NAME", "").strip() or None
        if model_name is not None and not MODEL_NAME_PATTERN.fullmatch(model_name):
            raise ConfigError(
                f"MODELAPP_MODEL_NAME must be 1-253 letters, digits, '_', '.' or '-' (not first), not {model_name!r}"
            )
        if not cache_dir.is_absolute():
            raise ConfigError(f"MODELAPP_MODEL_CACHE_DIR must be an absolute path, not {str(cache_dir)!r}")
        return cls(
            model=ModelSpec(
                url=url,
                etag=etag,
                sha256=sha256,
                format=model_format,
                pin=pin or PinnedVersion(),
                signature_public_key=public_key.encode() if public_key else None,
            ),
            connection_string=env.get("MODELAPP_MODEL_CONNECTION_STRING") or None,
            cache_dir=cache_dir,
            port=env_int(env, "MODELAPP_PORT", DEFAULT_PORT, low=1, high=65535),
            allow_pickle=allow_pickle,
            max_request_bytes=env_int(env, "MODELAPP_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES, low=1),
            download_concurrency=env_int(
                env, "MODELAPP_DOWNLOAD_CONCURRENCY", DEFAULT_DOWNLOAD_CONCURRENCY, low=1, high=64
            ),
            download_chunk_bytes=env_int(
                env,
                "MODELAPP_DOWNLOAD_CHUNK_BYTES",
                DEFAULT_DOWNLOAD_CHUNK_BYTES,
                low=64 << 10,
                high=256 << 20,
            ),
            onnx_threads=env_int(env, "MODELAPP_ONNX_THREADS", 1, low=0, high=256),
            image=env.get("MODELAPP_IMAGE") or None,
            model_name=model_name,
        )
