"""Image builds with Debian's buildah, rootless-style storage kept in the run folder."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import StackError, log
from .registry import Registry


@dataclass(frozen=True)
class Buildah:
    run_dir: Path

    def _base(self) -> list[str]:
        executable = shutil.which("buildah")
        if executable is None:
            raise StackError("buildah is missing: apt-get install buildah")
        storage = self.run_dir / "buildah"
        return [
            executable,
            f"--root={storage / 'root'}",
            f"--runroot={storage / 'runroot'}",
            "--storage-driver=vfs",
        ]

    def _run(self, args: list[str], what: str) -> str:
        result = subprocess.run([*self._base(), *args], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StackError(f"buildah {what} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result.stdout

    def build(self, context: Path, image: str, dockerfile: Path | None = None) -> None:
        started = time.monotonic()
        args = ["bud", "--isolation=chroot", "--layers=false", "-t", image]
        if dockerfile is not None:
            args += ["-f", str(dockerfile)]
        self._run([*args, str(context)], f"build of {image}")
        log(f"built {image} in {time.monotonic() - started:.1f}s")

    def push(self, image: str, registry: Registry) -> str:
        """Push to the registry over TLS with its CA; return the pushed manifest digest."""
        cert_dir = self.run_dir / "buildah" / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(registry.ca_file, cert_dir / "ca.crt")
        digest_file = self.run_dir / "buildah" / "digest"
        self._run(
            [
                "push",
                f"--cert-dir={cert_dir}",
                f"--creds={registry.username}:{registry.password}",
                f"--digestfile={digest_file}",
                image,
                f"docker://{image}",
            ],
            f"push of {image}",
        )
        return digest_file.read_text().strip()
