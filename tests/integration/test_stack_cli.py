"""`modelapp-stack up` starts what it is asked for and cleans everything up on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_up_prints_settings_and_ctrl_c_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "modelapp_localstack", "up", "--only", "azurite,registry", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if line.startswith("export MODELAPP_STACK_REGISTRY_CA_FILE"):
            break
    exports = "".join(lines)
    assert "MODELAPP_STACK_AZURE_STORAGE_CONNECTION_STRING" in exports
    assert "MODELAPP_STACK_REGISTRY=" in exports
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True, check=False)
    child_pids = [int(pid) for pid in children.stdout.split()]
    assert child_pids, "azurite and the registry should be children of the stack"

    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "stopping" in stderr
    time.sleep(0.5)
    assert not [pid for pid in child_pids if _alive(pid)]
    assert not run_dir.exists()


def test_unknown_component_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "modelapp_localstack", "up", "--only", "kube,mysql"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown component(s) ['mysql']" in result.stderr
