"""Run the ModelApp operator: `python -m modelapp_operator` (or `modelapp-operator`).

Configuration comes from MODELAPP_* environment variables (read in config.py, listed in
--help from config.VARIABLES; see docs/modelapp-spec.md); the command line only chooses
namespaces, the liveness endpoint and verbosity.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
from collections.abc import Sequence

import kopf
import modelapp_operator.handlers  # noqa: F401 - importing registers the kopf handlers
from kopf._core.engines.peering import Identity  # run()'s parameter type; kopf does not export it
from modelapp_contract import settings
from modelapp_operator import metrics
from modelapp_operator.config import VARIABLES, ConfigError, OperatorConfig, Variable
from modelapp_operator.names import API_VERSION
from modelapp_operator.redact import RedactingFilter

HELP_WIDTH = 120


def environment_help(variables: Sequence[Variable] = VARIABLES) -> str:
    """The `Environment:` part of --help, from config.py's own list (so the two cannot disagree)."""
    kubeconfig = Variable("KUBECONFIG", "", "kubeconfig to use outside a cluster")
    return settings.environment_help([*variables, kubeconfig], width=HELP_WIDTH)


DESCRIPTION = f"""\
Kubernetes operator for ModelApp resources ({API_VERSION}): resolves each
ModelApp's image tag to a digest and its model blob to an ETag and sha256, and
runs them as a Deployment and a Service.

{environment_help()}"""


def configure_logging(log_format: str, *, verbose: bool) -> None:
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL)
    redacting = RedactingFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(redacting)
    # The storage SDK logs every request at INFO; errors still reach us as exceptions.
    logging.getLogger("azure").setLevel(logging.WARNING)
    if not verbose:
        # kopf logs "Handler ... succeeded" for every watch event of every object (about 10 lines per
        # ModelApp on a cold start, 3 % of the operator's CPU at 1,000); our own lines say what was done.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        # The kubelet's probes of kopf's /healthz (every 2 s) were half of an idle replica's log.
        logging.getLogger("aiohttp.access").addFilter(_not_a_probe)


def _not_a_probe(record: logging.LogRecord) -> bool:
    return "kube-probe/" not in record.getMessage()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelapp-operator", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NAMESPACE",
        help="watch this namespace (repeatable); overrides MODELAPP_NAMESPACES",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch all namespaces; overrides MODELAPP_NAMESPACES"
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="liveness endpoint, e.g. http://0.0.0.0:8081/healthz (default: on MODELAPP_LIVENESS_PORT); 'off' disables",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def kopf_identity(config: OperatorConfig) -> str:
    """This replica's name for kopf: the Lease identity (the pod's name) when it has one, else the host's."""
    if config.leader_election is not None:
        return config.leader_election.identity
    return f"modelapp-operator@{socket.gethostname()}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = OperatorConfig.from_env()
    except ConfigError as error:
        print(f"modelapp-operator: configuration error: {error}", file=sys.stderr)
        return 2
    namespaces: tuple[str, ...] = () if args.all_namespaces else tuple(args.namespaces or config.namespaces)
    if args.liveness == "off":
        liveness: str | None = None
    else:
        liveness = args.liveness or f"http://0.0.0.0:{config.liveness_port}/healthz"

    config = dataclasses.replace(config, namespaces=namespaces)
    configure_logging(config.log_format, verbose=args.verbose)
    if config.metrics_port is not None:
        try:
            port = metrics.serve(metrics.METRICS, config.metrics_port, config.metrics_bind)
        except OSError as error:
            print(f"modelapp-operator: cannot serve metrics on port {config.metrics_port}: {error}", file=sys.stderr)
            return 1
        logging.getLogger(__name__).info("metrics on %s:%d/metrics", config.metrics_bind, port)
    kopf.run(
        # kopf's own default identity asks the password database for the user's name, and the image's
        # user (a bare UID) has no entry there: without this the operator exits at start-up in its pod.
        identity=Identity(kopf_identity(config)),
        # Standalone always: with MODELAPP_LEADER_ELECTION both replicas watch, and only the holder of the
        # Lease reconciles (leader.py); kopf's peering objects would live in the tenants' namespaces.
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
        memo=kopf.Memo(config=config),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
