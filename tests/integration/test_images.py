"""The stack's real images: the Debian base, the pod sandbox (pause) image, and exactly Dockerfile.app and
Dockerfile.operator built on that base, pushed to the stack's registry.

The first run on a machine builds them (minutes); later runs take them from the cache (~/.cache/modelapp/images/)."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from modelapp_localstack import Buildah, Registry, Stack, images

# A cold cache builds each image here (the app image installs its wheels: minutes on 2 cores).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

RunIn = Callable[[images.ImageArchive, list[str]], tuple[int, str]]


@pytest.fixture(scope="module")
def buildah(local_stack: Stack) -> Buildah:
    return local_stack.buildah()


@pytest.fixture(scope="module")
def project_images(buildah: Buildah) -> dict[str, images.ImageArchive]:
    """Built (or taken from the cache) once for this module, in the stack's buildah storage."""
    return {which: images.project_image(which, buildah) for which in ("app", "operator")}


@pytest.fixture
def run_in(buildah: Buildah) -> Iterator[RunIn]:
    """run(image, command) -> (exit code, output): the command in a working container of the image (chroot
    isolation, the image's user), removed afterwards."""
    containers: list[str] = []

    def run(image: images.ImageArchive, command: list[str]) -> tuple[int, str]:
        images.load_image(buildah, image)
        container = buildah.from_image(image.name)
        containers.append(container)
        result = buildah.run(container, command)
        return result.returncode, result.stdout + result.stderr

    yield run
    for container in containers:
        buildah.remove(container)


def ref_name(image: images.ImageArchive) -> str:
    return str(image.index()["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])


def test_base_image_archive_holds_python3(run_in: RunIn) -> None:
    image = images.base_image()
    assert image.path == images.base_image_archive() and image.path.is_file()
    assert image.path.is_relative_to(images.images_dir())
    assert ref_name(image) == image.name
    info = image.info()
    assert info["build_seconds"] > 0 and info["image_bytes"] > 50e6
    check = "import sys, ssl, venv; print(sys.executable, sys.version_info >= (3, 11))"
    code, output = run_in(image, ["python3", "-c", check])
    assert code == 0, output
    assert "/usr/bin/python3 True" in output


def test_pause_image_is_a_static_binary_from_scratch(run_in: RunIn) -> None:
    image = images.pause_image()
    assert image.path == images.pause_image_archive() and image.path.is_file()
    # `ctr -n k8s.io images import <archive>` names the image by this annotation: containerd's sandbox_image.
    assert ref_name(image) == image.name == images.PAUSE_IMAGE
    assert image.info()["image_bytes"] < 5e6
    code, output = run_in(image, ["/pause", "--version"])
    assert code == 0, output
    assert "modelapp-pause" in output


def layer_names(image: images.ImageArchive) -> set[str]:
    """Paths in the image's own layers (above the base's one)."""
    found: set[str] = set()
    for number, (_, stream) in enumerate(image.layer_streams()):
        if number > 0:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                found |= {member.name for member in tar}
    return found


@pytest.mark.parametrize("which", ["app", "operator"])
def test_project_image_is_built_from_its_dockerfile_and_pushed_by_digest(
    buildah: Buildah, registry: Registry, project_images: dict[str, images.ImageArchive], which: images.ProjectImage
) -> None:
    image = project_images[which]
    assert image.path.is_file() and image.info()["build_seconds"] > 0
    dockerfile = images.PROJECT_DOCKERFILES[which]
    images.load_image(buildah, image)
    labels = buildah.image_labels(image.name)
    assert labels["org.opencontainers.image.title"] == f"modelapp-{which}" and dockerfile in labels[
        "org.opencontainers.image.description"]
    pushed = images.push_image(buildah, image, registry, f"modelapp/{which}")
    repository, digest = pushed.split("@")
    assert repository == f"{registry.host}/modelapp/{which}" and digest.startswith("sha256:")
    assert registry.resolve(f"modelapp/{which}", image.key) == digest
    # The cached archive pushes to the same digest every time: the digest changes only with the sources.
    again = images.push_image(buildah, image, registry, f"images-test/{which}", "again")
    assert again == f"{registry.host}/images-test/{which}@{digest}"
    assert image.manifest_digest() == digest
    # The machine's pip settings and CA bundle were build volumes only: nothing of them is in the image.
    leaked = {name for name in layer_names(image) if name.startswith(("root/", "etc/pip", "etc/ssl", "opt/wheels"))}
    assert not leaked


def test_app_image_runs_the_serving_stack_as_non_root_on_debian_python(
    project_images: dict[str, images.ImageArchive], run_in: RunIn
) -> None:
    image = project_images["app"]
    check = (
        "import os, sys, importlib.util as u, modelapp_serving, modelapp_contract; "
        "import sklearn, onnxruntime, flask, gunicorn; "
        "print(os.getuid(), sys.prefix, os.path.realpath(sys.executable), u.find_spec('modelapp_operator'))"
    )
    code, output = run_in(image, ["python3", "-c", check])
    assert code == 0, output
    # Non-root, the venv on Debian's python3, and no operator in the app's image.
    assert "10001 /opt/modelapp /usr/bin/python3.11 None" in output
    code, output = run_in(image, ["modelapp-serve", "--help"])
    assert code == 0, output


def test_operator_image_runs_the_operator(project_images: dict[str, images.ImageArchive], run_in: RunIn) -> None:
    image = project_images["operator"]
    check = (
        "import os, importlib.util, kopf, model_signing, modelapp_operator, modelapp_contract; "
        "print(importlib.util.find_spec('modelapp_serving'), os.getuid())"
    )
    code, output = run_in(image, ["python3", "-c", check])
    assert code == 0, output
    assert output.strip().endswith("None 10001"), "the operator image holds no serving app"
    code, output = run_in(image, ["modelapp-operator", "--help"])
    assert code == 0, output
    assert "ModelApp" in output


@pytest.mark.parametrize("which", ["app", "operator"])
def test_project_image_holds_only_what_it_runs(
    project_images: dict[str, images.ImageArchive], run_in: RunIn, which: images.ProjectImage
) -> None:
    """Installed from its hashed lock: consistent (`pip check`), and with no local stack, no development tool
    and no build backend left in it."""
    image = project_images[which]
    code, output = run_in(image, ["/opt/modelapp/bin/pip", "check"])
    assert code == 0, output
    absent = ["modelapp_localstack", "pytest", "mypy", "ruff", "hypothesis", "skl2onnx", "setuptools"]
    check = (
        "import importlib.util as u, shutil; "
        f"print([m for m in {absent!r} if u.find_spec(m)], shutil.which('modelapp-stack'), shutil.which('pytest'))"
    )
    code, output = run_in(image, ["python3", "-c", check])
    assert code == 0, output
    assert output.strip().endswith("[] None None"), output
    code, output = run_in(image, ["/opt/modelapp/bin/pip", "list", "--format=freeze"])
    assert code == 0, output
    installed = {line.partition("==")[0].lower().replace("_", "-") for line in output.split() if "==" in line}
    locked = (Path(__file__).resolve().parents[2] / "requirements" / f"{which}-lock.txt").read_text()
    pinned = {line.partition("==")[0].lower().replace("_", "-") for line in locked.splitlines() if "==" in line}
    # Everything installed is the project, pip, or a locked pin.
    assert installed - pinned - {"modelapp", "pip"} == set()
