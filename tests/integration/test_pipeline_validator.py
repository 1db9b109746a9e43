"""Both pipelines pass Azure's own validator (npm azure-pipelines-language-service with the Azure Pipelines schema
that Microsoft's VS Code extension ships), and the check is real: one defect put into a real pipeline is reported.

Needs node and node_modules (deploy/local/setup.sh runs `npm ci`): their absence is a failure, not a skip."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
VALIDATOR = REPO_ROOT / "deploy/pipeline/validate-pipeline.js"
SCHEMA = REPO_ROOT / "deploy/pipeline/schema/service-schema-v1.261.1.json"
SCHEMA_SHA256 = "f00a9630f6550204148634d9a13f634b5750a225559886effe09a751482f0459"
PIPELINES = ("azure-pipelines.yml", "azure-pipelines-model.yml")


def validate(*files: Path | str) -> tuple[int, dict[str, Any]]:
    node = shutil.which("node")
    assert node is not None, "node is not on PATH (deploy/local/setup.sh needs it too)"
    assert (REPO_ROOT / "node_modules/azure-pipelines-language-service").is_dir(), (
        "node_modules has no azure-pipelines-language-service: run `npm ci` (deploy/local/setup.sh does)"
    )
    result = subprocess.run(
        [node, str(VALIDATOR), *map(str, files)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,  # exit 1 means "problems found": the report says which
    )
    assert result.returncode in (0, 1), f"validator failed ({result.returncode}): {result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, report


def test_the_vendored_schema_is_the_pinned_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    assert json.loads(SCHEMA.read_text())["$comment"] == "v1.261.1"
    assert "MIT License" in (SCHEMA.parent / "LICENSE").read_text()


def test_both_pipelines_pass_azures_validator() -> None:
    code, report = validate(*PIPELINES)
    assert report["validator"] == "azure-pipelines-language-service 0.9.2"
    assert report["schema"]["version"] == "v1.261.1"
    found = {entry["file"]: entry["diagnostics"] for entry in report["files"]}
    assert found == {name: [] for name in PIPELINES}, json.dumps(found, indent=2)
    assert code == 0


# One defect each, put into a real pipeline at an anchor line: (file, anchor, replacement, severity, message).
DEFECTS = [
    pytest.param(
        "azure-pipelines.yml",
        "            displayName: Lint and unit tests\n",
        "            displayNam: Lint and unit tests\n",
        "warning",
        "Unexpected property displayNam",
        id="unknown-key-in-a-step",
    ),
    pytest.param(
        "azure-pipelines.yml",
        "            name: build\n",
        "            name: build\n            timeoutInMinutes: soon\n",
        "warning",
        'Incorrect type. Expected "integer".',
        id="wrong-type",
    ),
    pytest.param(
        "azure-pipelines-model.yml",
        "              scriptType: bash\n",
        "",
        "warning",
        'Missing property "scriptType".',
        id="missing-task-input",
    ),
    pytest.param(
        "azure-pipelines-model.yml",
        "    type: boolean\n",
        "    type: bool\n",
        "warning",
        'String does not match the pattern of "^boolean$".',
        id="unknown-parameter-type",
    ),
    pytest.param(
        "azure-pipelines.yml",
        "      - job: image\n",
        "      - jobs: image\n",
        "error",
        "The first property must be job",
        id="misspelt-job",
    ),
]


@pytest.mark.parametrize(("name", "anchor", "replacement", "severity", "message"), DEFECTS)
def test_a_defect_in_a_real_pipeline_is_reported(
    tmp_path: Path, name: str, anchor: str, replacement: str, severity: str, message: str
) -> None:
    text = (REPO_ROOT / name).read_text()
    assert anchor in text, f"{name} no longer has the line {anchor!r}: choose another anchor"
    broken = tmp_path / name
    broken.write_text(text.replace(anchor, replacement, 1))
    code, report = validate(broken)
    diagnostics = report["files"][0]["diagnostics"]
    assert {"severity": severity, "message": message} in [
        {"severity": d["severity"], "message": d["message"]} for d in diagnostics
    ], json.dumps(diagnostics, indent=2)
    assert code == 1


def test_yaml_that_does_not_parse_is_an_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("stages:\n  - stage: A\n   jobs: [\n")
    code, report = validate(broken)
    assert code == 1
    assert any(d["severity"] == "error" for d in report["files"][0]["diagnostics"])
