"""`python -m modelapp_serving` / `modelapp-serve`: check the config, then exec gunicorn with our settings."""

from __future__ import annotations

import argparse
import os
import sys

from modelapp_serving import __version__
from modelapp_serving.config import ConfigError, ServingConfig

ENV_HELP = """\
model (set by the ModelApp operator):
  MODELAPP_MODEL_URL                full blob URL (no credential is shown anywhere)
  MODELAPP_MODEL_ETAG               ETag to download (If-Match): a changed blob is refused
  MODELAPP_MODEL_SHA256             expected sha256 (hex) of the file: a mismatch is refused
  MODELAPP_MODEL_FORMAT             onnx | skops | pickle
  MODELAPP_MODEL_CONNECTION_STRING  optional; else DefaultAzureCredential (workload identity)
  MODELAPP_MODEL_CACHE_DIR          default /var/cache/modelapp
  MODELAPP_ALLOW_PICKLE             true to allow pickle/joblib models (loading them runs code)
  MODELAPP_MODEL_NAME               the model's name under /v2 (default: the blob's file name without extension)
serving:
  MODELAPP_PORT                     default 8080
  MODELAPP_WORKERS                  default one per CPU (cgroup quota), at least 2
  MODELAPP_WORKER_CLASS             asgi (default: uvicorn workers, /predict on the event loop), gthread or sync
  MODELAPP_THREADS                  threads per gthread worker (MODELAPP_WORKER_CLASS=gthread), default 4
  MODELAPP_REUSE_PORT               true (default): one SO_REUSEPORT socket per worker
  MODELAPP_MAX_REQUEST_BYTES        request body limit (/predict, /v2), default 1048576 (413 above)
  MODELAPP_ACCESS_LOG               true to log every request (off by default)
  MODELAPP_DOWNLOAD_CONCURRENCY     parallel ranged GETs, default 8
  MODELAPP_DOWNLOAD_CHUNK_BYTES     bytes per ranged GET, default 8388608
  PROMETHEUS_MULTIPROC_DIR          set to aggregate /metrics over workers

endpoints: POST /predict  {"instances": [[...], ...]} or {"instance": [...]} -> {"predictions": [...]}
           GET /healthz, /readyz, /version, /metrics
           the Open Inference Protocol (V2): GET /v2, /v2/health/live, /v2/health/ready,
           /v2/models/<name>[/versions/<etag>][/ready]; POST /v2/models/<name>[/versions/<etag>]/infer
           (docs/serving-api.md)
"""


def build_gunicorn_argv(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--config", "python:modelapp_serving.gunicorn_conf", *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modelapp-serve",
        description="Serve a pinned, sha256-verified model over HTTP (gunicorn + Flask).",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"modelapp-serve {__version__}")
    parser.add_argument("--check-config", action="store_true", help="check the MODELAPP_* env vars and exit")
    parser.add_argument(
        "gunicorn_args",
        nargs=argparse.REMAINDER,
        help="extra gunicorn options after `--` (they override the defaults), e.g. -- --workers 3",
    )
    args = parser.parse_args(argv)
    try:
        ServingConfig.from_env()
    except ConfigError as error:
        print(f"modelapp-serve: configuration error: {error}", file=sys.stderr)
        return 2
    if args.check_config:
        print("configuration OK")
        return 0
    extra = [a for a in args.gunicorn_args if a != "--"]
    command = build_gunicorn_argv(extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)  # noqa: S606 - fixed argv, replacing this process is the point
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
