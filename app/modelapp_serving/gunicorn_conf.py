"""gunicorn settings for the serving app (`gunicorn -c python:modelapp_serving.gunicorn_conf`).

The settings come from config.ServerConfig (MODELAPP_PORT, MODELAPP_LIVENESS_PORT, MODELAPP_WORKERS,
MODELAPP_WORKER_CLASS, MODELAPP_THREADS, MODELAPP_REUSE_PORT, MODELAPP_ACCESS_LOG, MODELAPP_LOG_LEVEL): a bad
value stops the master before it binds.
The master checks the config and imports the web stack and the model's runtime before forking
(import_before_fork); each worker downloads nothing itself unless it is the first to take the cache lock
(see download.py), then loads the verified file in a background thread.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from modelapp_serving.config import RUN_ID_ENV, ConfigError, ServerConfig, ServingConfig
from modelapp_serving.liveness import LivenessServer
from modelapp_serving.metrics import MULTIPROC_ENV
from modelapp_serving.model import import_runtime
from modelapp_serving.refusal_token import REFUSAL_TOKEN_FD_ENV, create_refusal_token


def _server_config() -> ServerConfig:
    try:
        return ServerConfig.from_env()
    except ConfigError as error:
        sys.exit(f"modelapp-serve: configuration error: {error}")


def _cores() -> int:
    """CPUs this container may use: the cgroup quota if one is set, else the CPUs it may run on.

    os.cpu_count() is the node's count: on a 64-core node a 2-CPU pod would start 129 workers.
    """
    available = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return available
    if quota == "max":
        return available
    return max(1, min(available, math.ceil(int(quota) / int(period))))


_server = _server_config()
wsgi_app = "modelapp_serving.web:create_app()"
serving_port = _server.port
bind = [f"0.0.0.0:{serving_port}"]
# /livez is answered by the master, apart from the workers (liveness.py).
liveness_port = _server.liveness_port
_liveness: LivenessServer | None = None
# One process per CPU: /predict is CPU-bound and the threads below cover the waits; 2 x cores + 1 only
# added context switches (bench/serving_rps.py). At least 2, so one busy or restarting worker is not an outage.
workers = _server.workers or max(2, _cores())
# asgi (default): uvicorn workers (httptools parser, uvloop) under this same master and hooks; /predict is
# answered on the event loop (web.AsgiPredictApp), the rest by the Flask app through a2wsgi. Against gthread x4
# on 2 cores (bench/serving_rps.py): 1.8x the req/s with scikit-learn, 2.1x with ONNX, p99 less than half;
# gthread spent ~3/4 of each request in the server (response write, pipe wake-ups, thread hand-overs).
# gthread (MODELAPP_THREADS per worker) and sync (closes every connection) remain available.
worker_class = _server.worker_class
threads = _server.threads
if worker_class == "asgi":
    worker_class = "uvicorn_worker.UvicornWorker"
    wsgi_app = "modelapp_serving.web:create_asgi_app()"
# One SO_REUSEPORT socket per worker: the kernel spreads new connections over the workers. With one shared
# socket, whichever worker wakes first takes most keep-alive connections (8/0 splits measured with wrk -c8).
reuse_port = _server.reuse_port
keepalive = 5
# Heartbeat files on tmpfs: the root filesystem may be read-only and disk-backed tmp can stall workers.
worker_tmp_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108 - tmpfs, as gunicorn advises
accesslog = "-" if _server.access_log else None
loglevel = _server.log_level
# Loading happens in a background thread, so a slow download never trips the worker timeout.
timeout = 30
graceful_timeout = 20
# Not preload_app: the app object starts the model's loader thread, which a fork would not carry over;
# on_starting imports the modules once instead (import_before_fork) and each worker builds its own app.
preload_app = False
# gunicorn >= 25 opens a control socket under $HOME by default: not wanted in a pod (read-only root).
control_socket_disable = True


def _configure_app_logging() -> None:
    # Not logconfig_dict: with it gunicorn formats an access-log line for every request even when off.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
    app_logger = logging.getLogger("modelapp_serving")
    app_logger.handlers[:] = [handler]
    app_logger.setLevel(loglevel.upper())
    app_logger.propagate = False
    logging.getLogger("azure").setLevel(logging.WARNING)


def import_before_fork(config: ServingConfig) -> None:
    """Import the web stack and the model's runtime once, in the master, so every worker forks with them
    loaded instead of importing them itself: each worker saved ~0.6 s of CPU for the web stack and ~5 s for
    scikit-learn + skops (a skops or pickle model), which a pod under a CPU limit pays many times over.
    The model itself is still loaded by each worker after the fork (an onnxruntime session and its threads
    do not survive a fork)."""
    import modelapp_serving.web  # noqa: F401, PLC0415 - imported here for the fork, not for this module

    if config.model is not None:
        import_runtime(config.model.format)


def on_starting(server: Any) -> None:
    """In the master, before any worker: fail fast on bad config, import what the workers need
    (import_before_fork), reset metrics, set the run id and the refusal token (state.create_refusal_token)."""
    try:
        config = ServingConfig.from_env()
    except ConfigError as error:
        sys.exit(f"modelapp-serve: configuration error: {error}")
    import_before_fork(config)
    os.environ[RUN_ID_ENV] = uuid.uuid4().hex
    os.environ[REFUSAL_TOKEN_FD_ENV] = str(create_refusal_token())
    multiproc_dir = os.environ.get(MULTIPROC_ENV)
    if multiproc_dir:
        # Files from an earlier run would be summed into this run's counters.
        path = Path(multiproc_dir)
        if path.is_dir():
            for entry in path.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        path.mkdir(parents=True, exist_ok=True)


def when_ready(server: Any) -> None:
    """In the master, once it listens and before any worker: start answering liveness."""
    global _liveness  # noqa: PLW0603 - one server per master, closed at exit
    _liveness = LivenessServer(liveness_port)
    _liveness.start()


def post_fork(server: Any, worker: Any) -> None:
    _configure_app_logging()
    if _liveness is not None:
        _liveness.close_inherited_socket()


def on_exit(server: Any) -> None:
    if _liveness is not None:
        _liveness.stop()


def child_exit(server: Any, worker: Any) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess  # noqa: PLC0415 - only needed in multiprocess mode

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
