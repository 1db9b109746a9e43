"""The operator-app contract end to end: the Deployment the operator renders, parsed by the app's own config.

The env names, the cache folder, the user and the ports come from `modelapp_contract` on both sides; these
tests make sure what one side writes is what the other reads, and that the contract needs nothing but the
standard library (both images install it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import pytest
from modelapp_contract import container
from modelapp_contract.blob import ModelFormat, PinnedVersion
from modelapp_operator.api.modelapp_types import parse_modelapp
from modelapp_operator.plan.children import build_deployment
from modelapp_operator.plan.release import Release, ResolvedImage, ResolvedModel
from modelapp_serving.config import VARIABLES, ServerConfig, ServingConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SHA = "d" * 64
DIGEST = "sha256:" + "e" * 64
PUBLIC_KEY = "-----BEGIN PUBLIC KEY-----\nMFkw...\n-----END PUBLIC KEY-----\n"
CONNECTION_STRING = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net"
# What the kubelet puts in place of each valueFrom, as a Secret and a ConfigMap would hold it.
REFERENCED = {
    ("secretKeyRef", "storage", "connectionString"): CONNECTION_STRING,
    ("configMapKeyRef", "keys", "public.pem"): PUBLIC_KEY,
}


SHADOW_URL = "http://10.96.0.50:9000"  # the gate's candidate Service


def _app(**spec: Any) -> Any:
    model = {
        "blob": {"accountUrl": "https://acct.blob.core.windows.net", "container": "models", "name": "team a/iris.pkl"},
        "credentials": {"secretRef": {"name": "storage"}},
        "allowPickle": True,
        "signature": {"publicKey": {"configMapRef": {"name": "keys", "key": "public.pem"}}},
    }
    release = {"strategy": "Gated", "shadow": {"percent": 25, "tolerance": 0.5}}
    body = {"image": {"repository": "registry.example/team/iris", "tag": "1"}, "model": model, "port": 9000,
            "release": release, **spec}  # fmt: skip
    return parse_modelapp({"metadata": {"name": "iris", "namespace": "ml", "uid": "u"}, "spec": body})


def _release(url: str) -> Release:
    model = ResolvedModel(
        url=url,
        version='"0x8DC1"',
        sha256=SHA,
        format="pickle",
        pin=PinnedVersion(snapshot="2026-11-28T06:55:07.8510000Z"),
        verified_by="signature",
    )
    return Release(ResolvedImage("registry.example/team/iris", DIGEST), model)


def _container_env(deployment: dict[str, Any], root: Path) -> dict[str, str]:
    """The container's environment as the kubelet gives it: values, and references read from the objects; a
    Secret volume's files are written under `root` (a path in the env under its mount is moved there)."""
    pod = deployment["spec"]["template"]["spec"]
    mounts: dict[str, Path] = {}
    for volume in pod["volumes"]:
        if "secret" not in volume:
            continue
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
        folder = root / volume["name"]
        folder.mkdir()
        for item in volume["secret"]["items"]:
            (folder / item["path"]).write_text(
                REFERENCED[("secretKeyRef", volume["secret"]["secretName"], item["key"])]
            )
        mounts[mount["mountPath"]] = folder
    env: dict[str, str] = {}
    for item in pod["containers"][0]["env"]:
        if "value" in item:
            value = item["value"]
            for mount_path, folder in mounts.items():
                if value.startswith(mount_path + "/"):
                    value = str(folder / value[len(mount_path) + 1 :])
            env[item["name"]] = value
            continue
        ((kind, ref),) = item["valueFrom"].items()
        env[item["name"]] = REFERENCED[(kind, ref["name"], ref["key"])]
    return env


def test_the_app_reads_what_the_operator_renders(tmp_path: Path) -> None:
    app = _app()
    release = _release(app.spec.model.blob.url)
    deployment = build_deployment(app, release, shadow_url=SHADOW_URL)
    env = _container_env(deployment, tmp_path)
    assert CONNECTION_STRING not in env.values(), "the connection string is a file's, never the environment's"

    config = ServingConfig.from_env(env)
    assert config.model is not None
    assert (config.model.url, config.model.etag, config.model.sha256) == (release.model.url, '"0x8DC1"', SHA)
    assert config.model.format is ModelFormat.PICKLE and config.allow_pickle
    assert config.model.pin == release.model.pin
    assert config.model.location.blob == "team a/iris.pkl"
    assert config.model.signature_public_key == PUBLIC_KEY.strip().encode()
    assert config.connection_string == CONNECTION_STRING
    assert config.exit_on_refusal, "a refused model stops the container, so status can say why"
    assert config.image == f"registry.example/team/iris@{DIGEST}"
    assert config.model_name == "iris"
    assert config.shadow is not None
    assert (config.shadow.url, config.shadow.percent, config.shadow.tolerance) == (SHADOW_URL, 25, 0.5)

    pod = deployment["spec"]["template"]["spec"]
    app_container = pod["containers"][0]
    assert str(config.cache_dir) == container.CACHE_DIR
    assert {"name": "model-cache", "mountPath": str(config.cache_dir)} in app_container["volumeMounts"]
    server = ServerConfig.from_env(env)
    ports = {port["name"]: port["containerPort"] for port in app_container["ports"]}
    assert (ports["http"], ports["liveness"]) == (server.port, server.liveness_port) == (9000, 9001)
    assert pod["securityContext"]["runAsUser"] == app_container["securityContext"]["runAsUser"] == container.RUN_AS_USER


def test_every_contract_variable_is_one_the_app_knows(tmp_path: Path) -> None:
    release = _release("https://acct.blob.core.windows.net/models/iris.pkl")
    env = _container_env(build_deployment(_app(), release, shadow_url=SHADOW_URL), tmp_path)
    rendered = {name for name in env if name.startswith("MODELAPP_")}
    assert rendered <= set(container.RENDERED), "the operator renders only the contract's names"
    assert set(container.RENDERED) <= {variable.name for variable in VARIABLES}, "the app lists each in --help"
    assert set(container.RENDERED) - rendered == set(), "this ModelApp sets every optional variable"


def test_the_app_image_runs_as_the_contracts_user_with_its_cache_folder() -> None:
    dockerfile = (ROOT / "Dockerfile.app").read_text()
    uid = container.RUN_AS_USER
    assert f"USER {uid}:{uid}" in dockerfile
    assert f"{container.MODEL_CACHE_DIR}={container.CACHE_DIR}" in dockerfile
    assert f"mkdir -p {container.CACHE_DIR}" in dockerfile and f"chown {uid}:{uid} {container.CACHE_DIR}" in dockerfile


def test_the_contract_needs_only_the_standard_library() -> None:
    """Top-level imports only: signing.py imports model-signing and cryptography inside the calls that use them."""
    for path in sorted((ROOT / "contract" / "modelapp_contract").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]] if node.level == 0 else []
            else:
                continue
            for root in roots:
                assert root in sys.stdlib_module_names or root in ("__future__", "modelapp_contract"), (path, root)
