"""Image cache keys and build inputs (modelapp_localstack/images.py), without building anything."""

from __future__ import annotations

import configparser
import re
import shutil
from pathlib import Path

import pytest
from modelapp_localstack import StackError, images

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("which", ["app", "operator"])
def test_dockerfiles_take_the_base_image_as_an_argument_for_both_stages(which: images.ProjectImage) -> None:
    text = (REPO_ROOT / images.PROJECT_DOCKERFILES[which]).read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"], "builder and final stage share the base (venv interpreter)"
    assert text.index("ARG BASE_IMAGE=python:3.11-slim") < text.index("FROM ")
    assert "RUN python3 -m venv /opt/modelapp" in text and "RUN python " not in text
    assert "USER 10001:10001" in text


@pytest.mark.parametrize(("which", "root"), [("app", "app/"), ("operator", "operator/")])
def test_each_image_copies_its_own_source_root_and_the_contract_only(which: images.ProjectImage, root: str) -> None:
    """So a change to one side rebuilds only that side's image (project_key hashes exactly these)."""
    sources = images.dockerfile_sources(REPO_ROOT / images.PROJECT_DOCKERFILES[which])
    lock = f"requirements/{which}-lock.txt"  # the hashed pins it installs (requirements/lock.sh)
    assert sorted(sources) == sorted(["pyproject.toml", "README.md", "contract/", root, lock])


def fake_repo(tmp_path: Path) -> Path:
    (tmp_path / "src" / "__pycache__").mkdir(parents=True)
    (tmp_path / "Dockerfile.app").write_text(
        "ARG BASE_IMAGE=x\nFROM ${BASE_IMAGE} AS b\nCOPY --chown=1:1 a.txt \\\n  src/ /dst/\n"
        "FROM ${BASE_IMAGE}\nCOPY --from=b /dst /dst\n"
    )
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    (tmp_path / "src" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    return tmp_path


def test_project_key_changes_with_a_copied_file_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = fake_repo(tmp_path)
    monkeypatch.setattr(images, "REPO_ROOT", repo)
    assert images.dockerfile_sources(repo / "Dockerfile.app") == ["a.txt", "src/"]
    first = images.project_key("app")
    assert images.project_key("app") == first
    (repo / "src" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\1")
    (repo / "unrelated.txt").write_text("not copied")
    assert images.project_key("app") == first, "bytecode and files outside the COPY sources do not count"
    (repo / "src" / "m.py").write_text("x = 2\n")
    assert images.project_key("app") != first
    shutil.rmtree(repo / "src")
    with pytest.raises(StackError, match="does not exist"):
        images.project_key("app")


def test_project_key_follows_the_base_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "REPO_ROOT", fake_repo(tmp_path))
    before = images.project_key("app"), images.base_key()
    monkeypatch.setattr(images, "BASE_PACKAGES", (*images.BASE_PACKAGES, "tzdata"))
    assert images.base_key() != before[1]
    assert images.project_key("app") != before[0]


def test_archives_live_in_the_cache_folder_and_carry_local_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MODELAPP_CACHE_DIR", str(tmp_path))
    image = images._archive("base", images.base_key(), f"{images.NAME_PREFIX}/base:bookworm-{images.base_key()}")
    assert image.path.parent == tmp_path / "images" and image.path.name.endswith(".oci.tar")
    assert image.info_path.name == f"base-{images.base_key()}.json" and image.info() == {}
    assert images.PAUSE_IMAGE.startswith("localhost/")


def test_pip_settings_reach_the_build_only_as_read_only_volumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_conf = tmp_path / "host-pip.conf"
    host_conf.write_text("[global]\ntimeout = 60\n")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("certs")
    wheels, empty = tmp_path / "wheels", tmp_path / "empty"
    wheels.mkdir()
    empty.mkdir()
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"")
    monkeypatch.setattr(images, "HOST_PIP_CONFIGS", (host_conf, tmp_path / "missing.conf"))
    for variable in images.PIP_SETTINGS:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PIP_CERT", str(bundle))
    monkeypatch.setenv("PIP_FIND_LINKS", f"{wheels} {empty}")
    volumes = {target: source for source, target in images.pip_build_volumes(tmp_path / "build")}
    assert volumes[str(bundle)] == bundle and volumes[str(wheels)] == wheels
    assert str(empty) not in volumes, "an empty wheel folder is left out (no mount point in the image)"
    # pip in a RUN step reads ~/.config/pip/pip.conf, HOME being /root: the folder is mounted there.
    home = volumes["/root"]
    assert home.is_relative_to(tmp_path / "build")
    pip_conf = home / ".config" / "pip" / "pip.conf"
    written = configparser.ConfigParser()
    written.read(pip_conf)
    assert dict(written["global"]) == {"timeout": "60", "cert": str(bundle), "find-links": str(wheels)}
    assert (pip_conf.stat().st_mode & 0o777) == 0o600

    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    volumes = {target: source for source, target in images.pip_build_volumes(tmp_path / "again")}
    written = configparser.ConfigParser()
    written.read(volumes["/root"] / ".config" / "pip" / "pip.conf")
    assert "find-links" not in written["global"]
