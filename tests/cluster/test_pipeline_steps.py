"""The CI pipeline's own steps, taken from azure-pipelines.yml and run against the local stack:
build-push.sh builds Dockerfile.app with buildah and pushes it to the local registry (instead of ACR),
set-image.sh pins the ModelApp to the pushed digest and waits, and the operator rolls the
Deployment to it. Then `modelapp wait` on a rollout whose pods never become ready."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from azure.storage.blob import ContainerClient
from modelapp_localstack import Azurite, Buildah, KubeCluster, Registry, images
from modelapp_localstack.operator import OperatorProcess, create_tenant_namespace

from tests.cluster.helpers import StartOperator

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]
PIPELINE = REPO_ROOT / "azure-pipelines.yml"
PREFIX = f"pipe-{uuid.uuid4().hex[:5]}"
MACRO = re.compile(r"\$\(([A-Za-z_.]+)\)")
OUTPUT_VARIABLE = re.compile(r"^##vso\[task\.setvariable variable=(\w+);isOutput=true\](.*)$", re.MULTILINE)


@dataclass
class Step:
    command: str
    env: dict[str, str]


def pipeline_step(name: str) -> Step:
    pipeline = yaml.safe_load(PIPELINE.read_text())
    for stage in pipeline["stages"]:
        for job in stage["jobs"]:
            for step in job["steps"]:
                if step.get("name") == name:
                    command = step.get("script") or step["inputs"]["inlineScript"]
                    return Step(str(command), {k: str(v) for k, v in (step.get("env") or {}).items()})
    raise AssertionError(f"azure-pipelines.yml has no step named {name}")


def run_step(
    step: Step, variables: dict[str, str | None], extra_env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run a step as the agent would: its `$(variable)` macros expanded, its env set. A variable
    mapped to None is Azure-only (ACR login, AKS credentials): the env entry is left out locally."""
    env = {**os.environ, "PATH": f"{REPO_ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", **extra_env}
    for key, value in step.env.items():
        names = MACRO.findall(value)
        unknown = [n for n in names if n not in variables]
        assert not unknown, f"step env {key} uses pipeline variables the test does not know: {unknown}"
        if any(variables[n] is None for n in names):
            continue
        env[key] = MACRO.sub(lambda m: str(variables[m.group(1)]), value)
    return subprocess.run(
        ["bash", "-c", step.command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def operator(start_operator: StartOperator) -> OperatorProcess:
    return start_operator(f"{PREFIX}-*")


@dataclass
class App:
    namespace: str
    name: str
    path: str  # repository path in the registry
    repository: str
    digest: str  # the image it runs before the pipeline


@pytest.fixture
def app(
    kube: KubeCluster, registry: Registry, azurite: Azurite, models: ContainerClient, operator: OperatorProcess
) -> Iterator[App]:
    namespace = f"{PREFIX}-{uuid.uuid4().hex[:5]}"
    create_tenant_namespace(kube, namespace, registry, azurite)
    content = f"model for {namespace}".encode()
    models.get_blob_client(f"{namespace}/model.onnx").upload_blob(
        content, overwrite=True, metadata={"sha256": hashlib.sha256(content).hexdigest(), "format": "onnx"}
    )
    path = f"ci/{namespace}"
    digest = registry.push_random_image(path, "previous")
    body = {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": "iris", "namespace": namespace},
        "spec": {
            "image": {"repository": f"{registry.host}/{path}", "tag": "previous", "pullSecretName": "regcred"},
            "model": {
                "blob": {"accountUrl": azurite.blob_endpoint, "container": "models", "name": f"{namespace}/model.onnx"},
                "credentials": {"secretRef": {"name": "storage"}},
            },
            "replicas": 2,
            "rollout": {"maxSurge": 1, "maxUnavailable": 0, "progressDeadlineSeconds": 30},
        },
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    created = App(namespace, "iris", path, f"{registry.host}/{path}", digest)
    wait = modelapp_wait(kube, created, digest=None, timeout=120)
    assert wait.returncode == 0, f"{wait.stderr}\n--- operator ---\n{operator.log_tail()}"
    yield created
    kube.kubectl("delete", "namespace", namespace, "--wait=false")


def modelapp_wait(kube: KubeCluster, app: App, digest: str | None, timeout: float) -> subprocess.CompletedProcess[str]:
    argv = ["wait", app.name, "-n", app.namespace, "--timeout", str(timeout), "--interval", "0.5", "--no-progress"]
    if digest:
        argv += ["--digest", digest]
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}
    return subprocess.run(
        [sys.executable, "-m", "modelapp_operator.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        check=False,
    )


def deployment_image(kube: KubeCluster, app: App) -> str:
    deployment = json.loads(kube.kubectl("get", "deployment", app.name, "-n", app.namespace, "-o", "json").stdout)
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def build_push_env(tmp_path: Path, registry: Registry) -> dict[str, str]:
    """What the agent has from `az acr login` and its own storage, for the local registry."""
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_bytes(registry.ca_file.read_bytes())
    auth = tmp_path / "auth.json"
    auth.write_text(registry.dockerconfigjson())
    storage = tmp_path / "buildah"
    return {
        "BUILDAH_OPTIONS": f"--root={storage / 'root'} --runroot={storage / 'runroot'} --storage-driver=vfs",
        "REGISTRY_AUTH_FILE": str(auth),
        "REGISTRY_CERT_DIR": str(certs),
    }


@pytest.mark.timeout(2400)  # a cold build of Dockerfile.app installs the app's wheels
def test_pipeline_builds_pushes_and_pins_the_digest_and_the_operator_rolls_it(
    kube: KubeCluster, registry: Registry, app: App, operator: OperatorProcess, tmp_path: Path
) -> None:
    # Exactly the pipeline's Dockerfile.app, built by its own script. The one difference from CI: no base image
    # can be pulled here, so BASE_IMAGE is the stack's Debian base (modelapp_localstack/images.py), loaded into the
    # step's buildah storage, and the machine's CA bundle and pip settings reach pip as read-only build volumes.
    build = pipeline_step("build")
    assert build.env.get("DOCKERFILE") == "Dockerfile.app" and "BUILD_CONTEXT" not in build.env
    base = images.base_image()
    images.load_image(Buildah(tmp_path), base)  # storage tmp_path/buildah, as BUILDAH_OPTIONS below
    volumes = images.pip_build_volumes(tmp_path / "pip")
    build_options = ["--pull=never", *(f"--volume={source}:{target}:ro" for source, target in volumes)]
    started = time.monotonic()
    result = run_step(
        build,
        {
            "imageRepository": app.repository,
            "Build.BuildId": "4711",
            "acrName": None,
            "Build.ArtifactStagingDirectory": str(tmp_path),
        },
        {**build_push_env(tmp_path, registry), "BASE_IMAGE": base.name, "BUILD_OPTIONS": " ".join(build_options)},
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs = dict(OUTPUT_VARIABLE.findall(result.stdout))
    digest = outputs["imageDigest"]
    assert digest == (tmp_path / "image-digest.txt").read_text().strip()
    assert digest == registry.resolve(app.path, "4711"), "the digest is the pushed tag's manifest"
    assert digest != app.digest
    built = time.monotonic() - started

    set_image = pipeline_step("set_image")
    result = run_step(
        set_image,
        {
            "appName": app.name,
            "namespace": app.namespace,
            "imageDigest": digest,
            "imageRepository": app.repository,
            "resourceGroup": None,
            "aksName": None,
        },
        {"KUBECONFIG": str(kube.kubeconfig)},
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- operator ---\n{operator.log_tail()}"
    patched, waited = (json.loads(part) for part in re.split(r"(?m)^(?=\{)", result.stdout) if part.strip())
    assert patched["image"]["digest"] == digest
    assert waited["state"] == "Ready" and waited["status"]["image"]["digest"] == digest
    assert deployment_image(kube, app) == f"{app.repository}@{digest}"
    print(f"build+push {built:.1f}s, set-image+rollout {time.monotonic() - started - built:.1f}s")


@contextlib.contextmanager
def pods_never_ready(kube: KubeCluster, image: str) -> Iterator[None]:
    """kwok's pod-ready stage skips pods running `image`: an app that never passes its readiness probe."""
    expression = {
        "key": '.spec.containers.[] | select( .name == "app" ) | .image',
        "operator": "NotIn",
        "values": [image],
    }

    def update(change: Any) -> None:
        stage = json.loads(kube.kubectl("get", "stage", "pod-ready", "-o", "json").stdout)
        expressions = stage["spec"]["selector"]["matchExpressions"]
        stage["spec"]["selector"]["matchExpressions"] = change(expressions)
        kube.kubectl("replace", "-f", "-", input=json.dumps(stage))

    update(lambda expressions: [*expressions, expression])
    try:
        yield
    finally:
        update(lambda expressions: [e for e in expressions if e != expression])


def test_wait_fails_with_the_reason_when_the_new_pods_never_become_ready(
    kube: KubeCluster, registry: Registry, app: App, operator: OperatorProcess
) -> None:
    bad = registry.push_random_image(app.path, "broken")
    with pods_never_ready(kube, f"{app.repository}@{bad}"):
        patch = subprocess.run(
            [
                sys.executable,
                "-m",
                "modelapp_operator.cli",
                "set-image",
                app.name,
                "-n",
                app.namespace,
                "--digest",
                bad,
            ],
            env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
            capture_output=True,
            text=True,
            check=False,
        )
        assert patch.returncode == 0, patch.stderr
        started = time.monotonic()
        result = modelapp_wait(kube, app, bad, timeout=180)
        elapsed = time.monotonic() - started
    assert result.returncode == 6, f"{result.stderr}\n--- operator ---\n{operator.log_tail()}"
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"modelapp: modelapp {app.namespace}/iris: rollout failed: ")
    assert re.search(r"rollout failed: (ProgressDeadlineExceeded|RolledBack): ", line), line
    assert elapsed < 170, "wait must stop at the failure, not at its timeout"


def test_wait_reports_an_automatic_rollback(
    kube: KubeCluster, registry: Registry, app: App, operator: OperatorProcess
) -> None:
    bad = registry.push_random_image(app.path, "broken")
    with pods_never_ready(kube, f"{app.repository}@{bad}"):
        env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig)}
        cli = [sys.executable, "-m", "modelapp_operator.cli"]
        subprocess.run([*cli, "set-image", app.name, "-n", app.namespace, "--digest", bad], env=env, check=True)
        result = modelapp_wait(kube, app, bad, timeout=180)
        assert result.returncode == 6, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert f"rollout failed: RolledBack: rollout of revision 2 (image {bad[7:19]} " in line, line
        assert f"rolled back to revision 3 (image {app.digest[7:19]} " in line, line
        # The operator put the last Ready pair back.
        deadline = time.monotonic() + 60
        while deployment_image(kube, app) != f"{app.repository}@{app.digest}" and time.monotonic() < deadline:
            time.sleep(1)
        assert deployment_image(kube, app) == f"{app.repository}@{app.digest}"


PARAMETER = re.compile(r"\$\{\{\s*(lower\()?parameters\.(\w+)\)?\s*\}\}")


def model_pipeline_publish_step(parameters: dict[str, Any]) -> Step:
    """The `publish` step of azure-pipelines-model.yml with its template expressions expanded."""
    pipeline = yaml.safe_load((REPO_ROOT / "azure-pipelines-model.yml").read_text())
    steps = [s for stage in pipeline["stages"] for job in stage["jobs"] for s in job["steps"]]
    (step,) = [s for s in steps if isinstance(s, dict) and s.get("name") == "publish"]
    env: dict[str, str] = {}
    for key, value in step["env"].items():
        if key.startswith("${{ if parameters."):
            if parameters[key.removeprefix("${{ if parameters.").removesuffix(" }}")]:
                env.update(value)
            continue
        env[key] = value

    def expand(match: re.Match[str]) -> str:
        value = parameters[match.group(2)]
        return str(value).lower() if match.group(1) else str(value)

    return Step(str(step["inputs"]["inlineScript"]), {k: PARAMETER.sub(expand, str(v)) for k, v in env.items()})


def test_model_pipeline_publishes_and_pins_and_the_operator_rolls_it(
    kube: KubeCluster, azurite: Azurite, app: App, operator: OperatorProcess, tmp_path: Path
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"retrained model for " + app.namespace.encode())
    step = model_pipeline_publish_step(
        {"modelFile": str(model), "blob": f"{app.namespace}/model.onnx", "overwrite": True, "pinApp": True}
    )
    result = run_step(
        step,
        {
            "container": "models",
            "storageAccountUrl": None,  # locally the connection string below stands in for Entra ID
            "appName": app.name,
            "namespace": app.namespace,
            "resourceGroup": None,
            "aksName": None,
        },
        {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string, "KUBECONFIG": str(kube.kubeconfig)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = dict(OUTPUT_VARIABLE.findall(result.stdout))
    assert outputs["modelSha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    spec = json.loads(kube.kubectl("get", "modelapp", app.name, "-n", app.namespace, "-o", "json").stdout)["spec"]
    assert spec["model"]["version"] == outputs["modelVersion"]
    # `modelapp wait` wants what the spec pins: the new model version.
    waited = modelapp_wait(kube, app, None, timeout=120)
    assert waited.returncode == 0, f"{waited.stderr}\n--- operator ---\n{operator.log_tail()}"
    deployment = json.loads(kube.kubectl("get", "deployment", app.name, "-n", app.namespace, "-o", "json").stdout)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["modelapp.io/model-version"] == outputs["modelVersion"]
