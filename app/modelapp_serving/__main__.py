"""`python -m modelapp_serving` / `modelapp-serve`: check the config (every variable, `config.VARIABLES`, in
`--help`), then run gunicorn with our settings in this same process."""

from __future__ import annotations

import argparse
import sys

from modelapp_contract.settings import environment_help

from modelapp_serving import __version__
from modelapp_serving.config import (
    INTERNAL_VARIABLES,
    MODEL_VARIABLES,
    SERVING_VARIABLES,
    ConfigError,
    ServerConfig,
    ServingConfig,
)

ENV_HELP = f"""\
{environment_help(MODEL_VARIABLES, heading="model and ports (set by the ModelApp operator):")}
{environment_help(SERVING_VARIABLES, heading="serving (the image's own settings):")}
{environment_help(INTERNAL_VARIABLES, heading="internal (set by gunicorn's master for its workers):")}
endpoints: POST /predict  {{"instances": [[...], ...]}} or {{"instance": [...]}} -> {{"predictions": [...]}}
           GET /healthz, /readyz, /version, /metrics
           the Open Inference Protocol (V2): GET /v2, /v2/health/live, /v2/health/ready,
           /v2/models/<name>[/versions/<etag>][/ready]; POST /v2/models/<name>[/versions/<etag>]/infer
           (docs/serving-api.md)
"""


def build_gunicorn_argv(extra: list[str]) -> list[str]:
    return ["gunicorn", "--config", "python:modelapp_serving.gunicorn_conf", *extra]


def run_gunicorn(argv: list[str]) -> None:
    """gunicorn's own entry point (`gunicorn.app.wsgiapp.run`), in this process: an exec of a second
    interpreter cost 0.1-0.25 s of a pod's start (issue 23) and imported the config a second time."""
    from gunicorn.app.wsgiapp import WSGIApplication  # noqa: PLC0415 - only when serving, not for --help

    sys.argv = argv
    WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").run()


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
        ServerConfig.from_env()
    except ConfigError as error:
        print(f"modelapp-serve: configuration error: {error}", file=sys.stderr)
        return 2
    if args.check_config:
        print("configuration OK")
        return 0
    extra = [a for a in args.gunicorn_args if a != "--"]
    run_gunicorn(build_gunicorn_argv(extra))
    return 0  # pragma: no cover - gunicorn's master exits the process itself


if __name__ == "__main__":
    sys.exit(main())
