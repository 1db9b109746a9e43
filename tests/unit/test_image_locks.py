"""The images' hashed dependency locks (requirements/*-lock.txt, made by requirements/lock.sh) match pyproject.toml:
every dependency of the image's extra (and the build backend) is pinned at a version its specifier allows, nothing
is pinned that pyproject.toml no longer asks for, every pin carries sha256 hashes, no development tool is in
them, and the Dockerfiles install them in hash-checking mode. When this fails: `bash requirements/lock.sh`."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
LOCKS = {"app": ROOT / "requirements" / "app-lock.txt", "operator": ROOT / "requirements" / "operator-lock.txt"}
DOCKERFILES = {"app": ROOT / "Dockerfile.app", "operator": ROOT / "Dockerfile.operator"}
REFRESH = "bash requirements/lock.sh"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass
class Pin:
    version: str
    hashes: int = 0
    via: set[str] = field(default_factory=set)


def read_lock(path: Path) -> dict[str, Pin]:
    """name -> Pin, from pip-compile's output (`name==version \\`, `--hash=...` lines, `# via` comments)."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    in_via = False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if match := _PIN.match(line):
            current = pins[canonicalize_name(match[1])] = Pin(match[2])
            in_via = False
        elif current is not None and _HASH.search(stripped):
            current.hashes += 1
        elif current is not None and stripped.startswith("# via"):
            rest = stripped.removeprefix("# via").strip()
            in_via = not rest
            if rest:
                current.via.add(rest)
        elif current is not None and in_via and stripped.startswith("#   "):
            current.via.add(stripped.removeprefix("#").strip())
        else:
            in_via = False
    return pins


def direct_requirements(extra: str) -> list[Requirement]:
    """What pyproject.toml asks for the image: the base dependencies, the extra's, and the build backend."""
    lines = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"][extra]]
    lines += PYPROJECT["build-system"]["requires"]
    return [Requirement(line) for line in lines if canonicalize_name(Requirement(line).name) != PROJECT]


@pytest.mark.parametrize("extra", LOCKS)
def test_every_dependency_is_pinned_within_its_specifier_with_hashes(extra: str) -> None:
    pins = read_lock(LOCKS[extra])
    for requirement in direct_requirements(extra):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement} is not in {LOCKS[extra].name}: {REFRESH}"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{LOCKS[extra].name} pins {requirement.name}=={pin.version}, outside {requirement}: {REFRESH}"
        )
    unhashed = sorted(name for name, pin in pins.items() if pin.hashes == 0)
    assert not unhashed, f"pins without a sha256 hash: {unhashed}"


@pytest.mark.parametrize("extra", LOCKS)
def test_the_lock_pins_nothing_pyproject_no_longer_asks_for(extra: str) -> None:
    """pip-compile notes why each pin is there; a pin for pyproject.toml must be one of its dependencies today,
    and every other pin must be needed by another pin."""
    pins = read_lock(LOCKS[extra])
    wanted = {canonicalize_name(requirement.name) for requirement in direct_requirements(extra)}
    for name, pin in pins.items():
        assert pin.via, f"{name} has no '# via' note in {LOCKS[extra].name}"
        from_pyproject = any(reason.startswith(f"{PROJECT} (pyproject.toml") for reason in pin.via)
        others = {canonicalize_name(reason) for reason in pin.via if not reason.startswith(("-c ", f"{PROJECT} ("))}
        assert (from_pyproject and name in wanted) or (others & pins.keys()), (
            f"{LOCKS[extra].name} pins {name} for {sorted(pin.via)}, which pyproject.toml no longer asks for: {REFRESH}"
        )


def test_both_images_pin_what_they_share_at_one_version() -> None:
    app, operator = read_lock(LOCKS["app"]), read_lock(LOCKS["operator"])
    differ = {name: (app[name].version, operator[name].version) for name in app.keys() & operator.keys()}
    assert {name: versions for name, versions in differ.items() if versions[0] != versions[1]} == {}


@pytest.mark.parametrize("extra", LOCKS)
def test_no_development_tool_is_locked_for_an_image(extra: str) -> None:
    """A package of the dev extra is in an image's lock only as what an image's package needs (PyJWT for msal),
    never for its own sake (pytest, mypy, skl2onnx...)."""
    pins = read_lock(LOCKS[extra])
    dev = {canonicalize_name(Requirement(line).name) for line in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    for name in (dev - {PROJECT}) & pins.keys():
        needed_by = {canonicalize_name(reason) for reason in pins[name].via} & pins.keys()
        assert needed_by, f"{name} (a development tool) is in {LOCKS[extra].name}"
    assert not {"pytest", "mypy", "ruff", "hypothesis", "skl2onnx"} & pins.keys()


@pytest.mark.parametrize("extra", LOCKS)
def test_the_dockerfile_installs_its_lock_in_hash_checking_mode(extra: str) -> None:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILES[extra].read_text())
    lock = LOCKS[extra].relative_to(ROOT).as_posix()
    installs = [line for line in text.splitlines() if line.startswith("RUN") and "pip install" in line]
    assert any(f"--require-hashes --only-binary=:all: -r {lock}" in line for line in installs)
    # The project itself adds nothing: no dependencies, no index, no build environment of its own.
    assert any("--no-deps --no-build-isolation --no-index ." in line and "pip check" in line for line in installs)
    assert not [line for line in installs if "[" in line], "an extra installed by name resolves unhashed"
