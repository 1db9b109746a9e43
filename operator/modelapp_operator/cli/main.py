"""`modelapp`: the command line for people and pipelines working with ModelApps (the parser and `main`).

modelapp publish-model iris.onnx --account-url https://acct.blob.core.windows.net --container models --blob iris.onnx
modelapp set-image iris -n ml --digest sha256:...        # what CI runs after pushing an image
modelapp status iris -n ml
modelapp wait iris -n ml --digest sha256:... --timeout 600
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from modelapp_operator.cli.commands import (
    EXIT_ERROR,
    EXIT_FORBIDDEN,
    EXIT_INTERRUPTED,
    EXIT_MODEL_GONE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_ROLLOUT_FAILED,
    EXIT_STORAGE_UNREACHABLE,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    cmd_publish_model,
    cmd_rollback,
    cmd_set_image,
    cmd_set_model,
    cmd_status,
    cmd_wait,
)
from modelapp_operator.cli.status import check_digest
from modelapp_operator.names import API_VERSION

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}    done (wait: Ready with the wanted image and model)
  {EXIT_ERROR}    the operation failed (API error, publish refused or failed)
  {EXIT_USAGE}    bad arguments
  {EXIT_NOT_FOUND}    the ModelApp (or namespace) does not exist
  {EXIT_FORBIDDEN}    unauthorized or forbidden (check the kubeconfig user's RBAC)
  {EXIT_UNREACHABLE}    no usable kubeconfig, or the API server cannot be reached
  {EXIT_ROLLOUT_FAILED}    wait: the rollout failed (Degraded, e.g. RolledBack or ProgressDeadlineExceeded; InvalidSpec)
  {EXIT_TIMEOUT}    wait: not Ready with the wanted pair before --timeout
  {EXIT_MODEL_GONE}    rollback: the target pair's model version (snapshot, version ID) no longer exists
  {EXIT_STORAGE_UNREACHABLE}    rollback: storage cannot be reached or read to check that model version
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
"""

DESCRIPTION = f"""\
Work with ModelApps ({API_VERSION}): publish a model, point an app at a new
image digest or model version, watch a rollout, roll back. Reads the kubeconfig
(--kubeconfig, $KUBECONFIG or ~/.kube/config); in a pod, the service account.
"""

EXAMPLES = """\
examples:
  # data scientist: publish a model (prints the ETag and sha256 a ModelApp pins)
  modelapp publish-model iris.onnx --account-url https://acct.blob.core.windows.net \\
      --container models --blob iris/model.onnx
  # CI after pushing an image: pin it and wait for the rollout
  modelapp set-image iris -n ml --digest sha256:4f1c...e2 && modelapp wait iris -n ml --timeout 600
  modelapp status iris -n ml -o json
  modelapp rollback iris -n ml --to-revision 3
"""


# --- parser ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _digest(text: str) -> str:
    try:
        return check_digest(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace of the ModelApp (default: the kubeconfig context's)")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context (default: current-context)")
    common.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help="text for people (default) or json for scripts and CI",
    )
    common.add_argument(
        "--request-timeout",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="timeout of one API call (default 30)",
    )
    common.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no spinner or progress bar on stderr"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of unexpected errors")

    parser = _Parser(
        prog="modelapp",
        description=DESCRIPTION,
        epilog=EXAMPLES + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_,
            description=help_,
            parents=[common],
            epilog=epilog + "\n" + EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    publish = add(
        "publish-model",
        "Upload a model file to Blob Storage with its sha256 and format as metadata; print its ETag and sha256.",
        "example:\n  modelapp publish-model iris.onnx --account-url https://acct.blob.core.windows.net "
        "--container models --blob iris/model.onnx\n\ncredentials: --connection-string or "
        "$AZURE_STORAGE_CONNECTION_STRING; with --account-url, DefaultAzureCredential (az login, workload "
        "identity). A different model already at that name is only replaced with --overwrite.",
    )
    publish.add_argument("file", type=Path, help="model file (.onnx, .skops, .pkl)")
    where = publish.add_mutually_exclusive_group()
    where.add_argument("--account-url", help="blob endpoint, e.g. https://acct.blob.core.windows.net")
    where.add_argument("--connection-string", help="storage connection string (prefer the env var)")
    publish.add_argument("--container", required=True, help="blob container, e.g. models")
    publish.add_argument("--blob", required=True, help="blob name, e.g. iris/model.onnx")
    publish.add_argument("--format", choices=("onnx", "skops", "pickle"), help="default: from the file suffix")
    publish.add_argument("--overwrite", action="store_true", help="replace a different model at that name")
    publish.add_argument(
        "--sign-key",
        type=Path,
        help="EC private key (PEM): sign the file (OpenSSF model signing, key mode) and publish the signature",
    )
    publish.set_defaults(handler=cmd_publish_model)

    set_image = add(
        "set-image",
        "Pin a ModelApp's image to a digest (what CI runs after pushing an image); the operator rolls it out.",
        "example:\n  modelapp set-image iris -n ml --digest sha256:$(cat digest.txt)\n\n"
        "The digest is checked before anything is sent; spec.image.tag and followTag are removed.",
    )
    set_image.add_argument("name", help="ModelApp name")
    set_image.add_argument("--digest", required=True, type=_digest, help="sha256:<64 hex>")
    set_image.add_argument("--repository", help="also change spec.image.repository (registry host included)")
    set_image.set_defaults(handler=cmd_set_image)

    set_model = add(
        "set-model",
        "Pin a ModelApp's model to a blob version (ETag), or --follow the blob's current version again.",
        "examples:\n  modelapp set-model iris -n ml --version '\"0x8DC2B6F0D1A2B3C\"' --sha256 3b1f...\n"
        "  modelapp set-model iris -n ml --follow",
    )
    set_model.add_argument("name", help="ModelApp name")
    which = set_model.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="blob ETag to pin (as publish-model prints it)")
    which.add_argument("--follow", action="store_true", help="remove the pin: follow the blob")
    set_model.add_argument("--sha256", help="expected sha256 of that version (64 hex)")
    set_model.set_defaults(handler=cmd_set_model)

    status = add(
        "status",
        "Show a ModelApp's image, model, replicas, conditions and rollout history.",
        "example:\n  modelapp status iris -n ml -o json",
    )
    status.add_argument("name", help="ModelApp name")
    status.set_defaults(handler=cmd_status)

    wait = add(
        "wait",
        "Wait until a ModelApp is Ready with the wanted image and model (default: what its spec pins).",
        "example:\n  modelapp wait iris -n ml --digest sha256:4f1c... --timeout 600\n\n"
        "Done when Ready=True for the current generation with that pair running. Fails fast when the rollout "
        "of that pair fails (Degraded=True RolledBack or ProgressDeadlineExceeded) or the spec is invalid.",
    )
    wait.add_argument("name", help="ModelApp name")
    wait.add_argument("--digest", type=_digest, help="wanted image digest (default: spec.image.digest if pinned)")
    wait.add_argument("--model-version", help="wanted model ETag (default: spec.model.version if pinned)")
    wait.add_argument("--timeout", type=_positive, default=300.0, help="seconds (default 300)")
    wait.add_argument("--interval", type=_positive, default=1.0, help="seconds between checks (default 1)")
    wait.set_defaults(handler=cmd_wait)

    rollback = add(
        "rollback",
        "Pin a ModelApp to an earlier Ready image/model pair from its status.history.",
        "Before changing anything, checks in storage that the pair's model snapshot or version still exists "
        "(the credentials publish-model uses).\n\nexamples:\n"
        "  modelapp rollback iris -n ml                 # the newest earlier Ready pair\n"
        "  modelapp rollback iris -n ml --to-revision 3",
    )
    rollback.add_argument("name", help="ModelApp name")
    rollback.add_argument("--to-revision", type=int, metavar="N", help="history revision to go back to")
    rollback.add_argument(
        "--connection-string",
        help="storage connection string to check the pair's model version (default: "
        "$AZURE_STORAGE_CONNECTION_STRING, else DefaultAzureCredential on the blob's account)",
    )
    rollback.add_argument(
        "--no-model-check",
        dest="check_model",
        action="store_false",
        help="do not check in storage that the pair's snapshot or version still exists",
    )
    rollback.set_defaults(handler=cmd_rollback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CliError as error:
        print(f"modelapp: {error}", file=sys.stderr)
        return error.code
    except ValueError as error:
        print(f"modelapp: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("modelapp: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.verbose:
            raise
        print(f"modelapp: unexpected error: {type(error).__name__}: {error} (run with -v for details)", file=sys.stderr)
        return EXIT_ERROR
