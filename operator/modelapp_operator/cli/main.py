"""`modelapp`: the command line for people and pipelines working with ModelApps (the parser and `main`).

modelapp publish-model iris.onnx --account-url https://acct.blob.core.windows.net --container models --blob iris.onnx
modelapp set-image iris -n ml --digest sha256:...        # what CI runs after pushing an image
modelapp status iris -n ml
modelapp wait iris -n ml --digest sha256:... --timeout 600
kubectl modelapp status iris -n ml                       # the same CLI installed as the kubectl plugin
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import shtab
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
from modelapp_operator.cli.gate_commands import cmd_gate_action
from modelapp_operator.cli.kube import KubeApiError, KubeClient, KubeConfigError, load_connection
from modelapp_operator.cli.status import check_digest
from modelapp_operator.names import API_VERSION

PROG = "modelapp"
KUBECTL_PROG = "kubectl modelapp"  # installed as the kubectl plugin `kubectl-modelapp` (krew's naming)
COMPLETION_SHELLS = ("bash", "zsh")
NAMES_COMMAND = "__modelapp-names"  # hidden: the completion scripts ask it for ModelApp names

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
  {EXIT_STORAGE_UNREACHABLE}    rollback: that model version cannot be checked (no usable storage credentials,
       storage unreachable or refusing the read, the ModelApp's Secret unreadable); nothing changed
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
"""

DESCRIPTION = f"""\
Work with ModelApps ({API_VERSION}): publish a model, point an app at a new
image digest or model version, watch a rollout, roll back. Reads the kubeconfig
(--kubeconfig, $KUBECONFIG or ~/.kube/config); in a pod, the service account.
"""


def program_name(argv0: str) -> str:
    """The name to show in usage, help and messages: `kubectl modelapp` when run as the kubectl plugin
    (an executable named kubectl-modelapp, which kubectl runs for `kubectl modelapp`), else `modelapp`."""
    return KUBECTL_PROG if Path(argv0).name.startswith("kubectl-modelapp") else PROG


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


# Shell functions the completion scripts call for a ModelApp name: the hidden command lists the ModelApps
# of the namespace (and kubeconfig, context) the command line being completed names.
_NAMES_COMPLETER = {"bash": "_modelapp_names", "zsh": "_modelapp_names"}
_COMPLETION_PREAMBLE = {
    "bash": f"""\
_modelapp_names() {{
  compgen -W "$("${{COMP_WORDS[0]}}" {NAMES_COMMAND} "${{COMP_WORDS[@]:1:COMP_CWORD-1}}" 2>/dev/null)" -- "$1"
}}""",
    "zsh": f"""\
_modelapp_names() {{
  local -a names
  names=(${{(f)"$({PROG} {NAMES_COMMAND} ${{words[1,CURRENT-1]}} 2>/dev/null)"}})
  compadd -a names
}}""",
}


def _completes(action: argparse.Action, how: Mapping[str, Any]) -> None:
    """How the completion scripts complete this argument's value (shtab reads `.complete`)."""
    action.complete = how  # type: ignore[attr-defined]


def _name_argument(parser: argparse.ArgumentParser) -> None:
    _completes(parser.add_argument("name", help="ModelApp name"), _NAMES_COMPLETER)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace of the ModelApp (default: the kubeconfig context's)")
    _completes(
        common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)"),
        shtab.FILE,
    )
    common.add_argument("--context", help="kubeconfig context (default: current-context)")
    common.add_argument(
        "-o",
        "--output",
        choices=("text", "json", "yaml"),
        default="text",
        help="text for people (default), or json or yaml (the same content) for scripts and CI",
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

    examples = f"""\
examples:
  # data scientist: publish a model (prints the ETag and sha256 a ModelApp pins)
  {prog} publish-model iris.onnx --account-url https://acct.blob.core.windows.net \\
      --container models --blob iris/model.onnx
  # CI after pushing an image: pin it and wait for the rollout
  {prog} set-image iris -n ml --digest sha256:4f1c...e2 && {prog} wait iris -n ml --timeout 600
  {prog} status iris -n ml -o yaml
  {prog} rollback iris -n ml --to-revision 3
  {PROG} completion bash > ~/.local/share/bash-completion/completions/{PROG}
"""
    parser = _Parser(
        prog=prog,
        description=DESCRIPTION,
        epilog=examples + "\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(prog=prog)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help_: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_,
            description=help_,
            parents=[common],
            epilog=epilog + "\n\n" + EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    publish = add(
        "publish-model",
        "Upload a model file to Blob Storage with its sha256 and format as metadata; print its ETag and sha256.",
        f"example:\n  {prog} publish-model iris.onnx --account-url https://acct.blob.core.windows.net "
        "--container models --blob iris/model.onnx\n\ncredentials: --connection-string or "
        "$AZURE_STORAGE_CONNECTION_STRING; with --account-url, DefaultAzureCredential (az login, workload "
        "identity). A different model already at that name is only replaced with --overwrite.",
    )
    _completes(publish.add_argument("file", type=Path, help="model file (.onnx, .skops, .pkl)"), shtab.FILE)
    where = publish.add_mutually_exclusive_group()
    where.add_argument("--account-url", help="blob endpoint, e.g. https://acct.blob.core.windows.net")
    where.add_argument("--connection-string", help="storage connection string (prefer the env var)")
    publish.add_argument("--container", required=True, help="blob container, e.g. models")
    publish.add_argument("--blob", required=True, help="blob name, e.g. iris/model.onnx")
    publish.add_argument("--format", choices=("onnx", "skops", "pickle"), help="default: from the file suffix")
    publish.add_argument("--overwrite", action="store_true", help="replace a different model at that name")
    sign_key = publish.add_argument(
        "--sign-key",
        type=Path,
        help="EC private key (PEM): sign the file (OpenSSF model signing, key mode) and publish the signature",
    )
    _completes(sign_key, shtab.FILE)
    publish.set_defaults(handler=cmd_publish_model)

    set_image = add(
        "set-image",
        "Pin a ModelApp's image to a digest (what CI runs after pushing an image); the operator rolls it out.",
        f"example:\n  {prog} set-image iris -n ml --digest sha256:$(cat digest.txt)\n\n"
        "The digest is checked before anything is sent; spec.image.tag and followTag are removed.",
    )
    _name_argument(set_image)
    set_image.add_argument("--digest", required=True, type=_digest, help="sha256:<64 hex>")
    set_image.add_argument("--repository", help="also change spec.image.repository (registry host included)")
    set_image.set_defaults(handler=cmd_set_image)

    set_model = add(
        "set-model",
        "Pin a ModelApp's model to a blob version (ETag), or --follow the blob's current version again.",
        f"examples:\n  {prog} set-model iris -n ml --version '\"0x8DC2B6F0D1A2B3C\"' --sha256 3b1f...\n"
        f"  {prog} set-model iris -n ml --follow",
    )
    _name_argument(set_model)
    which = set_model.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="blob ETag to pin (as publish-model prints it)")
    which.add_argument("--follow", action="store_true", help="remove the pin: follow the blob")
    set_model.add_argument("--sha256", help="expected sha256 of that version (64 hex)")
    set_model.set_defaults(handler=cmd_set_model)

    status = add(
        "status",
        "Show a ModelApp's image, model, replicas, conditions and rollout history.",
        f"examples:\n  {prog} status iris -n ml\n  {prog} status iris -n ml -o yaml   # or -o json",
    )
    _name_argument(status)
    status.set_defaults(handler=cmd_status)

    wait = add(
        "wait",
        "Wait until a ModelApp is Ready with the wanted image and model (default: what its spec pins).",
        f"example:\n  {prog} wait iris -n ml --digest sha256:4f1c... --timeout 600\n\n"
        "Done when Ready=True for the current generation with that pair running. Fails fast when the rollout "
        "of that pair fails (Degraded=True RolledBack or ProgressDeadlineExceeded) or the spec is invalid.",
    )
    _name_argument(wait)
    wait.add_argument("--digest", type=_digest, help="wanted image digest (default: spec.image.digest if pinned)")
    wait.add_argument("--model-version", help="wanted model ETag (default: spec.model.version if pinned)")
    wait.add_argument("--timeout", type=_positive, default=300.0, help="seconds (default 300)")
    wait.add_argument("--interval", type=_positive, default=1.0, help="seconds between checks (default 1)")
    wait.set_defaults(handler=cmd_wait)

    rollback = add(
        "rollback",
        "Pin a ModelApp to an earlier Ready image/model pair from its status.history.",
        "Before changing anything, checks in storage that the pair's model snapshot or version still\n"
        "exists, with --connection-string, $AZURE_STORAGE_CONNECTION_STRING, the ModelApp's own\n"
        "credentials Secret (--use-modelapp-secret) or, on an https account, DefaultAzureCredential.\n"
        f"When that check cannot be made it exits {EXIT_STORAGE_UNREACHABLE}, changes nothing and says what to "
        "give.\n\nexamples:\n"
        f"  {prog} rollback iris -n ml                 # the newest earlier Ready pair\n"
        f"  {prog} rollback iris -n ml --to-revision 3\n"
        f"  {prog} rollback iris -n ml --use-modelapp-secret",
    )
    _name_argument(rollback)
    rollback.add_argument("--to-revision", type=int, metavar="N", help="history revision to go back to")
    credentials = rollback.add_mutually_exclusive_group()
    credentials.add_argument(
        "--connection-string",
        help="storage connection string to check the pair's model version (default: "
        "$AZURE_STORAGE_CONNECTION_STRING, else DefaultAzureCredential on the blob's account)",
    )
    credentials.add_argument(
        "--use-modelapp-secret",
        action="store_true",
        help="check with the connection string in the ModelApp's own credentials Secret "
        "(spec.model.credentials.secretRef; needs get on that Secret)",
    )
    rollback.add_argument(
        "--no-model-check",
        dest="check_model",
        action="store_false",
        help="do not check in storage that the pair's snapshot or version still exists",
    )
    rollback.set_defaults(handler=cmd_rollback)

    for action, help_ in (
        ("promote", "Promote the release gate's candidate now (promotion Manual, or over its pending checks)."),
        ("abort", "Reject the release gate's candidate now: the stable pair keeps serving."),
    ):
        gate = add(
            action,
            help_,
            f"example:\n  {prog} {action} iris -n ml\n\nActs on the candidate status.gate names (Testing or "
            "AwaitingPromotion) and records who acted (status.gate.decidedBy); needs update on the ModelApp.",
        )
        _name_argument(gate)
        gate.set_defaults(handler=cmd_gate_action)

    completion = commands.add_parser(
        "completion",
        help=f"Print a {' or '.join(COMPLETION_SHELLS)} completion script for {PROG}.",
        description=f"Print a {' or '.join(COMPLETION_SHELLS)} completion script for {PROG} (commands, options, "
        "their choices, files, and ModelApp names from the cluster).",
        epilog=f"""\
examples:
  {PROG} completion bash > ~/.local/share/bash-completion/completions/{PROG}
  {PROG} completion zsh > "${{fpath[1]}}/_{PROG}"     # a directory in $fpath; then restart zsh
  eval "$({PROG} completion bash)"                     # in ~/.bashrc (zsh: in ~/.zshrc after compinit)
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    completion.add_argument("shell", choices=COMPLETION_SHELLS)
    completion.set_defaults(handler=cmd_completion, verbose=False)

    # Hidden (no help, so neither --help nor the completion scripts list it): the ModelApp names for the
    # completion scripts, given the words of the command line being completed.
    names = commands.add_parser(NAMES_COMMAND, add_help=False)
    names.add_argument("words", nargs=argparse.REMAINDER)
    names.set_defaults(handler=cmd_modelapp_names, verbose=False)
    return parser


def completion_script(shell: str) -> str:
    """The completion script for `modelapp` in `shell`, generated from the parser by shtab."""
    return shtab.complete(build_parser(PROG), shell=shell, preamble=_COMPLETION_PREAMBLE[shell])


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(args.shell))
    return EXIT_OK


def cmd_modelapp_names(args: argparse.Namespace) -> int:
    """Hidden, for the completion scripts: the ModelApp names in the namespace (kubeconfig, context) that the
    words of the command line being completed name; nothing, and exit 0, when they cannot be listed."""
    scope = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    scope.add_argument("-n", "--namespace")
    scope.add_argument("--kubeconfig")
    scope.add_argument("--context")
    try:
        words, _ = scope.parse_known_args(args.words)
        connection = load_connection(words.kubeconfig, words.context)
        names = KubeClient(connection, timeout_seconds=5).modelapp_names(words.namespace or connection.namespace)
    except (argparse.ArgumentError, KubeConfigError, KubeApiError, ValueError):
        return EXIT_OK
    print("\n".join(names))
    return EXIT_OK


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    prog = prog or program_name(sys.argv[0])
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CliError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return error.code
    except ValueError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.verbose:
            raise
        print(f"{prog}: unexpected error: {type(error).__name__}: {error} (run with -v for details)", file=sys.stderr)
        return EXIT_ERROR
