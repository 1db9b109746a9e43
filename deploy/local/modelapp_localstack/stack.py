"""The local stack as one object: start what is asked for, stop all of it."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .azurite import Azurite, start_azurite
from .binaries import REPO_ROOT
from .buildah import Buildah
from .kube import KubeCluster, start_cluster
from .pki import CertificateAuthority
from .registry import Registry, start_registry


@dataclass
class Stack:
    """Owns a run folder; every file and process it makes lives under it."""

    run_dir: Path
    keep_run_dir: bool = False
    kube: KubeCluster | None = None
    azurite: Azurite | None = None
    registry: Registry | None = None
    _ca: CertificateAuthority | None = field(default=None, repr=False)

    @classmethod
    def create(cls, run_dir: Path | None = None, *, keep_run_dir: bool = False) -> Stack:
        if run_dir is None:
            base = REPO_ROOT / ".run"
            base.mkdir(exist_ok=True)
            run_dir = Path(tempfile.mkdtemp(prefix="stack-", dir=base))
        run_dir.mkdir(parents=True, exist_ok=True)
        return cls(run_dir=run_dir, keep_run_dir=keep_run_dir)

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            self._ca = CertificateAuthority(self.run_dir / "pki-services", "modelapp-local-services-ca")
        return self._ca

    def start_kube(self, nodes: int = 2) -> KubeCluster:
        if self.kube is None:
            self.kube = start_cluster(self.run_dir / "kube", nodes=nodes)
        return self.kube

    def start_azurite(self) -> Azurite:
        if self.azurite is None:
            self.azurite = start_azurite(self.run_dir)
        return self.azurite

    def start_registry(self, notify_url: str | None = None, notify_token: str | None = None) -> Registry:
        if self.registry is None:
            self.registry = start_registry(self.run_dir, self.ca, notify_url=notify_url,
                                           notify_token=notify_token)
        return self.registry

    def buildah(self) -> Buildah:
        return Buildah(self.run_dir)

    def stop(self) -> None:
        for component in (self.registry, self.azurite, self.kube):
            if component is not None:
                with contextlib.suppress(Exception):
                    component.stop()
        self.registry = self.azurite = self.kube = None
        if not self.keep_run_dir:
            # buildah's vfs storage may hold read-only dirs; the run folder is ours alone.
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
