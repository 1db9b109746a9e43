"""modelapp-stack: build, start and stop ModelApp's local stack.

  modelapp-stack build            build (or find cached) Kubernetes, etcd and kwok binaries and the images
                                  (Debian base, pause, app, operator)
  modelapp-stack up               start everything, print how to reach it, run until Ctrl-C
  modelapp-stack up --only azurite,registry
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from . import binaries, images
from .procs import StackError, log
from .stack import Stack

COMPONENTS = ("kube", "azurite", "registry")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="modelapp-stack",
        description="ModelApp's local stack: a real Kubernetes control plane with kwok fake nodes, "
        "Azurite (Azure Blob Storage) and a TLS docker registry, all on loopback.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build or find the cached control-plane binaries and images")
    build.add_argument("--no-images", action="store_true",
                       help="binaries only; skip the base, pause, app and operator images")
    commands.add_parser("versions", help="print the pinned Kubernetes, etcd and kwok versions")
    up = commands.add_parser("up", help="start the stack and keep it running until Ctrl-C")
    up.add_argument("--only", default=",".join(COMPONENTS),
                    help=f"comma-separated components to start (default: all of {','.join(COMPONENTS)})")
    up.add_argument("--run-dir", type=Path, help="folder for certs, data and logs (default: a new .run/stack-*)")
    up.add_argument("--keep", action="store_true", help="keep the run folder after stopping")
    up.add_argument("--nodes", type=int, default=2, help="number of kwok fake nodes (default: 2)")
    up.add_argument("--real-node", action="store_true",
                    help="also run a real node (containerd, kubelet, kube-proxy) in a network namespace of the "
                    "stack's own; services then bind the host side of that network instead of loopback")
    up.add_argument("--notify-url", help="URL the registry posts its push notifications to")
    up.add_argument("--notify-token", help="bearer token the registry sends with notifications")
    up.add_argument("--env-file", type=Path, help="also write the connection settings to this file")
    return parser.parse_args(argv)


def _env_lines(stack: Stack) -> list[str]:
    lines: list[str] = []
    if stack.kube:
        lines += [f"KUBECONFIG={stack.kube.kubeconfig}", f"MODELAPP_STACK_KUBECTL={stack.kube.binary} kubectl"]
    if stack.network:
        lines += [f"MODELAPP_STACK_NODE_NETNS={stack.network.namespace}", f"MODELAPP_STACK_RUN_DIR={stack.run_dir}"]
    if stack.azurite:
        lines.append(f"MODELAPP_STACK_AZURE_STORAGE_CONNECTION_STRING={stack.azurite.connection_string}")
    if stack.registry:
        lines += [
            f"MODELAPP_STACK_REGISTRY={stack.registry.host}",
            f"MODELAPP_STACK_REGISTRY_USERNAME={stack.registry.username}",
            f"MODELAPP_STACK_REGISTRY_PASSWORD={stack.registry.password}",
            f"MODELAPP_STACK_REGISTRY_CA_FILE={stack.registry.ca_file}",
        ]
    return [f"export {key}={shlex.quote(value)}" for key, value in (line.split("=", 1) for line in lines)]


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.command == "versions":
            found = binaries.versions()
            print(f"kubernetes {found.kubernetes}\netcd {found.etcd}\nkwok {found.kwok}")
            return 0
        if args.command == "build":
            started = time.monotonic()
            for name, path in binaries.build_all().items():
                print(f"{name}: {path}")
            binaries.kwok_stage_crd()
            log(f"binaries ready in {time.monotonic() - started:.1f}s")
            if not args.no_images:
                started = time.monotonic()
                for name, image in images.build_all().items():
                    info = image.info()
                    print(f"image {name}: {image.name} {image.path} (built in {info.get('build_seconds', '?')}s, "
                          f"{info.get('image_bytes', 0) / 1e6:.0f} MB unpacked)")
                log(f"images ready in {time.monotonic() - started:.1f}s")
            return 0
        wanted = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(COMPONENTS))
        if unknown:
            print(f"modelapp-stack: unknown component(s) {unknown}; choose from {COMPONENTS}", file=sys.stderr)
            return 2
        signal.signal(signal.SIGTERM, _terminate)
        # "Press Ctrl-C" must hold even when started from a script's background job, where the shell leaves
        # SIGINT ignored and Python then keeps it so (the stack would never be stopped and cleaned up by it).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stack = Stack.create(args.run_dir, keep_run_dir=args.keep, real_nodes=1 if args.real_node else 0)
        try:
            started = time.monotonic()
            if "azurite" in wanted:
                stack.start_azurite()
            if "registry" in wanted:
                stack.start_registry(args.notify_url, args.notify_token)
            if "kube" in wanted:
                stack.start_kube(nodes=args.nodes)
            log(f"stack up in {time.monotonic() - started:.1f}s; run folder {stack.run_dir}")
            lines = _env_lines(stack)
            if args.env_file:
                args.env_file.write_text("\n".join(lines) + "\n")
            print("\n".join(lines), flush=True)
            log("running; press Ctrl-C to stop and clean up")
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log("stopping")
        finally:
            stack.stop()
        return 0
    except StackError as error:
        print(f"modelapp-stack: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
