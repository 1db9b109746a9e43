"""azure-pipelines.yml and azure-pipelines-model.yml: stages, jobs and steps, each step a thin call of
a project command, the image tagged with the build id, and set-image fed the pushed digest."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_SCRIPT = re.compile(r"^bash (deploy/pipeline/[a-z-]+\.sh)$")
# Steps that set up the agent rather than do the project's work.
AGENT_TASKS = {"UsePythonVersion@0"}


def load(name: str) -> dict[str, Any]:
    document = yaml.safe_load((REPO_ROOT / name).read_text())
    assert isinstance(document, dict)
    return document


def jobs(pipeline: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(stage["stage"], job["job"]): job for stage in pipeline["stages"] for job in stage["jobs"]}


def flat_steps(steps: list[Any]) -> list[dict[str, Any]]:
    """Steps with template conditionals (`${{ if ... }}:` keys) expanded to their content."""
    result: list[dict[str, Any]] = []
    for step in steps:
        key = next(iter(step))
        if key.startswith("${{"):
            result += flat_steps(step[key])
        else:
            result.append(step)
    return result


def command(step: dict[str, Any]) -> str | None:
    if "script" in step:
        return str(step["script"]).strip()
    if str(step.get("task", "")).startswith("AzureCLI@"):
        return str(step["inputs"]["inlineScript"]).strip()
    return None


def step_named(pipeline: dict[str, Any], name: str) -> dict[str, Any]:
    for job in jobs(pipeline).values():
        for step in flat_steps(job["steps"]):
            if step.get("name") == name:
                return step
    raise AssertionError(f"no step named {name}")


@pytest.mark.parametrize("name", ["azure-pipelines.yml", "azure-pipelines-model.yml"])
def test_every_step_is_a_thin_call_of_a_project_command(name: str) -> None:
    pipeline = load(name)
    for (stage, job), spec in jobs(pipeline).items():
        for step in flat_steps(spec["steps"]):
            if step.get("task") in AGENT_TASKS or ("publish" in step and "artifact" in step):
                continue
            text = command(step)
            assert text is not None, f"{stage}/{job}: step {step} is neither a script nor AzureCLI@2"
            match = PIPELINE_SCRIPT.match(text)
            if match:
                script = REPO_ROOT / match.group(1)
                assert script.is_file(), f"{stage}/{job}: {script} does not exist"
                subprocess.run(["bash", "-n", str(script)], check=True)
            else:
                assert text.startswith((".venv/bin/python -m modelapp_", ".venv/bin/modelapp ")), (
                    f"{stage}/{job}: {text!r} is not a project command"
                )


def test_ci_stages_jobs_and_order() -> None:
    pipeline = load("azure-pipelines.yml")
    assert pipeline["trigger"]["branches"]["include"] == ["main"]
    assert [s["stage"] for s in pipeline["stages"]] == ["Test", "Build", "Deploy"]
    assert set(jobs(pipeline)) == {("Test", "lint_test"), ("Build", "image"), ("Deploy", "set_image")}
    stages = {s["stage"]: s for s in pipeline["stages"]}
    assert stages["Build"]["dependsOn"] == "Test" and stages["Deploy"]["dependsOn"] == "Build"
    # Pull requests are tested, never pushed or deployed.
    assert "refs/heads/main" in stages["Build"]["condition"]
    commands = [command(s) for s in flat_steps(jobs(pipeline)["Test", "lint_test"]["steps"])]
    assert "bash deploy/pipeline/lint-test.sh" in commands


def test_lint_test_script_runs_ruff_mypy_unit_tests_and_the_pipeline_validator() -> None:
    text = (REPO_ROOT / "deploy/pipeline/lint-test.sh").read_text()
    for expected in (
        "-m ruff check",
        "-m mypy",
        "-m pytest -m unit",
        "node deploy/pipeline/validate-pipeline.js azure-pipelines.yml azure-pipelines-model.yml",
    ):
        assert expected in text


def test_image_is_built_from_dockerfile_app_and_tagged_with_the_build_id() -> None:
    pipeline = load("azure-pipelines.yml")
    build = step_named(pipeline, "build")
    assert build["task"] == "AzureCLI@2" and command(build) == "bash deploy/pipeline/build-push.sh"
    env = build["env"]
    assert env["IMAGE_TAG"] == "$(Build.BuildId)"
    assert env["DOCKERFILE"] == "Dockerfile.app" and (REPO_ROOT / "Dockerfile.app").is_file()
    assert env["IMAGE_REPOSITORY"] == "$(imageRepository)" and env["ACR_NAME"] == "$(acrName)"
    script = (REPO_ROOT / "deploy/pipeline/build-push.sh").read_text()
    assert "--digestfile" in script and "task.setvariable variable=imageDigest;isOutput=true" in script
    assert "az acr login" in script and "--expose-token" in script


def test_set_image_gets_the_pushed_digest() -> None:
    pipeline = load("azure-pipelines.yml")
    deploy = next(s for s in pipeline["stages"] if s["stage"] == "Deploy")
    # stageDependencies.<stage>.<job>.outputs['<step>.<variable>']
    assert deploy["variables"]["imageDigest"] == "$[ stageDependencies.Build.image.outputs['build.imageDigest'] ]"
    set_image = step_named(pipeline, "set_image")
    assert command(set_image) == "bash deploy/pipeline/set-image.sh"
    assert set_image["env"]["IMAGE_DIGEST"] == "$(imageDigest)"
    assert {"APP_NAME", "NAMESPACE", "AKS_NAME", "AKS_RESOURCE_GROUP"} <= set(set_image["env"])
    script = (REPO_ROOT / "deploy/pipeline/set-image.sh").read_text()
    assert '"$modelapp" set-image "$APP_NAME"' in script and '--digest "$IMAGE_DIGEST"' in script
    assert '"$modelapp" wait "$APP_NAME"' in script


def test_configuration_is_in_variables_and_no_secret_is_in_the_yaml() -> None:
    for name in ("azure-pipelines.yml", "azure-pipelines-model.yml"):
        pipeline = load(name)
        assert {"azureSubscription", "resourceGroup", "aksName", "namespace"} <= set(pipeline["variables"])
        text = (REPO_ROOT / name).read_text().lower()
        for word in ("password", "accountkey", "sharedaccesssignature", "client_secret", "sig="):
            assert word not in text, f"{name} mentions {word}"
    ci = load("azure-pipelines.yml")
    assert {"acrName", "imageRepository"} <= set(ci["variables"])


def test_model_pipeline_publishes_with_the_cli() -> None:
    pipeline = load("azure-pipelines-model.yml")
    assert pipeline["trigger"] == "none"
    publish = step_named(pipeline, "publish")
    assert command(publish) == "bash deploy/pipeline/publish-model.sh"
    assert publish["env"]["STORAGE_ACCOUNT_URL"] == "$(storageAccountUrl)"
    script = (REPO_ROOT / "deploy/pipeline/publish-model.sh").read_text()
    assert '"$modelapp" publish-model "$MODEL_FILE"' in script
    assert '"$modelapp" set-model "$PIN_APP_NAME"' in script
