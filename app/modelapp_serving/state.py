"""The model's lifecycle in one worker: loading -> ready, or failed with a reason; loaded in a thread."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelapp_contract.blob import redact_url
from modelapp_contract.container import EXIT_ON_REFUSAL
from modelapp_contract.termination import EXIT_MODEL_REFUSED, Refusal, RefusalKind
from modelapp_contract.termination import TERMINATION_LOG as TERMINATION_LOG_PATH

from modelapp_serving.config import RUN_ID_ENV, ServingConfig
from modelapp_serving.download import DownloadSettings, ModelFetchError, fetch_verified_model
from modelapp_serving.model import LoadedModel, ModelLoadError, import_runtime, load_model_file
from modelapp_serving.refusal_token import take_refusal_token

log = logging.getLogger(__name__)

RETRY_FIRST_DELAY_S = 2.0
RETRY_MAX_DELAY_S = 60.0
TERMINATION_LOG = Path(TERMINATION_LOG_PATH)


def report_refusal(refusal: Refusal, *, exit_container: bool, termination_log: Path = TERMINATION_LOG) -> None:
    """Write why the model was refused where Kubernetes reads a container's termination message
    (the operator shows it in status, naming the model as the part that failed); with exit_container
    (ServingConfig.exit_on_refusal, MODELAPP_EXIT_ON_REFUSAL, which the operator sets) stop the container
    with a non-zero exit code.

    One worker exits with gunicorn's "App failed to load" code: its master then stops the other
    workers and exits with that code itself, so every refusal ends the container as a failure."""
    if termination_log.exists():  # Kubernetes mounts it; never create one elsewhere
        with contextlib.suppress(OSError):
            termination_log.write_text(refusal.message())
    if exit_container:
        if not take_refusal_token():
            log.error("another worker has reported the refusal; the master is stopping")
            return
        log.error("exiting with code %d: the model was refused (%s=true)", EXIT_MODEL_REFUSED, EXIT_ON_REFUSAL)
        for handler in logging.getLogger("modelapp_serving").handlers:
            handler.flush()
        os._exit(EXIT_MODEL_REFUSED)


@dataclass(frozen=True)
class ModelInfo:
    url: str
    """Without any query string: a SAS token is a credential."""
    etag: str
    sha256: str
    format: str
    pin: str = ""
    """The immutable version downloaded, as MODELAPP_MODEL_PIN names it (`snapshot=...`, `versionid=...`)."""

    def as_json(self) -> dict[str, str]:
        pinned = {"pin": self.pin} if self.pin else {}
        return {"url": self.url, "etag": self.etag, "sha256": self.sha256, "format": self.format, **pinned}


class ModelState:
    """Shared by the request threads and the loader thread; `model` is set once, after verification."""

    def __init__(self, info: ModelInfo | None) -> None:
        self.info = info
        self.model: LoadedModel | None = None
        self.reason = "the model is loading"
        self.failed = False
        self._on_ready: list[Callable[[ModelState], None]] = []
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.model is not None

    def on_ready(self, callback: Callable[[ModelState], None]) -> None:
        with self._lock:
            self._on_ready.append(callback)
            already = self.model is not None
        if already:
            callback(self)

    def set_ready(self, model: LoadedModel, info: ModelInfo | None = None) -> None:
        with self._lock:
            if info is not None:
                self.info = info
            self.model = model
            self.reason = "ready"
            self.failed = False
            callbacks = list(self._on_ready)
        for callback in callbacks:
            callback(self)

    def set_waiting(self, reason: str, *, failed: bool) -> None:
        with self._lock:
            self.reason = reason
            self.failed = failed


def model_info_from_config(config: ServingConfig) -> ModelInfo | None:
    if config.model is None:
        return None
    spec = config.model
    return ModelInfo(
        url=redact_url(spec.url), etag=spec.etag, sha256=spec.sha256, format=spec.format.value, pin=spec.pin.query
    )


def load_until_ready(
    state: ModelState,
    config: ServingConfig,
    *,
    sleep: Callable[[float], Any] = time.sleep,
    blob_client_factory: Callable[..., Any] | None = None,
) -> None:
    """Fetch, verify and load; retry transient failures with backoff; stop on a refusal.

    Each failure is logged as exactly one line and kept as the /readyz reason. The file is only loaded
    after its sha256 matched.
    """
    if config.model is None:
        raise ValueError("load_until_ready needs config.model")
    spec = config.model
    settings = DownloadSettings(
        connection_string=config.connection_string,
        concurrency=config.download_concurrency,
        chunk_bytes=config.download_chunk_bytes,
        run_id=os.environ.get(RUN_ID_ENV) or None,
    )
    delay = RETRY_FIRST_DELAY_S
    while True:
        state.set_waiting("downloading and verifying the model", failed=False)
        try:
            fetched = fetch_verified_model(spec, config.cache_dir, settings, blob_client_factory=blob_client_factory)
            state.set_waiting("loading the verified model", failed=False)
            load_started = time.monotonic()
            model = load_model_file(
                fetched.path, spec.format, allow_pickle=config.allow_pickle, onnx_threads=config.onnx_threads
            )
            load_seconds = time.monotonic() - load_started
        except ModelFetchError as error:
            if not error.retryable:
                log.error("model not ready: %s", error.reason)
                state.set_waiting(error.reason, failed=True)
                report_refusal(Refusal(error.refusal, error.reason), exit_container=config.exit_on_refusal)
                return
            log.warning("model not ready: %s (retrying in %.0f s)", error.reason, delay)
            state.set_waiting(error.reason, failed=False)
            sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)
            continue
        except ModelLoadError as error:
            log.error("model not ready: %s", error.reason)
            state.set_waiting(error.reason, failed=True)
            report_refusal(Refusal(RefusalKind.CANNOT_LOAD, error.reason), exit_container=config.exit_on_refusal)
            return
        except Exception as error:
            # Unexpected: still one line and a reason, and a refusal like any other: never a dead loader
            # thread behind a silent, forever not-ready pod.
            reason = f"unexpected error while preparing the model: {type(error).__name__}: {error}".splitlines()[0]
            log.error("model not ready: %s", reason)
            state.set_waiting(reason, failed=True)
            report_refusal(Refusal(RefusalKind.CANNOT_LOAD, reason), exit_container=config.exit_on_refusal)
            return
        source = "downloaded" if fetched.downloaded else "reused cached"
        mb_per_s = fetched.size / 1e6 / fetched.seconds if fetched.seconds > 0 else 0.0
        log.info(
            "model ready: %s %s (%d bytes, sha256 %s, %.2f s, %.0f MB/s); loaded in %.3f s",
            source,
            redact_url(spec.url),
            fetched.size,
            spec.sha256,
            fetched.seconds,
            mb_per_s,
            load_seconds,
        )
        state.set_ready(model)
        return


def start_background_load(state: ModelState, config: ServingConfig) -> threading.Thread:
    if config.model is not None:
        import_runtime(config.model.format)
    thread = threading.Thread(target=load_until_ready, args=(state, config), name="modelapp-model-loader", daemon=True)
    thread.start()
    return thread
