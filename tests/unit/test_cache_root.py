"""Built artefacts live in the user's cache folder, shared by every clone on the machine (binaries.cache_root)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from modelapp_localstack import binaries

pytestmark = pytest.mark.unit


def test_the_cache_is_the_users_not_the_clones(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MODELAPP_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert binaries.cache_root() == tmp_path / "home" / ".cache" / "modelapp"
    assert not binaries.cache_root().is_relative_to(binaries.REPO_ROOT)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert binaries.cache_root() == tmp_path / "xdg" / "modelapp"
    monkeypatch.setenv("MODELAPP_CACHE_DIR", str(tmp_path / "explicit"))
    assert binaries.cache_root() == tmp_path / "explicit"


def test_one_build_per_cache_entry_at_a_time(tmp_path: Path) -> None:
    inside: list[str] = []
    overlapped = threading.Event()

    def build(name: str) -> None:
        with binaries.build_lock(tmp_path / "entry"):
            if inside:
                overlapped.set()
            inside.append(name)
            threading.Event().wait(0.05)
            inside.remove(name)

    threads = [threading.Thread(target=build, args=(str(n),)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlapped.is_set()
