"""Container images for the local stack, built here and cached by content.

No base image can be pulled on these machines, so every image is made from what the machine has:

- base: a Debian root filesystem from Debian's packages (mmdebstrap, the machine's own apt sources), imported
  with buildah. It is the `BASE_IMAGE` of Dockerfile.app and Dockerfile.operator.
- pause: the pod sandbox image for containerd's CRI `sandbox_image`, a small static Go program of ours
  (deploy/local/pause) in an image FROM scratch.
- app, operator: exactly Dockerfile.app and Dockerfile.operator, built with buildah on the base image.

Each image is kept as an OCI archive under the cache folder (`<cache_root>/images/<kind>-<key>.oci.tar`, the
user's cache folder shared by every clone, see binaries.cache_root), its key a hash
of everything it is made from, with a JSON file beside it recording its build time and sizes. A second setup or a
test run finds the archive and does no work; a source change gives a new key and one rebuild.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast

from .binaries import REPO_ROOT, _go, _go_env, cache_root
from .buildah import OUTPUT_TAIL, Buildah
from .procs import StackError, log
from .registry import Registry

ProjectImage = Literal["app", "operator"]
PROJECT_DOCKERFILES: dict[ProjectImage, str] = {"app": "Dockerfile.app", "operator": "Dockerfile.operator"}
# Names the archives carry; `localhost/` keeps every runtime from looking for them on a public registry.
NAME_PREFIX = "localhost/modelapp"
# How many archives of one kind stay in the cache (the newest); older keys are removed after a build.
KEEP_PER_KIND = 3

BASE_SUITE = "bookworm"
# python3-venv brings ensurepip's wheels; the two libraries are what onnxruntime's and scikit-learn's wheels load.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "libstdc++6", "libgomp1")
BASE_MMDEBSTRAP_OPTIONS = (
    "--variant=minbase",
    "--aptopt=APT::Install-Recommends false",
    # Documentation, manuals and translations are no use in an image; copyright files stay.
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
)
HOST_SPECIFIC_FILES = frozenset({"etc/resolv.conf", "etc/hostname"})
ETC_HOSTS = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
BASE_CONFIG = (
    "--env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "--env=LANG=C.UTF-8",
    '--cmd=["python3"]',
    "--workingdir=/",
    "--label=org.opencontainers.image.title=modelapp-base",
    f"--label=org.opencontainers.image.description=Debian {BASE_SUITE} minbase with python3, built locally",
)

PAUSE_DIR = REPO_ROOT / "deploy" / "local" / "pause"
# The name the pause archive carries, for containerd's CRI `sandbox_image`. Fixed (each node's containerd imports
# the archive into a fresh root); the archive itself is cached by content like the others.
PAUSE_IMAGE = f"{NAME_PREFIX}/pause:1"
PAUSE_LDFLAGS = "-s -w"
PAUSE_CONFIG = (
    '--entrypoint=["/pause"]',
    "--user=65535:65535",
    "--label=org.opencontainers.image.title=modelapp-pause",
)

# The machine's pip settings a build needs (environment variable -> pip.conf option). They reach the build
# only as a read-only volume, never as a layer.
PIP_SETTINGS = {
    "PIP_CERT": "cert",
    "PIP_CLIENT_CERT": "client-cert",
    "PIP_FIND_LINKS": "find-links",
    "PIP_INDEX_URL": "index-url",
    "PIP_EXTRA_INDEX_URL": "extra-index-url",
    "PIP_TRUSTED_HOST": "trusted-host",
    "PIP_DEFAULT_TIMEOUT": "default-timeout",
    "PIP_TIMEOUT": "timeout",
    "PIP_RETRIES": "retries",
    "PIP_PROXY": "proxy",
}
HOST_PIP_CONFIGS = (Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"))
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
IGNORED_SOURCES = re.compile(r"(^|/)(__pycache__|\.mypy_cache|\.pytest_cache|\.ruff_cache)(/|$)|\.py[co]$")


@dataclass(frozen=True)
class ImageArchive:
    """One cached image: the OCI archive at `path`, whose index names the image `name`."""

    kind: str
    key: str
    name: str  # e.g. localhost/modelapp/pause:0123456789ab (also the ref.name annotation in the archive)
    path: Path  # <cache_root>/images/<kind>-<key>.oci.tar

    @property
    def info_path(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".oci.tar") + ".json")

    def info(self) -> dict[str, Any]:
        """What the build recorded: build_seconds, image_bytes (unpacked layers), archive_bytes, built_at."""
        try:
            data: dict[str, Any] = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def index(self) -> dict[str, Any]:
        """The archive's index.json; its one manifest is annotated with `name` (org.opencontainers.image.ref.name)."""
        with tarfile.open(self.path) as archive:
            return _read_json(archive, "index.json")

    def manifest_digest(self) -> str:
        """Digest of the image manifest inside the archive (what a push of it is expected to give)."""
        return str(self.index()["manifests"][0]["digest"])

    def image_id(self) -> str:
        """The image ID (its config's sha256), as buildah and containerd name it."""
        with tarfile.open(self.path) as archive:
            digest = _read_json(archive, "index.json")["manifests"][0]["digest"]
            return str(_read_json(archive, _blob_path(digest))["config"]["digest"]).removeprefix("sha256:")

    def layer_streams(self) -> Iterator[tuple[str, IO[bytes]]]:
        """(digest, uncompressed tar stream) of each layer, base layer first."""
        with tarfile.open(self.path) as archive:
            digest = _read_json(archive, "index.json")["manifests"][0]["digest"]
            for layer in _read_json(archive, _blob_path(digest))["layers"]:
                member = archive.extractfile(_blob_path(layer["digest"]))
                if member is None:
                    raise StackError(f"{self.path} lacks layer {layer['digest']}")
                compressed = "gzip" in layer["mediaType"]
                stream = cast(IO[bytes], gzip.GzipFile(fileobj=member)) if compressed else member
                with stream:
                    yield str(layer["digest"]), stream

    def unpacked_bytes(self) -> int:
        """Size of the image's layers uncompressed (the tar streams a runtime unpacks)."""
        total = 0
        for _, stream in self.layer_streams():
            while chunk := stream.read(1 << 20):
                total += len(chunk)
        return total


def _blob_path(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _read_json(archive: tarfile.TarFile, name: str) -> dict[str, Any]:
    member = archive.extractfile(name)
    if member is None:
        raise StackError(f"the OCI archive has no {name}")
    data: dict[str, Any] = json.loads(member.read())
    return data


def images_dir() -> Path:
    return cache_root() / "images"


def _key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:12]


def _archive(kind: str, key: str, name: str | None = None) -> ImageArchive:
    return ImageArchive(kind, key, name or f"{NAME_PREFIX}/{kind}:{key}", images_dir() / f"{kind}-{key}.oci.tar")


# --- keys ------------------------------------------------------------------------------------------------------


def base_key() -> str:
    recipe = json.dumps({"suite": BASE_SUITE, "packages": sorted(BASE_PACKAGES),
                         "mmdebstrap": BASE_MMDEBSTRAP_OPTIONS, "config": BASE_CONFIG}, sort_keys=True)
    return _key("base/3", recipe)  # 3: layer without device nodes or host files


def _go_version() -> str:
    result = subprocess.run([_go(), "env", "GOVERSION"], capture_output=True, text=True, check=False,
                            env=_pause_go_env())
    if result.returncode != 0:
        raise StackError(f"go env GOVERSION failed: {result.stderr[-OUTPUT_TAIL:]}")
    return result.stdout.strip()


def pause_key() -> str:
    sources = [(path.name, path.read_bytes()) for path in sorted(PAUSE_DIR.iterdir()) if path.is_file()]
    return _key("pause/1", _go_version(), PAUSE_LDFLAGS, json.dumps(PAUSE_CONFIG),
                *(part for name, data in sources for part in (name, data)))


def dockerfile_sources(dockerfile: Path) -> list[str]:
    """The context paths a Dockerfile's COPY and ADD instructions take from the build context."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found: list[str] = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True) if line.strip() else []
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        arguments = words[1:]
        if any(word.startswith("--from") for word in arguments):
            continue  # copies from another stage, not from the context
        arguments = [word for word in arguments if not word.startswith("--")]
        if len(arguments) == 1 and arguments[0].startswith("["):
            arguments = json.loads(arguments[0])
        found += arguments[:-1]
    return found


def _tree_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise StackError(f"{path} (copied by a Dockerfile) does not exist")
    return sorted(
        file for file in path.rglob("*")
        if file.is_file() and not IGNORED_SOURCES.search(file.relative_to(REPO_ROOT).as_posix())
    )


def project_key(which: ProjectImage) -> str:
    """Hash of the Dockerfile, the base image's key and every file its COPY instructions take."""
    dockerfile = REPO_ROOT / PROJECT_DOCKERFILES[which]
    parts: list[bytes | str] = [f"{which}/2", base_key(), dockerfile.read_bytes()]
    for source in dockerfile_sources(dockerfile):
        for file in _tree_files(REPO_ROOT / source):
            parts += [file.relative_to(REPO_ROOT).as_posix(), file.read_bytes()]
    return _key(*parts)


# --- cache plumbing ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """One image build at a time on this machine (setup and a test run may both ask)."""
    images_dir().mkdir(parents=True, exist_ok=True)
    with (images_dir() / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _storage(buildah: Buildah | None) -> Iterator[Buildah]:
    """The caller's buildah storage, or a scratch one under the cache folder that is removed afterwards."""
    if buildah is not None:
        yield buildah
        return
    images_dir().mkdir(parents=True, exist_ok=True)
    for stale in images_dir().glob("work-*-*"):  # left by a build that was killed
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"work-{os.getpid()}-", dir=images_dir()))
    try:
        yield Buildah(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB"


def _prune(kind: str, keep: Path) -> None:
    archives = sorted(images_dir().glob(f"{kind}-*.oci.tar"), key=lambda path: path.stat().st_mtime, reverse=True)
    for old in [path for path in archives if path != keep][KEEP_PER_KIND - 1:]:
        old.unlink(missing_ok=True)
        old.with_name(old.name.removesuffix(".oci.tar") + ".json").unlink(missing_ok=True)


def _produce(image: ImageArchive, buildah: Buildah | None, what: str, build: Callable[[Buildah], None]) -> ImageArchive:
    """Return the cached archive, or build the image into a buildah storage and write its archive."""
    if image.path.exists():
        return image
    with _cache_lock():
        if image.path.exists():  # built by someone else while we waited
            return image
        with _storage(buildah) as storage:
            started = time.monotonic()
            log(f"building the {what} image {image.name} (not in the cache)")
            build(storage)
            staged = dataclasses.replace(image, path=image.path.with_name(image.path.name + ".partial"))
            staged.path.unlink(missing_ok=True)
            storage.save_archive(image.name, staged.path, image.name)
            elapsed = time.monotonic() - started
            info: dict[str, Any] = {
                "name": image.name,
                "key": image.key,
                "build_seconds": round(elapsed, 1),
                "image_bytes": staged.unpacked_bytes(),
                "archive_bytes": staged.path.stat().st_size,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            image.info_path.write_text(json.dumps(info, indent=2) + "\n")
            staged.path.rename(image.path)
        _prune(image.kind, image.path)
        log(f"built the {what} image {image.name} in {elapsed:.0f}s: {_mb(info['image_bytes'])} unpacked, "
            f"{_mb(info['archive_bytes'])} archive ({image.path})")
    return image


def load_image(buildah: Buildah, image: ImageArchive) -> str:
    """Make `image.name` in this buildah storage be the archive's image (loading it if needed); return the name."""
    if buildah.image_id(image.name) != image.image_id():
        started = time.monotonic()
        image_id = buildah.pull_archive(image.path)
        buildah.tag(image_id, image.name)
        log(f"loaded {image.name} from the cache in {time.monotonic() - started:.1f}s")
    return image.name


def _checked(args: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        output = (result.stdout + "\n" + result.stderr).strip()
        raise StackError(f"{what} failed ({result.returncode}):\n{output[-OUTPUT_TAIL:]}")
    return result


def _commit_from_scratch(buildah: Buildah, name: str, source: Path, destination: str, config: list[str]) -> None:
    container = buildah.from_image("scratch")
    try:
        buildah.add(container, source, destination)
        buildah.config(container, config)
        buildah.commit(container, name)
    finally:
        with contextlib.suppress(StackError):
            buildah.remove(container)


# --- base -------------------------------------------------------------------------------------------------------


def apt_sources() -> list[Path]:
    """The machine's own enabled apt sources files that serve the base suite (never a mirror of ours)."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
                  *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    found = []
    for path in candidates:
        with contextlib.suppress(OSError):
            lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
            if any(re.search(rf"\b{BASE_SUITE}\b", line) for line in lines):
                found.append(path)
    if not found:
        raise StackError(f"no apt sources for Debian {BASE_SUITE} in /etc/apt: the base image is built from them")
    return found


def _build_base(buildah: Buildah, image: ImageArchive) -> None:
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise StackError("mmdebstrap is missing: apt-get install mmdebstrap (deploy/local/setup.sh installs it)")
    rootfs = buildah.storage / "tmp" / "rootfs.tar"
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _checked(
        [mmdebstrap, "--quiet", f"--include={','.join(BASE_PACKAGES)}", *BASE_MMDEBSTRAP_OPTIONS, BASE_SUITE,
         str(rootfs), *map(str, apt_sources())],
        f"mmdebstrap {BASE_SUITE}",
        env={**os.environ, "TMPDIR": str(rootfs.parent)},
    )
    log(f"  Debian {BASE_SUITE} root filesystem ({', '.join(BASE_PACKAGES)}): {_mb(rootfs.stat().st_size)} "
        f"in {time.monotonic() - started:.0f}s")
    layer = rootfs.with_name("layer.tar")
    try:
        _image_layer(rootfs, layer)
        _commit_from_scratch(buildah, image.name, layer, "/",
                             [*BASE_CONFIG, f"--label=io.modelapp.image.key={image.key}"])
    finally:
        rootfs.unlink(missing_ok=True)
        layer.unlink(missing_ok=True)


def _image_layer(source: Path, target: Path) -> None:
    """The root filesystem tarball as an image layer: without /dev's device nodes (runtimes give containers their
    own /dev, and the layer then unpacks where mknod is not allowed), with the build host's resolv.conf and
    hostname emptied (runtimes mount their own) and Debian's usual /etc/hosts."""
    with tarfile.open(source) as tar_in, tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar_out:
        names = set()
        for member in tar_in:
            names.add(member.name.removeprefix("./"))
            if member.ischr() or member.isblk():
                continue
            if member.isfile() and member.name.removeprefix("./") in HOST_SPECIFIC_FILES:
                member.size = 0
                tar_out.addfile(member, io.BytesIO())
                continue
            tar_out.addfile(member, tar_in.extractfile(member) if member.isfile() else None)
        if "etc/hosts" not in names:
            hosts = tarfile.TarInfo("./etc/hosts")
            hosts.size, hosts.mode, hosts.mtime = len(ETC_HOSTS), 0o644, int(time.time())
            tar_out.addfile(hosts, io.BytesIO(ETC_HOSTS))


def base_image(buildah: Buildah | None = None) -> ImageArchive:
    """The Debian base image (python3 at /usr/bin/python3), built once per recipe; `buildah`: storage to build in
    (default: a scratch storage in the cache folder)."""
    image = _archive("base", base_key(), f"{NAME_PREFIX}/base:{BASE_SUITE}-{base_key()}")
    return _produce(image, buildah, f"Debian {BASE_SUITE} base", lambda storage: _build_base(storage, image))


def base_image_archive() -> Path:
    return base_image().path


# --- pause ------------------------------------------------------------------------------------------------------


def _pause_go_env() -> dict[str, str]:
    env = _go_env()  # CGO_ENABLED=0 and the machine's shared Go caches
    # The module has no dependencies: never reach for a module proxy or another toolchain.
    env.update({"GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-mod=mod"})
    return env


def _build_pause(buildah: Buildah, image: ImageArchive) -> None:
    binary = buildah.storage / "tmp" / "pause"
    binary.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _checked([_go(), "build", "-trimpath", f"-ldflags={PAUSE_LDFLAGS}", "-o", str(binary), "."],
             "go build of deploy/local/pause", cwd=PAUSE_DIR, env=_pause_go_env())
    log(f"  pause binary (static Go): {binary.stat().st_size / 1e3:.0f} kB in {time.monotonic() - started:.1f}s")
    _commit_from_scratch(buildah, image.name, binary, "/pause",
                         [*PAUSE_CONFIG, f"--label=io.modelapp.image.key={image.key}"])


def pause_image(buildah: Buildah | None = None) -> ImageArchive:
    """The pod sandbox image. `ctr -n k8s.io images import <path>` makes it known as PAUSE_IMAGE (`.name`),
    the value for containerd's CRI `sandbox_image`."""
    image = _archive("pause", pause_key(), PAUSE_IMAGE)
    return _produce(image, buildah, "pause (pod sandbox)", lambda storage: _build_pause(storage, image))


def pause_image_archive() -> Path:
    return pause_image().path


# --- app and operator -------------------------------------------------------------------------------------------


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def pip_build_volumes(folder: Path) -> list[tuple[Path, str]]:
    """The machine's CA bundle and pip settings as read-only build volumes (`buildah bud --volume SRC:DST:ro`).

    pip in a RUN step reads its user configuration, /root/.config/pip/pip.conf (HOME is /root there): the host's
    /etc/pip.conf plus this environment's PIP_* settings (CA bundle, local wheel folder, timeout), written under
    `folder`, which is mounted over /root. Every mount target already exists in the base image (/root, the CA
    bundle), so the image gets no mount points left behind; a local wheel folder is mounted only if it holds
    something."""
    config = configparser.ConfigParser(interpolation=None)
    config.read([str(path) for path in HOST_PIP_CONFIGS if path.is_file()])
    if not config.has_section("global"):
        config.add_section("global")
    for variable, option in PIP_SETTINGS.items():
        value = os.environ.get(variable)
        if value:
            config.set("global", option, value)
    volumes: dict[str, Path] = {}
    if SYSTEM_CA_BUNDLE.is_file():
        volumes[str(SYSTEM_CA_BUNDLE)] = SYSTEM_CA_BUNDLE
    for section in config.sections():
        for option in ("cert", "client-cert"):
            value = config.get(section, option, fallback="")
            if value and Path(value).is_file():
                volumes[value] = Path(value)
        links = config.get(section, "find-links", fallback="").split()
        kept = [link for link in links if not link.startswith("/") or _has_files(Path(link))]
        for link in kept:
            if link.startswith("/"):
                volumes[link] = Path(link)
        if kept:
            config.set(section, "find-links", " ".join(kept))
        elif links:
            config.remove_option(section, "find-links")
    home = folder / "home"
    pip_conf = home / ".config" / "pip" / "pip.conf"
    pip_conf.parent.mkdir(parents=True, exist_ok=True)
    with pip_conf.open("w") as handle:
        config.write(handle)
    pip_conf.chmod(0o600)
    volumes["/root"] = home
    return [(source, target) for target, source in volumes.items()]


def _build_project(buildah: Buildah, which: ProjectImage, image: ImageArchive, base: ImageArchive) -> None:
    load_image(buildah, base)
    with tempfile.TemporaryDirectory(prefix="pip-", dir=buildah.storage / "tmp") as folder:
        buildah.build(
            REPO_ROOT,
            image.name,
            REPO_ROOT / PROJECT_DOCKERFILES[which],
            build_args={"BASE_IMAGE": base.name},
            volumes=pip_build_volumes(Path(folder)),
            pull="never",
            labels={"org.opencontainers.image.title": f"modelapp-{which}",
                    "org.opencontainers.image.description": f"{PROJECT_DOCKERFILES[which]} on {base.name}",
                    "io.modelapp.image.key": image.key},
        )


def project_image(which: ProjectImage, buildah: Buildah | None = None) -> ImageArchive:
    """The image from Dockerfile.app or Dockerfile.operator on the Debian base, built when its sources changed."""
    image = _archive(which, project_key(which))
    if image.path.exists():
        return image
    base = base_image(buildah)
    return _produce(image, buildah, f"{which} ({PROJECT_DOCKERFILES[which]})",
                    lambda storage: _build_project(storage, which, image, base))


def push_image(
    buildah: Buildah, image: ImageArchive, registry: Registry, repository: str, tag: str | None = None
) -> str:
    """Push a cached image to the stack's registry over TLS as `repository:tag` (default tag: its content key);
    return `host/repository@sha256:...`. The same archive always pushes to the same digest: the archive's own,
    pushed as it is (Registry.push_oci_archive; no load into buildah's storage, no second compression)."""
    destination = f"{registry.host}/{repository}"
    started = time.monotonic()
    digest = registry.push_oci_archive(image.path, repository, tag or image.key)
    log(f"pushed {destination}:{tag or image.key} ({digest}) in {time.monotonic() - started:.1f}s")
    return f"{destination}@{digest}"


def build_project_image(
    buildah: Buildah, which: ProjectImage, registry: Registry, repository: str | None = None, tag: str | None = None
) -> str:
    """Build (or take from the cache) the app or operator image, push it to the stack's registry over TLS and
    return `host/repository@sha256:...`. Default repository `modelapp/<which>`, default tag the content key."""
    return push_image(buildah, project_image(which, buildah), registry, repository or f"modelapp/{which}", tag)


def build_all(buildah: Buildah | None = None) -> dict[str, ImageArchive]:
    """Every image the stack uses, built or found in the cache (setup.sh runs this through `modelapp-stack build`)."""
    with _storage(buildah) as storage:
        return {
            "base": base_image(storage),
            "pause": pause_image(storage),
            "app": project_image("app", storage),
            "operator": project_image("operator", storage),
        }
