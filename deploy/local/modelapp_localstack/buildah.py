"""Image builds with Debian's buildah, rootless-style storage kept in the run folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .procs import StackError, log
from .registry import Registry

# How much of buildah's output a StackError carries.
OUTPUT_TAIL = 3000


@dataclass(frozen=True)
class Buildah:
    run_dir: Path

    @property
    def storage(self) -> Path:
        return self.run_dir / "buildah"

    def _base(self) -> list[str]:
        executable = shutil.which("buildah")
        if executable is None:
            raise StackError("buildah is missing: apt-get install buildah")
        return [
            executable,
            f"--root={self.storage / 'root'}",
            f"--runroot={self.storage / 'runroot'}",
            "--storage-driver=vfs",
        ]

    def _env(self) -> dict[str, str]:
        # Big temporary files (archive writes, layer compression) go to the run folder, not /var/tmp.
        tmp = self.storage / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "TMPDIR": str(tmp)}

    def _run(self, args: Sequence[str], what: str) -> str:
        result = subprocess.run(
            [*self._base(), *args], capture_output=True, text=True, check=False, env=self._env()
        )
        if result.returncode != 0:
            output = (result.stdout + "\n" + result.stderr).strip()
            raise StackError(f"buildah {what} failed ({result.returncode}):\n{output[-OUTPUT_TAIL:]}")
        return result.stdout

    def build(
        self,
        context: Path,
        image: str,
        dockerfile: Path | None = None,
        *,
        build_args: Mapping[str, str] | None = None,
        volumes: Sequence[tuple[Path, str]] = (),
        pull: str = "true",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """`buildah bud` with chroot isolation (host network). `volumes` are (host path, container path) pairs,
        bind-mounted read-only into every RUN step and never part of the image."""
        started = time.monotonic()
        args = ["bud", "--isolation=chroot", "--network=host", "--layers=false", f"--pull={pull}", "-t", image]
        if dockerfile is not None:
            args += ["-f", str(dockerfile)]
        for name, value in (build_args or {}).items():
            args += ["--build-arg", f"{name}={value}"]
        for source, target in volumes:
            args += ["--volume", f"{source}:{target}:ro"]
        for name, value in (labels or {}).items():
            args += ["--label", f"{name}={value}"]
        self._run([*args, str(context)], f"build of {image}")
        log(f"built {image} in {time.monotonic() - started:.1f}s")

    def push(self, image: str, registry: Registry, destination: str | None = None) -> str:
        """Push to the registry over TLS with its CA; return the pushed manifest digest.

        `destination` (host/path:tag) defaults to `image` itself."""
        cert_dir = self.storage / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(registry.ca_file, cert_dir / "ca.crt")
        digest_file = self.storage / "digest"
        self._run(
            [
                "push",
                f"--cert-dir={cert_dir}",
                f"--creds={registry.username}:{registry.password}",
                f"--digestfile={digest_file}",
                image,
                f"docker://{destination or image}",
            ],
            f"push of {destination or image}",
        )
        return digest_file.read_text().strip()

    def save_archive(self, image: str, archive: Path, name: str) -> None:
        """Write `image` as an OCI archive whose index names it `name` (org.opencontainers.image.ref.name)."""
        self._run(["push", image, f"oci-archive:{archive}:{name}"], f"write of {archive.name}")

    def pull_archive(self, archive: Path) -> str:
        """Load an OCI archive into this storage; return the image ID."""
        output = self._run(["pull", "--quiet", f"oci-archive:{archive}"], f"load of {archive.name}")
        lines = output.strip().splitlines()
        if not lines:
            raise StackError(f"buildah pull of {archive} printed no image ID")
        return lines[-1].strip()

    def tag(self, image: str, *names: str) -> None:
        self._run(["tag", image, *names], f"tag of {image}")

    def image_id(self, image: str) -> str | None:
        """The ID of the image with this name in the storage, or None."""
        result = subprocess.run(
            [*self._base(), "images", "--no-trunc", "--quiet", image],
            capture_output=True, text=True, check=False, env=self._env(),
        )
        lines = result.stdout.split()
        return lines[0].removeprefix("sha256:") if result.returncode == 0 and lines else None

    def image_labels(self, image: str) -> dict[str, str]:
        inspected = json.loads(self._run(["inspect", "--type=image", image], f"inspect of {image}"))
        labels: dict[str, str] = inspected["OCIv1"]["config"].get("Labels") or {}
        return labels

    def from_image(self, image: str) -> str:
        """A working container from `image` ("scratch" for an empty one); returns its name."""
        return self._run(["from", "--pull=never", image], f"from {image}").strip().splitlines()[-1]

    def add(self, container: str, source: Path, destination: str) -> None:
        """Copy a file or a folder into the container; a local tar archive is extracted."""
        self._run(["add", container, str(source), destination], f"add of {source.name}")

    def config(self, container: str, options: Sequence[str]) -> None:
        self._run(["config", *options, container], f"config of {container}")

    def commit(self, container: str, image: str) -> str:
        """Commit the container as `image` (OCI format); return the image ID."""
        return self._run(["commit", "--quiet", "--format=oci", container, image], f"commit of {image}").strip()

    def run(
        self, container: str, command: Sequence[str], volumes: Sequence[tuple[Path, str]] = ()
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the container (chroot isolation, the image's user); output is returned, not checked."""
        args = ["run", "--isolation=chroot"]
        for source, target in volumes:
            args += ["--volume", f"{source}:{target}:ro"]
        return subprocess.run(
            [*self._base(), *args, container, "--", *command],
            capture_output=True, text=True, check=False, env=self._env(),
        )

    def remove(self, container: str) -> None:
        self._run(["rm", container], f"removal of {container}")
