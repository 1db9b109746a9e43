"""The serving app's configuration: every variable it reads, read and checked once at start-up.

`ServingConfig.from_env` reads the model and serving settings, `ServerConfig.from_env` gunicorn's; both use
the contract's one set of helpers (modelapp_contract.settings) and the variable names the operator renders
(modelapp_contract.container). `modelapp-serve` checks both before it runs gunicorn, and gunicorn's master
checks them again before it forks. `VARIABLES` names every variable the app reads: `modelapp-serve --help`
prints it, and a unit test keeps it, the reads and the docs' table the same set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from modelapp_contract import container
from modelapp_contract.blob import BlobAddress, ModelFormat, PinnedVersion, parse_blob_url
from modelapp_contract.probes import default_liveness_port
from modelapp_contract.settings import (
    ConfigError,
    Variable,
    boolean,
    choice,
    file_text,
    integer,
    number,
    required,
    text,
)

__all__ = ["VARIABLES", "ConfigError", "ModelFormat", "ModelSpec", "ServerConfig", "ServingConfig"]

DEFAULT_CACHE_DIR = Path(container.CACHE_DIR)
DEFAULT_PORT = container.DEFAULT_PORT
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: ~25k iris rows, far more than an online request needs.
DEFAULT_DOWNLOAD_CONCURRENCY = 8
DEFAULT_DOWNLOAD_CHUNK_BYTES = 8 << 20
DEFAULT_SHADOW_MAX_IN_FLIGHT = 8
DEFAULT_SHADOW_TIMEOUT_SECONDS = 2.0
WORKER_CLASSES = ("asgi", "gthread", "sync")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# Set by gunicorn's master for its workers (never by a person): a run id for the verified-download stamp
# (download.py) and the refusal token's pipe (refusal_token.py).
RUN_ID_ENV = "MODELAPP_VERIFY_RUN_ID"
REFUSAL_TOKEN_FD_ENV = "MODELAPP_REFUSAL_TOKEN_FD"  # noqa: S105 - a variable name, not a secret

MODEL_VARIABLES: tuple[Variable, ...] = (
    Variable(container.MODEL_URL, "", "the model's blob URL (required; no credential is shown anywhere)"),
    Variable(container.MODEL_ETAG, "", "the version (ETag) to serve (required): a changed blob is refused"),
    Variable(container.MODEL_SHA256, "", "the sha256 (hex) the file must have (required): a mismatch is refused"),
    Variable(container.MODEL_FORMAT, "", "onnx, skops or pickle (required)"),
    Variable(container.MODEL_PIN, "", "versionid=<id> or snapshot=<time>: the immutable version to download"),
    Variable(
        container.MODEL_CONNECTION_STRING_FILE,
        "",
        "a file holding the storage connection string (the operator mounts its Secret there); wins over the next",
    ),
    Variable(container.MODEL_CONNECTION_STRING, "", "storage connection string; neither set: DefaultAzureCredential"),
    Variable(container.MODEL_SIGNATURE_PUBLIC_KEY, "", "PEM public key: the model must carry a signature by it"),
    Variable(container.MODEL_CACHE_DIR, container.CACHE_DIR, "where the verified model is cached"),
    Variable(container.ALLOW_PICKLE, "false", "true to allow pickle/joblib models (loading them runs code)"),
    Variable(container.EXIT_ON_REFUSAL, "false", "true: a refused model stops the container (exit code 4)"),
    Variable(container.PORT, str(DEFAULT_PORT), "port of /predict, /readyz and the rest"),
    Variable(container.LIVENESS_PORT, "the next port", "port of the gunicorn master's /livez"),
    Variable(container.IMAGE, "", "the image by digest, shown by /version and /metrics"),
    Variable(
        container.MODEL_NAME,
        "the blob's file name without extension",
        "the model's name under /v2 (the operator sets the ModelApp's name)",
    ),
    Variable(container.SHADOW_URL, "", "the release gate's candidate (http://host:port): /predict is also sent there"),
    Variable(container.SHADOW_PERCENT, "100", "share of /predict requests also sent to the candidate, 0-100"),
    Variable(container.SHADOW_TOLERANCE, "0", "numbers in the two answers agree within this; labels must be equal"),
)
"""What the ModelApp operator sets (modelapp_contract.container)."""

SERVING_VARIABLES: tuple[Variable, ...] = (
    Variable("MODELAPP_WORKERS", "one per CPU (cgroup quota), at least 2", "gunicorn worker processes"),
    Variable("MODELAPP_WORKER_CLASS", "asgi", "asgi (uvicorn workers, /predict on the event loop), gthread or sync"),
    Variable("MODELAPP_THREADS", "4", "threads per gthread worker"),
    Variable("MODELAPP_REUSE_PORT", "true", "one SO_REUSEPORT socket per worker"),
    Variable("MODELAPP_MAX_REQUEST_BYTES", str(DEFAULT_MAX_REQUEST_BYTES), "request body limit (413 above)"),
    Variable("MODELAPP_ACCESS_LOG", "false", "true to log every request"),
    Variable("MODELAPP_LOG_LEVEL", "info", "debug, info, warning, error or critical"),
    Variable("MODELAPP_DOWNLOAD_CONCURRENCY", str(DEFAULT_DOWNLOAD_CONCURRENCY), "parallel ranged GETs"),
    Variable("MODELAPP_DOWNLOAD_CHUNK_BYTES", str(DEFAULT_DOWNLOAD_CHUNK_BYTES), "bytes per ranged GET"),
    Variable("MODELAPP_ONNX_THREADS", "1", "threads per ONNX session (0: onnxruntime's choice)"),
    Variable("PROMETHEUS_MULTIPROC_DIR", "", "set to aggregate /metrics over the workers"),
    Variable(
        "MODELAPP_SHADOW_MAX_IN_FLIGHT", str(DEFAULT_SHADOW_MAX_IN_FLIGHT), "shadowed requests under way per worker"
    ),
    Variable(
        "MODELAPP_SHADOW_TIMEOUT_SECONDS", str(DEFAULT_SHADOW_TIMEOUT_SECONDS), "the candidate's time to answer one"
    ),
)
"""The image's own settings (spec.env cannot set MODELAPP_* variables)."""

INTERNAL_VARIABLES: tuple[Variable, ...] = (
    Variable(RUN_ID_ENV, "", "the master's run id: workers of one run hash the cached model once"),
    Variable(REFUSAL_TOKEN_FD_ENV, "", "the master's refusal token: one worker reports a refusal"),
)
"""Set by gunicorn's master for its workers; never set them."""

VARIABLES = MODEL_VARIABLES + SERVING_VARIABLES + INTERNAL_VARIABLES

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
class ShadowConfig:
    """Where shadowed requests go and how many (shadow.py; the operator sets the MODELAPP_SHADOW_* variables)."""

    url: str  # the candidate's base URL; requests go to <url>/predict
    percent: float  # share of /predict requests also sent to the candidate, 0-100
    tolerance: float = 0.0  # numbers within this agree (absolute); labels must be equal
    max_in_flight: int = DEFAULT_SHADOW_MAX_IN_FLIGHT  # per worker: more are dropped, never queued
    timeout_seconds: float = DEFAULT_SHADOW_TIMEOUT_SECONDS

    @property
    def predict_url(self) -> str:
        return self.url.rstrip("/") + "/predict"


@dataclass(frozen=True)
class ServingConfig:
    model: ModelSpec | None
    """None only for tests and tools that hand the app an in-memory model."""
    connection_string: str | None = field(default=None, repr=False)
    cache_dir: Path = DEFAULT_CACHE_DIR
    allow_pickle: bool = False
    exit_on_refusal: bool = False
    """A refused model stops the container (MODELAPP_EXIT_ON_REFUSAL; the operator sets it): read at start-up."""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    download_concurrency: int = DEFAULT_DOWNLOAD_CONCURRENCY
    download_chunk_bytes: int = DEFAULT_DOWNLOAD_CHUNK_BYTES
    onnx_threads: int = 1
    """Threads per ONNX session; 1 because gunicorn already runs one process per core."""
    image: str | None = None
    """The image this pod runs, by digest (the operator sets it); shown by /version and /metrics."""
    model_name: str | None = None
    """The model's name in the Open Inference Protocol (MODELAPP_MODEL_NAME); None: oip.served_model_name's rule."""
    shadow: ShadowConfig | None = None
    """The release gate's shadow traffic (MODELAPP_SHADOW_URL); None: none."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingConfig:
        """Read and check every setting; raise ConfigError naming the first bad env var."""
        env = os.environ if env is None else env
        return cls(
            model=_model_spec(env),
            connection_string=file_text(env, container.MODEL_CONNECTION_STRING_FILE)
            or text(env, container.MODEL_CONNECTION_STRING)
            or None,
            cache_dir=_cache_dir(env),
            allow_pickle=boolean(env, container.ALLOW_PICKLE, default=False),
            exit_on_refusal=boolean(env, container.EXIT_ON_REFUSAL, default=False),
            max_request_bytes=integer(env, "MODELAPP_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES, low=1),
            download_concurrency=integer(
                env, "MODELAPP_DOWNLOAD_CONCURRENCY", DEFAULT_DOWNLOAD_CONCURRENCY, low=1, high=64
            ),
            download_chunk_bytes=integer(
                env, "MODELAPP_DOWNLOAD_CHUNK_BYTES", DEFAULT_DOWNLOAD_CHUNK_BYTES, low=64 << 10, high=256 << 20
            ),
            onnx_threads=integer(env, "MODELAPP_ONNX_THREADS", 1, low=0, high=256),
            image=text(env, container.IMAGE) or None,
            model_name=_model_name(env),
            shadow=_shadow(env),
        )


def _model_spec(env: Mapping[str, str]) -> ModelSpec:
    etag = required(env, container.MODEL_ETAG)
    sha256 = required(env, container.MODEL_SHA256).lower()
    if not _SHA256_HEX.fullmatch(sha256):
        raise ConfigError(f"{container.MODEL_SHA256} must be 64 hex characters (the sha256 of the model file)")
    url = required(env, container.MODEL_URL)
    try:
        parse_blob_url(url)
    except ValueError as error:
        raise ConfigError(f"{container.MODEL_URL}: {error}") from None
    format_name = required(env, container.MODEL_FORMAT).lower()
    try:
        model_format = ModelFormat(format_name)
    except ValueError:
        allowed = ", ".join(f.value for f in ModelFormat)
        raise ConfigError(f"{container.MODEL_FORMAT} must be one of {allowed}, not {format_name!r}") from None
    if model_format is ModelFormat.PICKLE and not boolean(env, container.ALLOW_PICKLE, default=False):
        raise ConfigError(
            f"{container.MODEL_FORMAT}=pickle needs {container.ALLOW_PICKLE}=true (loading a pickle runs code)"
        )
    pin_query = text(env, container.MODEL_PIN)
    try:
        pin = PinnedVersion.from_query(pin_query) if pin_query else PinnedVersion()
    except ValueError as error:
        raise ConfigError(f"{container.MODEL_PIN}: {error}") from None
    public_key = text(env, container.MODEL_SIGNATURE_PUBLIC_KEY)
    return ModelSpec(
        url=url,
        etag=etag,
        sha256=sha256,
        format=model_format,
        pin=pin,
        signature_public_key=public_key.encode() if public_key else None,
    )


def _cache_dir(env: Mapping[str, str]) -> Path:
    cache_dir = Path(text(env, container.MODEL_CACHE_DIR) or DEFAULT_CACHE_DIR)
    if not cache_dir.is_absolute():
        raise ConfigError(f"{container.MODEL_CACHE_DIR} must be an absolute path, not {str(cache_dir)!r}")
    return cache_dir


def _model_name(env: Mapping[str, str]) -> str | None:
    model_name = text(env, container.MODEL_NAME) or None
    if model_name is not None and not MODEL_NAME_PATTERN.fullmatch(model_name):
        raise ConfigError(
            f"{container.MODEL_NAME} must be 1-253 letters, digits, '_', '.' or '-' (not first), not {model_name!r}"
        )
    return model_name


def _shadow(env: Mapping[str, str]) -> ShadowConfig | None:
    url = text(env, container.SHADOW_URL)
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
        raise ConfigError(f"{container.SHADOW_URL} must be http(s)://host:port with no path, not {url!r}")
    return ShadowConfig(
        url=url,
        percent=number(env, container.SHADOW_PERCENT, 100.0, low=0.0, high=100.0),
        tolerance=number(env, container.SHADOW_TOLERANCE, 0.0, low=0.0, high=1e12),
        max_in_flight=integer(env, "MODELAPP_SHADOW_MAX_IN_FLIGHT", DEFAULT_SHADOW_MAX_IN_FLIGHT, low=1, high=1024),
        timeout_seconds=number(
            env, "MODELAPP_SHADOW_TIMEOUT_SECONDS", DEFAULT_SHADOW_TIMEOUT_SECONDS, low=0.05, high=60.0
        ),
    )


@dataclass(frozen=True)
class ServerConfig:
    """How gunicorn runs the app (gunicorn_conf.py), checked by `modelapp-serve` before it runs gunicorn."""

    port: int = DEFAULT_PORT
    liveness_port: int = default_liveness_port(DEFAULT_PORT)
    workers: int | None = None
    """None: one per CPU (gunicorn_conf decides: it knows the cgroup quota), at least 2."""
    worker_class: str = "asgi"
    threads: int = 4
    reuse_port: bool = True
    access_log: bool = False
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerConfig:
        env = os.environ if env is None else env
        port = integer(env, container.PORT, DEFAULT_PORT, low=1, high=65535)
        workers = integer(env, "MODELAPP_WORKERS", 0, low=1) or None
        return cls(
            port=port,
            liveness_port=integer(env, container.LIVENESS_PORT, default_liveness_port(port), low=1, high=65535),
            workers=workers,
            worker_class=choice(env, "MODELAPP_WORKER_CLASS", "asgi", WORKER_CLASSES),
            threads=integer(env, "MODELAPP_THREADS", 4, low=1),
            reuse_port=boolean(env, "MODELAPP_REUSE_PORT", default=True),
            access_log=boolean(env, "MODELAPP_ACCESS_LOG", default=False),
            log_level=choice(env, "MODELAPP_LOG_LEVEL", "info", LOG_LEVELS),
        )
