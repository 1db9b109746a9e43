"""Build the control plane's binaries with this machine's Go and cache them by version.

No download site for Kubernetes binaries is reachable, so they are built from
the `k8s.io/kubernetes` module (see ../kube/go.mod). The cache folder is keyed by
the versions and a hash of our Go sources, so a warm start does no Go work at all.
It is the user's cache folder, not the clone's, so a second clone of the same tree
on the same machine finds everything built (see cache_root).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .procs import StackError, log

REPO_ROOT = Path(__file__).resolve().parents[3]
KUBE_MODULE_DIR = REPO_ROOT / "deploy" / "local" / "kube"
KWOK_VERSION = "v0.8.0"
# metrics-server, a program of a module of ours (go.mod's `tool` line pins it): HPAs read pods' CPU from it.
METRICS_SERVER_MODULE_DIR = REPO_ROOT / "deploy" / "local" / "metrics-server"
METRICS_SERVER_PACKAGE = "sigs.k8s.io/metrics-server/cmd/metrics-server"
NETPOL_MODULE_DIR = REPO_ROOT / "deploy" / "local" / "netpol"
NETPOL_MODULE = "sigs.k8s.io/kube-network-policies"
# The kernel here has no nftables `queue` expression; this file replaces the library's (see the file).
NETPOL_QUEUE_OVERLAY = NETPOL_MODULE_DIR / "nftables_queue.go.overlay"


def cache_root() -> Path:
    """Where built artefacts are kept, keyed by content: MODELAPP_CACHE_DIR, else the user's cache folder
    ($XDG_CACHE_HOME/modelapp or ~/.cache/modelapp), shared by every clone on the machine."""
    if explicit := os.environ.get("MODELAPP_CACHE_DIR"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelapp"


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """One build per cache entry at a time (two clones' setups may ask at once); the result is renamed in."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _required_version(module: str, module_dir: Path = KUBE_MODULE_DIR) -> str:
    go_mod = (module_dir / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", go_mod, re.MULTILINE)
    if not match:
        raise StackError(f"{module} is not required in {module_dir / 'go.mod'}")
    return match.group(1)


@dataclass(frozen=True)
class Versions:
    kubernetes: str
    etcd: str
    kwok: str


def versions() -> Versions:
    return Versions(
        kubernetes=_required_version("k8s.io/kubernetes"),
        etcd=_required_version("go.etcd.io/etcd/server/v3"),
        kwok=KWOK_VERSION,
    )


def _kube_ldflags(kubernetes_version: str) -> str:
    """Strip symbols and stamp the version, so nodes and `kubectl version` report v1.x.y, not v0.0.0-master."""
    major, minor = kubernetes_version.lstrip("v").split(".")[:2]
    package = "k8s.io/component-base/version"
    return (
        f"-s -w -X {package}.gitVersion={kubernetes_version} -X {package}.gitMajor={major}"
        f" -X {package}.gitMinor={minor} -X {package}.gitTreeState=clean"
    )


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((KUBE_MODULE_DIR / name).read_bytes())
    digest.update(_kube_ldflags(versions().kubernetes).encode())
    return digest.hexdigest()[:10]


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        raise StackError("Go is needed to build the control plane; `go` is not on PATH")
    return go


def _run_go_build(args: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    """Run a Go build, printing progress (packages compiled) and how long it took."""
    started = time.monotonic()
    log(f"building {what} (cold builds take a while on 2 cores; progress every 100 packages)")
    process = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    compiled = 0
    tail: list[str] = []
    for line in process.stdout:
        tail = [*tail[-30:], line.rstrip()]
        # `go build -v` prints one import path per compiled package.
        if re.match(r"^[\w.\-]+(/[\w.\-~+]+)*$", line.strip()):
            compiled += 1
            if compiled % 100 == 0:
                log(f"  {what}: {compiled} packages compiled, {time.monotonic() - started:.0f}s")
    if process.wait() != 0:
        raise StackError(f"building {what} failed:\n" + "\n".join(tail))
    log(f"built {what} in {time.monotonic() - started:.0f}s ({compiled} packages compiled)")


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Stable caches make a rebuild after a source change incremental.
    env.setdefault("GOMODCACHE", str(Path.home() / "go" / "pkg" / "mod"))
    env.setdefault("GOCACHE", str(Path.home() / ".cache" / "go-build"))
    env["CGO_ENABLED"] = "0"
    return env


def kube_binary() -> Path:
    """The multi-call binary (etcd, kube-apiserver, -controller-manager, -scheduler, kubectl, kubelet, kube-proxy)."""
    found = versions()
    target = cache_root() / f"kube-{found.kubernetes}-etcd-{found.etcd}-{_sources_hash()}" / "kube"
    return _build_module(
        target, KUBE_MODULE_DIR, f"Kubernetes {found.kubernetes} + etcd {found.etcd}",
        lambda env: [f"-ldflags={_kube_ldflags(found.kubernetes)}"],
    )


def _build_module(
    target: Path, module_dir: Path, what: str, flags: Callable[[dict[str, str]], list[str]], package: str = "."
) -> Path:
    """`go build` a main package (default: the module's own) of one of our modules into the cache entry `target`,
    unless it is there. `flags(env)` gives the build flags (it may prepare files for them)."""
    if target.exists():
        return target
    with build_lock(target.parent):
        if target.exists():  # built by another clone while we waited
            return target
        partial = target.with_suffix(".partial")
        env = _go_env()
        env["GOFLAGS"] = "-mod=mod"
        _run_go_build(
            [_go(), "build", "-v", "-trimpath", *flags(env), "-o", str(partial), package], module_dir, env, what
        )
        partial.rename(target)
    return target


def kwok_binary() -> Path:
    target = cache_root() / f"kwok-{KWOK_VERSION}" / "kwok"
    if target.exists():
        return target
    with build_lock(target.parent):
        if target.exists():  # built by another clone while we waited
            return target
        gobin = target.parent / "partial"
        gobin.mkdir(parents=True, exist_ok=True)
        env = _go_env()
        env["GOBIN"] = str(gobin)
        env.pop("GOFLAGS", None)
        _run_go_build(
            [_go(), "install", "-v", "-trimpath", "-ldflags=-s -w", f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}"],
            REPO_ROOT,
            env,
            f"kwok {KWOK_VERSION}",
        )
        (gobin / "kwok").rename(target)
        shutil.rmtree(gobin, ignore_errors=True)
    return target


def kwok_stage_crd() -> Path:
    """kwok's Stage CRD, taken from the kwok module that the build downloaded (never committed)."""
    target = cache_root() / f"kwok-{KWOK_VERSION}" / "kwok.x-k8s.io_stages.yaml"
    if target.exists():
        return target
    env = _go_env()
    env.pop("GOFLAGS", None)
    found = subprocess.run(
        [_go(), "mod", "download", "-json", f"sigs.k8s.io/kwok@{KWOK_VERSION}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False,
    )
    if found.returncode != 0:
        raise StackError(f"cannot download the kwok module: {found.stdout}{found.stderr}")
    module_dir = Path(json.loads(found.stdout)["Dir"])
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.copyfile(module_dir / "kustomize" / "crd" / "bases" / target.name, partial)
    partial.rename(target)
    return target


def netpol_binary() -> Path:
    """kube-network-policies (NetworkPolicy enforcement with nftables and nfqueue) for the real node.

    A module of its own (../netpol): its k8s.io/* versions need not match the control plane's. Built from a
    vendored copy in which one file of the nftables library is ours, so its queue expression is sent as the
    xtables NFQUEUE target (the file says why; `go build -overlay` may not replace module cache files)."""
    version = _required_version(NETPOL_MODULE, NETPOL_MODULE_DIR)
    sources = ("go.mod", "go.sum", "main.go")
    digest = hashlib.sha256()
    for path in (*(NETPOL_MODULE_DIR / name for name in sources), NETPOL_QUEUE_OVERLAY):
        digest.update(path.read_bytes())
    target = cache_root() / f"kube-network-policies-{version}-{digest.hexdigest()[:10]}" / "kube-network-policies"
    work = target.parent / "src"

    def vendored(env: dict[str, str]) -> list[str]:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for name in sources:
            shutil.copyfile(NETPOL_MODULE_DIR / name, work / name)
        done = subprocess.run([_go(), "mod", "vendor"], cwd=work, env=env, capture_output=True, text=True, check=False)
        replaced = work / "vendor" / "github.com" / "google" / "nftables" / "expr" / "queue.go"
        if done.returncode != 0 or not replaced.exists():
            raise StackError(f"cannot vendor kube-network-policies' modules: {done.stdout}{done.stderr}")
        shutil.copyfile(NETPOL_QUEUE_OVERLAY, replaced)
        return ["-mod=vendor", "-ldflags=-s -w"]

    built = _build_module(target, work, f"kube-network-policies {version}", vendored)
    shutil.rmtree(work, ignore_errors=True)
    return built


def metrics_server_binary() -> Path:
    """metrics-server, the program its module's `tool` line pins (../metrics-server), cached by version and
    the hash of go.mod and go.sum."""
    version = _required_version("sigs.k8s.io/metrics-server", METRICS_SERVER_MODULE_DIR)
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum"):
        digest.update((METRICS_SERVER_MODULE_DIR / name).read_bytes())
    target = cache_root() / f"metrics-server-{version}-{digest.hexdigest()[:10]}" / "metrics-server"
    return _build_module(target, METRICS_SERVER_MODULE_DIR, f"metrics-server {version}",
                         lambda env: ["-ldflags=-s -w"], METRICS_SERVER_PACKAGE)


def build_all() -> dict[str, Path]:
    return {"kube": kube_binary(), "kwok": kwok_binary(), "metrics-server": metrics_server_binary()}
