"""The main job end to end: `python -m modelapp_localstack.demo --once` on its own local stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_demo_serves_a_prediction_rolls_to_a_new_model_and_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "modelapp_localstack.demo", "--once", "--run-dir", str(run_dir)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output
    steps = re.findall(r"^\[(\d+)/(\d+)\] ", result.stdout, re.MULTILINE)
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1)) and {t for _, t in steps} == {str(len(steps))}
    assert "FROM scratch" in result.stdout
    predictions = dict(re.findall(r"prediction \(model (v\d) (\"0x[0-9A-F]+\")\): \[", result.stdout))
    assert set(predictions) == {"v1", "v2"} and predictions["v1"] != predictions["v2"], result.stdout
    # The Deployment carries the new version and the app served with exactly that env.
    assert f"modelapp.io/model-version={predictions['v2']}" in result.stdout
    assert "rolled over from model v1 to v2" in result.stdout
    assert "cleaning up" in result.stdout and not run_dir.exists()
