"""`modelapp publish-model` against Azurite: first upload, idempotent re-publish, refusal to replace
a different model without --overwrite, the env-var connection string, and a one-line refusal."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from modelapp_localstack import Azurite

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parents[2]


def publish(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if "CONNECTION_STRING" not in k}
    return subprocess.run(
        [sys.executable, "-m", "modelapp_operator.cli", "publish-model", *argv],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )


def test_publish_model_records_sha256_and_format_and_is_idempotent(azurite: Azurite, tmp_path: Path) -> None:
    blob = f"cli-{uuid.uuid4().hex[:6]}/iris.onnx"
    model = tmp_path / "iris.onnx"
    model.write_bytes(b"model one")
    where = ["--container", "models", "--blob", blob]

    first = publish(str(model), "--connection-string", azurite.connection_string, *where, "-o", "json")
    assert first.returncode == 0, first.stderr
    published = json.loads(first.stdout)
    assert published["uploaded"] is True and published["sha256"] == hashlib.sha256(b"model one").hexdigest()
    properties = (
        BlobServiceClient.from_connection_string(azurite.connection_string)
        .get_blob_client("models", blob)
        .get_blob_properties()
    )
    assert properties.etag == published["etag"]
    assert properties.metadata == {"sha256": published["sha256"], "format": "onnx"}

    # The connection string from the environment, text output for people.
    again = publish(str(model), *where, env={"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string})
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("unchanged (the same content is already there)")
    assert published["etag"] in again.stdout

    model.write_bytes(b"model two")
    refused = publish(str(model), "--connection-string", azurite.connection_string, *where)
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert "already holds a different model" in line and "--overwrite" in line
    assert azurite.account_key not in refused.stderr

    replaced = publish(
        str(model), "--connection-string", azurite.connection_string, *where, "--overwrite", "-o", "json"
    )
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["etag"] != published["etag"]

