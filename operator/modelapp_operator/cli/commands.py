"""The `modelapp` commands: publish-model, set-image, set-model, status, wait, rollback.

  modelapp publish-model iris.onnx --account-url https://acct.blob.core.windows.net --container models --blob iris.onnx
  modelapp set-image iris -n ml --digest sha256:...        # what CI runs after pushing an image
  modelapp set-model iris -n ml --version '"0x8DC..."'     # pin a model version (or --follow)
  modelapp status iris -n ml
  modelapp wait iris -n ml --digest sha256:... --timeout 600
  modelapp rollback iris -n ml [--to-revision 3]

Errors people can act on (not found, forbidden, unreachable, bad arguments) print one
line and exit with a documented code; no traceback unless -v.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TextIO

import yaml
from modelapp_contract.blob import CONNECTION_STRING_ENVS
from modelapp_contract.settings import ConfigError
from modelapp_operator.cli.kube import KubeApiError, KubeClient, KubeConfigError, load_connection
from modelapp_operator.cli.status import (
    RollbackError,
    Verdict,
    Wanted,
    build_rollback_patch,
    build_set_image_patch,
    build_set_model_patch,
    check_digest,
    choose_rollback_target,
    pin_problem,
    pin_to_check,
    render_status,
    short,
    status_summary,
    wait_verdict,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_FORBIDDEN = 4
EXIT_UNREACHABLE = 5
EXIT_ROLLOUT_FAILED = 6
EXIT_TIMEOUT = 7
EXIT_MODEL_GONE = 8
EXIT_STORAGE_UNREACHABLE = 9
EXIT_INTERRUPTED = 130


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _api_error(error: KubeApiError, what: str) -> CliError:
    if error.status == 404:
        return CliError(EXIT_NOT_FOUND, f"{what}: not found ({error.message})")
    if error.status in (401, 403):
        return CliError(
            EXIT_FORBIDDEN, f"{what}: {'forbidden' if error.status == 403 else 'unauthorized'}: {error.message}"
        )
    if error.status == 0:
        return CliError(EXIT_UNREACHABLE, f"{what}: {error.message}")
    return CliError(EXIT_ERROR, f"{what}: HTTP {error.status} {error.reason}: {error.message}")


# --- output ------------------------------------------------------------------------------------


class Progress:
    """A spinner line on stderr when it is a terminal; one line per change otherwise (CI logs)."""

    FRAMES = "|/-\\"

    def __init__(self, stream: TextIO, *, enabled: bool = True) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._enabled = enabled
        self._frame = 0
        self._last = ""

    def update(self, text: str) -> None:
        if not self._enabled:
            return
        if self._tty:
            self._frame = (self._frame + 1) % len(self.FRAMES)
            self._stream.write(f"\r\x1b[K{self.FRAMES[self._frame]} {text}")
            self._stream.flush()
        elif text.split(" (", 1)[0] != self._last:
            self._last = text.split(" (", 1)[0]
            self._stream.write(f"{text}\n")
            self._stream.flush()

    def done(self) -> None:
        if self._enabled and self._tty:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def structured(document: Any, output: str) -> str:
    """The document as `-o json` or `-o yaml` prints it (the same content either way)."""
    if output == "yaml":
        return yaml.safe_dump(document, sort_keys=True, default_flow_style=False, allow_unicode=True).rstrip("\n")
    return json.dumps(document, indent=2, sort_keys=True)


def emit(args: argparse.Namespace, document: Any, text: str) -> None:
    print(text if args.output == "text" else structured(document, args.output))


# --- commands ----------------------------------------------------------------------------------


def connect(args: argparse.Namespace) -> tuple[KubeClient, str]:
    try:
        connection = load_connection(args.kubeconfig, args.context)
    except KubeConfigError as error:
        raise CliError(EXIT_UNREACHABLE, str(error)) from None
    return KubeClient(connection, timeout_seconds=args.request_timeout), args.namespace or connection.namespace


def read_modelapp(client: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    try:
        return client.get_modelapp(namespace, name)
    except KubeApiError as error:
        raise _api_error(error, f"ModelApp {namespace}/{name}") from None


def patch_modelapp(client: KubeClient, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    try:
        return client.patch_modelapp(namespace, name, patch)
    except KubeApiError as error:
        if error.status == 422:
            message = f"ModelApp {namespace}/{name}: rejected by the API server: {error.message}"
            raise CliError(EXIT_ERROR, message) from None
        raise _api_error(error, f"ModelApp {namespace}/{name}") from None


def _connection_string(args: argparse.Namespace, envs: tuple[str, ...]) -> str | None:
    """--connection-string, else the first of $AZURE_STORAGE_CONNECTION_STRING and `envs` that is set."""
    given: str | None = args.connection_string
    return given or next(
        (os.environ[name] for name in ("AZURE_STORAGE_CONNECTION_STRING", *envs) if os.environ.get(name)), None
    )


def cmd_publish_model(args: argparse.Namespace) -> int:
    # The publisher is the serving app's own module (the format, the sha256 and the signature the app checks):
    # imported here, when this command runs, so the operator and the other commands never import the app.
    try:
        from modelapp_serving.publish import PublishError, publish_model  # noqa: PLC0415
    except ImportError as error:
        raise CliError(
            EXIT_ERROR,
            f"publish-model needs the serving app's package (modelapp_serving), which this install lacks: {error}",
        ) from None

    connection_string = _connection_string(args, CONNECTION_STRING_ENVS)
    if connection_string is None and args.account_url is None:
        raise CliError(
            EXIT_USAGE,
            "give --account-url (Entra ID: az login, workload identity) or --connection-string "
            "(or set AZURE_STORAGE_CONNECTION_STRING)",
        )
    try:
        published = publish_model(
            args.file,
            (args.container, args.blob),
            connection_string=connection_string if args.account_url is None else None,
            account_url=args.account_url,
            format=args.format,
            overwrite=args.overwrite,
            progress=args.progress,
            sign_key=args.sign_key,
        )
    except (PublishError, ConfigError) as error:
        raise CliError(EXIT_ERROR, f"publish-model: {error}") from None
    what = "published" if published.uploaded else "unchanged (the same content is already there)"
    text = "\n".join(
        [
            f"{what}: {published.url}",
            f"  version (ETag)  {published.etag}",
            f"  sha256          {published.sha256}",
            f"  format          {published.format}",
            f"  size            {published.size} bytes",
            *([f"  signed by       {published.signer}"] if published.signer else []),
        ]
    )
    emit(args, asdict(published), text)
    return EXIT_OK


def cmd_set_image(args: argparse.Namespace) -> int:
    client, namespace = connect(args)
    patch = build_set_image_patch(args.digest, args.repository)
    body = patch_modelapp(client, namespace, args.name, patch)
    image = (body.get("spec") or {}).get("image") or {}
    generation = (body.get("metadata") or {}).get("generation")
    text = (
        f"modelapp {namespace}/{args.name}: image {image.get('repository')}@{image.get('digest')} "
        f"(generation {generation})"
    )
    emit(args, {"name": args.name, "namespace": namespace, "generation": generation, "image": image}, text)
    return EXIT_OK


def cmd_set_model(args: argparse.Namespace) -> int:
    client, namespace = connect(args)
    patch = build_set_model_patch(None if args.follow else args.version, None if args.follow else args.sha256)
    body = patch_modelapp(client, namespace, args.name, patch)
    model = (body.get("spec") or {}).get("model") or {}
    generation = (body.get("metadata") or {}).get("generation")
    pinned = f"pinned to {model.get('version')}" if model.get("version") else "following the blob"
    text = f"modelapp {namespace}/{args.name}: model {pinned} (generation {generation})"
    emit(args, {"name": args.name, "namespace": namespace, "generation": generation, "model": model}, text)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    client, namespace = connect(args)
    body = read_modelapp(client, namespace, args.name)
    emit(args, status_summary(body), render_status(body, datetime.now(UTC)))
    return EXIT_OK


def wait_for(
    fetch: Callable[[], dict[str, Any]],
    wanted_digest: str | None,
    wanted_model: str | None,
    timeout: float,
    *,
    interval: float = 1.0,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, Verdict]:
    """Poll until the verdict is final or the timeout passes; returns (exit code, last verdict).

    Transient API failures (unreachable, 5xx, 429) are retried until the deadline."""
    started = clock()
    deadline = started + timeout
    verdict = Verdict("waiting", "Unknown", "no answer from the API server yet")
    while True:
        try:
            body = fetch()
        except KubeApiError as error:
            if error.status not in (0, 429) and error.status < 500:
                raise
            verdict = Verdict("waiting", "ApiUnavailable", error.message)
        else:
            verdict = wait_verdict(body, Wanted.from_spec(body, wanted_digest, wanted_model))
            if verdict.state == "ready":
                return EXIT_OK, verdict
            if verdict.state == "failed":
                return EXIT_ROLLOUT_FAILED, verdict
        remaining = deadline - clock()
        if progress is not None:
            progress.update(f"waiting: {verdict.reason}: {verdict.message} ({clock() - started:.0f}s)")
        if remaining <= 0:
            return EXIT_TIMEOUT, verdict
        sleep(min(interval, remaining))


def cmd_wait(args: argparse.Namespace) -> int:
    client, namespace = connect(args)
    if args.digest is not None:
        check_digest(args.digest)
    read_modelapp(client, namespace, args.name)  # not found / forbidden: fail now, not at the deadline
    progress = Progress(sys.stderr, enabled=args.progress)
    started = time.monotonic()
    try:
        code, verdict = wait_for(
            lambda: client.get_modelapp(namespace, args.name),
            args.digest,
            args.model_version,
            args.timeout,
            interval=args.interval,
            progress=progress,
        )
    except KubeApiError as error:
        raise _api_error(error, f"ModelApp {namespace}/{args.name}") from None
    finally:
        progress.done()
    elapsed = time.monotonic() - started
    body = read_modelapp(client, namespace, args.name)
    summary = status_summary(body)
    state = {EXIT_OK: "Ready", EXIT_ROLLOUT_FAILED: "Failed", EXIT_TIMEOUT: "Timeout"}[code]
    image, model = summary["image"], summary["model"]
    if code == EXIT_OK:
        text = (
            f"modelapp {namespace}/{args.name} is Ready after {elapsed:.0f}s: image "
            f"{short(str(image.get('digest', '')))} model {model.get('version')} ({summary['replicas']['summary']})"
        )
    elif code == EXIT_ROLLOUT_FAILED:
        text = f"modelapp {namespace}/{args.name}: rollout failed: {verdict.reason}: {verdict.message}"
    else:
        text = (
            f"modelapp {namespace}/{args.name}: not Ready after {args.timeout:g}s: {verdict.reason}: {verdict.message}"
        )
    document = {
        "state": state,
        "reason": verdict.reason,
        "message": verdict.message,
        "elapsedSeconds": round(elapsed, 1),
        "status": summary,
    }
    if args.output != "text":
        print(structured(document, args.output))
    elif code == EXIT_OK:
        print(text)
    else:
        print(f"{args.prog}: {text}", file=sys.stderr)
    return code


def _modelapp_secret(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, key) of the Secret with the connection string the ModelApp itself uses, if it names one."""
    credentials = ((body.get("spec") or {}).get("model") or {}).get("credentials") or {}
    ref = credentials.get("secretRef") or {}
    return (str(ref["name"]), str(ref.get("key") or "connectionString")) if ref.get("name") else None


def _read_modelapp_secret(client: KubeClient, namespace: str, body: Mapping[str, Any]) -> str:
    """The connection string in the ModelApp's own credentials Secret; StorageCheckError saying why not."""
    from modelapp_operator.cli.storage import StorageCheckError  # noqa: PLC0415

    secret = _modelapp_secret(body)
    if secret is None:
        raise StorageCheckError(
            "--use-modelapp-secret: the ModelApp names no credentials Secret (spec.model.credentials.secretRef; "
            "it uses workload identity)"
        )
    name, key = secret
    try:
        data = (client.get("v1", "secrets", namespace, name).get("data") or {}).get(key)
    except KubeApiError as error:
        problem = {403: "you may not read it", 401: "unauthorized", 404: "it does not exist"}.get(
            error.status, f"HTTP {error.status} {error.reason}"
        )
        raise StorageCheckError(
            f"--use-modelapp-secret: Secret {namespace}/{name}: {problem}: {error.message}"
        ) from None
    try:
        text = base64.b64decode(data or "", validate=True).decode().strip()
    except (ValueError, UnicodeDecodeError):
        text = ""
    if not text:
        raise StorageCheckError(
            f"--use-modelapp-secret: Secret {namespace}/{name} has no connection string at key {key!r}"
        )
    return text


def _storage_advice(
    args: argparse.Namespace, check_url: str, client: KubeClient, namespace: str, body: Mapping[str, Any]
) -> str:
    """What to give so the check can run: the ways that can work here, the ModelApp's Secret only when the
    kubeconfig user may read it."""
    ways = ["--connection-string (or $AZURE_STORAGE_CONNECTION_STRING)"]
    secret = _modelapp_secret(body)
    if secret is not None and not args.use_modelapp_secret:
        try:
            readable = client.may("get", "secrets", namespace, secret[0])
        except (KubeApiError, ValueError):
            readable = False  # cannot tell: do not offer what may well be refused
        if readable:
            ways.append(
                f"--use-modelapp-secret (the ModelApp's own Secret {namespace}/{secret[0]}, which you may read)"
            )
    if check_url.startswith("https:"):
        ways.append("Entra ID credentials with Storage Blob Data Reader (az login, workload identity)")
    return ", or ".join(ways) + "; or --no-model-check to roll back unchecked"


def _check_restorable(
    args: argparse.Namespace, client: KubeClient, namespace: str, body: Mapping[str, Any], entry: Mapping[str, Any]
) -> None:
    """Fail before any change when the entry's model version no longer exists in storage; every way of not
    knowing (no credentials, unreachable, refused) is exit 9 with what to give."""
    from modelapp_operator.cli.storage import StorageCheckError, pinned_etag  # noqa: PLC0415

    check = pin_to_check(entry)
    if check is None:
        return
    what = f"modelapp {namespace}/{args.name}"
    revision = entry.get("revision")
    try:
        if args.use_modelapp_secret:
            connection_string: str | None = _read_modelapp_secret(client, namespace, body)
        else:
            connection_string = _connection_string(args, CONNECTION_STRING_ENVS)
        found = pinned_etag(check, connection_string)
    except StorageCheckError as error:
        raise CliError(
            EXIT_STORAGE_UNREACHABLE,
            f"{what}: nothing changed: cannot check that revision {revision}'s model still exists: {error}. "
            f"Give {_storage_advice(args, check.url, client, namespace, body)}",
        ) from None
    problem = pin_problem(check, found)
    if problem is not None:
        raise CliError(EXIT_MODEL_GONE, f"{what}: cannot roll back to revision {revision}: {problem}; nothing changed")


def cmd_rollback(args: argparse.Namespace) -> int:
    client, namespace = connect(args)
    body = read_modelapp(client, namespace, args.name)
    try:
        entry = choose_rollback_target(body, args.to_revision)
    except RollbackError as error:
        raise CliError(EXIT_ERROR, f"modelapp {namespace}/{args.name}: cannot roll back: {error}") from None
    if args.check_model:
        _check_restorable(args, client, namespace, body, entry)
    patch = build_rollback_patch(entry)
    updated = patch_modelapp(client, namespace, args.name, patch)
    generation = (updated.get("metadata") or {}).get("generation")
    text = (
        f"modelapp {namespace}/{args.name}: rolling back to revision {entry.get('revision')}: image "
        f"{short(str(entry.get('imageDigest')))} model {entry.get('modelVersion')} (generation {generation})"
    )
    emit(
        args,
        {
            "name": args.name,
            "namespace": namespace,
            "generation": generation,
            "revision": entry.get("revision"),
            "imageDigest": entry.get("imageDigest"),
            "modelVersion": entry.get("modelVersion"),
        },
        text,
    )
    return EXIT_OK
