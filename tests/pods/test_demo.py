"""The main job end to end (README's `Run it`): `modelapp-demo --once` on its own local stack, with
real pods answering through the Service and the operator in-cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pods

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_demo_serves_a_prediction_rolls_to_a_new_model_and_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "modelapp_localstack.demo", "--once", "--run-dir", str(run_dir)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output
    steps = re.findall(r"^\[(\d+)/(\d+)\] ", result.stdout, re.MULTILINE)
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1)) and {t for _, t in steps} == {str(len(steps))}
    assert "operator running in-cluster" in output and "on real-node-0" in result.stdout
    predictions = dict(re.findall(r"prediction \(model (v\d) (\"0x[0-9A-F]+\")\): \[", result.stdout))
    assert set(predictions) == {"v1", "v3"} and predictions["v1"] != predictions["v3"], result.stdout
    # v2 (too simple) never answered: the release gate kept it out with its figure, and v1 kept answering.
    assert re.search(r"model v2 kept out by the release gate: testSet: accuracy 0\.\d\d < 0\.90 over 150 rows",
                     result.stdout), result.stdout  # fmt: skip
    assert len(re.findall(r"prediction \(model v1 ", result.stdout)) == 2, result.stdout
    # The new pods run the new version, on the real node, and answered through the Service.
    new_pod = rf"pod iris-\S+ on real-node-0 ip 10\.244\.\d+\.\d+ ready=True model {re.escape(predictions['v3'])}"
    assert re.search(new_pod, result.stdout), result.stdout
    assert "rolled over from model v1 to v3" in result.stdout
    assert "cleaning up" in result.stdout and not run_dir.exists()
