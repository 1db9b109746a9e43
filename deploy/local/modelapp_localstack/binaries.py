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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .procs import StackError, log

REPO_ROOT = Path(__file__).resolve().parents[3]
KUBE_MODULE_DIR = REPO_ROOT / "deploy" / "local" / "kube"
KWOK_VERSION = "v0.8.0"


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


def _required_version(module: str) -> str:
    go_mod = (KUBE_MODULE_DIR / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)} (v\S+)", go_mod, re.MULTILINE)
    if not match:
        raise StackError(f"{module} is not required in {KUBE_MODULE_DIR / 'go.mod'}")
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
    if target.exists():
        return target
    with build_lock(target.parent):
        if target.exists():  # built by another clone while we waited
            return target
        partial = target.with_suffix(".partial")
        env = _go_env()
        env["GOFLAGS"] = "-mod=mod"
        _run_go_build(
            [_go(), "build", "-v", "-trimpath", f"-ldflags={_kube_ldflags(found.kubernetes)}", "-o", str(partial), "."],
            KUBE_MODULE_DIR,
            env,
            f"Kubernetes {found.kubernetes} + etcd {found.etcd}",
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


def build_all() -> dict[str, Path]:
    return {"kube": kube_binary(), "kwok": kwok_binary()}
