"""The pure helpers of bench/pod_start.py and bench/app_start.py: log timestamps, the start-up split, and the
app_start levers still found in the code they undo (a lever renamed or moved must update the benchmark)."""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    # bench/ is not a package: load the script by path (registered first, as dataclasses need).
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pod_start = _load("pod_start")
app_start = _load("app_start")


def test_containerd_log_stamps_keep_their_nanoseconds() -> None:
    whole = datetime(2026, 12, 2, 18, 40, 1, tzinfo=UTC).timestamp()
    assert pod_start._stamp("2026-12-02T18:40:01.123456789Z") == pytest.approx(whole + 0.123456789)
    assert pod_start._stamp("2026-12-02T18:40:01Z") == whole


def test_the_split_adds_up_to_create_to_ready() -> None:
    seen = pod_start.PodSeen("plain", created=100.0, scheduled=100.2, ready=102.5)
    logs = {"first_line": 100.9, "booted": 101.6, "model_ready": 102.0, "download_verify_s": 0.04, "load_s": 0.01}
    split = pod_start.split(seen, logs)
    assert split["create_to_ready"] == pytest.approx(2.5)
    assert sum(split[stage] for stage in pod_start.STAGES) == pytest.approx(split["create_to_ready"])
    assert (split["download_verify"], split["load"]) == (0.04, 0.01)


def test_a_server_without_workers_splits_into_container_start_and_to_ready() -> None:
    seen = pod_start.PodSeen("bare", created=0.0, scheduled=0.1, ready=1.0)
    split = pod_start.split(seen, {"first_line": 0.6})
    assert (split["workers_booted"], split["model_ready"], split["to_ready"]) == (0.0, 0.0, pytest.approx(0.4))


def test_every_app_start_lever_is_still_in_the_code_it_undoes(tmp_path: Path) -> None:
    variants = app_start.make_variants(tmp_path)
    assert list(variants) == ["all", "-lazy-id", "-preimport", "-inprocess"]
    before = (variants["-inprocess"] / "modelapp_serving" / "__main__.py").read_text()
    assert "os.execv(" in before and "import os\n" in before
