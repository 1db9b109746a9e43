"""The CLI's conveniences: `-o yaml` (the same content as `-o json`), the rollback's storage pre-check ending
as documented (exit 9, "nothing changed", what to give) whatever fails, `--use-modelapp-secret`, shell
completion scripts and the `kubectl-modelapp` entry point. The Kubernetes API is a stubbed KubeClient."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError
from azure.storage.blob import BlobClient
from modelapp_operator.cli import commands as cli
from modelapp_operator.cli import storage
from modelapp_operator.cli.kube import Connection, KubeApiError, KubeClient
from modelapp_operator.cli.main import completion_script, main, program_name

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64
V1, V2 = '"0x8DC000000000001"', '"0x8DC000000000002"'
SNAP = "2026-01-01T11:00:00.1234567Z"
HTTP_URL = "http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx"
HTTPS_URL = "https://acct.blob.core.windows.net/models/iris.onnx"
CONNECTION_STRING = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
)


def modelapp(url: str = HTTP_URL, *, with_secret: bool = True) -> dict[str, Any]:
    credentials = {"secretRef": {"name": "iris-storage"}} if with_secret else {"serviceAccountName": "iris"}
    entry = {"modelUrl": url, "modelSha256": "1" * 64, "outcome": "Ready", "reason": "Available"}
    return {
        "apiVersion": "modelapp.io/v1alpha1",
        "kind": "ModelApp",
        "metadata": {"name": "iris", "namespace": "ml", "generation": 4},
        "spec": {
            "image": {"repository": "127.0.0.1:5000/iris", "digest": NEW},
            "model": {"blob": {"accountUrl": url.rsplit("/", 2)[0]}, "credentials": credentials},
        },
        "status": {
            "observedGeneration": 4,
            "image": {"digest": NEW, "reference": f"127.0.0.1:5000/iris@{NEW}"},
            "model": {"version": V2, "sha256": "2" * 64, "format": "onnx", "url": url},
            "replicas": 2,
            "readyReplicas": 2,
            "updatedReplicas": 2,
            "replicaSummary": "2/2",
            "conditions": [{"type": "Ready", "status": "True", "reason": "Available", "observedGeneration": 4}],
            "history": [
                {**entry, "revision": 2, "imageDigest": NEW, "modelVersion": V2, "startedAt": "2026-01-02T00:00:00Z"},
                {
                    **entry,
                    "revision": 1,
                    "imageDigest": OLD,
                    "modelVersion": V1,
                    "modelSnapshot": SNAP,
                    "startedAt": "2026-01-01T00:00:00Z",
                },
            ],
        },
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies `application/merge-patch+json`."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


class StubKube(KubeClient):
    """The CLI's own client with `request` answered from memory: ModelApps, Secrets, access reviews."""

    def __init__(self, objects: dict[str, Any], *, may_read_secrets: bool = True) -> None:
        super().__init__(Connection("https://kube.invalid", "ml", None, None))
        self.objects = objects
        self.may_read_secrets = may_read_secrets
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        self.calls.append((method, path, body))
        if path.endswith("/selfsubjectaccessreviews"):
            return {"status": {"allowed": self.may_read_secrets}}
        if method == "PATCH":
            patched = merge_patch(self.objects[path], body)
            patched["metadata"]["generation"] += 1
            return patched
        if path not in self.objects:
            raise KubeApiError(404, "NotFound", f"{path} not found")
        answer = self.objects[path]
        if isinstance(answer, KubeApiError):
            raise answer
        return answer

    @property
    def patched(self) -> bool:
        return any(method == "PATCH" for method, _, _ in self.calls)


APP_PATH = "/apis/modelapp.io/v1alpha1/namespaces/ml/modelapps/iris"
SECRET_PATH = "/api/v1/namespaces/ml/secrets/iris-storage"


def secret(connection_string: str, key: str = "connectionString") -> dict[str, Any]:
    return {"kind": "Secret", "data": {key: base64.b64encode(connection_string.encode()).decode()}}


@pytest.fixture
def no_storage_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "MODELAPP_MODEL_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)


def use(monkeypatch: pytest.MonkeyPatch, kube: StubKube) -> StubKube:
    monkeypatch.setattr(cli, "connect", lambda args: (kube, "ml"))
    return kube


def run(capsys: pytest.CaptureFixture[str], *argv: str, prog: str | None = None) -> tuple[int, str, str]:
    try:
        code = main(list(argv), prog=prog)
    except SystemExit as exit_:  # argparse: --help and usage errors
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# --- -o yaml -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "iris"],
        ["wait", "iris", "--timeout", "5", "--no-progress"],
        ["set-image", "iris", "--digest", OLD],
        ["set-model", "iris", "--follow"],
        ["rollback", "iris", "--no-model-check"],
    ],
)
def test_yaml_output_has_the_same_content_as_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    documents = []
    for output in ("json", "yaml"):
        use(monkeypatch, StubKube({APP_PATH: modelapp()}))
        code, out, err = run(capsys, *argv, "-o", output)
        assert code == cli.EXIT_OK, err
        documents.append(json.loads(out) if output == "json" else yaml.safe_load(out))
    as_json, as_yaml = documents
    if "elapsedSeconds" in as_json:  # wait: the only value that differs between two runs
        as_json["elapsedSeconds"] = as_yaml["elapsedSeconds"] = 0
    assert as_yaml == as_json and as_json


def test_yaml_keeps_strings_that_look_like_other_types() -> None:
    document = {"version": '"0x8DC0"', "at": "2026-01-01T00:00:00Z", "flag": "true", "n": "3", "none": None}
    assert yaml.safe_load(cli.structured(document, "yaml")) == document == json.loads(cli.structured(document, "json"))


def test_publish_model_prints_yaml(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_storage_env: None
) -> None:
    from modelapp_serving import publish

    published = publish.PublishedModel('"0x1"', "d" * 64, 3, "http://x/models/iris.onnx", "onnx", True)
    monkeypatch.setattr(publish, "publish_model", lambda *args, **kwargs: published)
    where = ["--connection-string", "cs", "--container", "models", "--blob", "iris.onnx"]
    code, out, _ = run(capsys, "publish-model", "m.onnx", *where, "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["etag"] == '"0x1"'


# --- rollback: the storage pre-check ends as documented ---------------------------------------------


def test_rollback_without_credentials_over_http_exits_9_with_what_to_give(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_storage_env: None
) -> None:
    """The user's report: no storage credentials in the shell, the emulator over http. The storage SDK
    would refuse DefaultAzureCredential there with a ValueError; the check says so before any request."""
    import azure.identity

    def no_token_credential(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no token credential may be made for an http account")

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", no_token_credential)
    kube = use(monkeypatch, StubKube({APP_PATH: modelapp()}, may_read_secrets=False))
    code, out, err = run(capsys, "rollback", "iris")
    assert code == cli.EXIT_STORAGE_UNREACHABLE == 9, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and not out
    assert lines[0].startswith("modelapp: modelapp ml/iris: nothing changed: cannot check that revision 1's model")
    assert "reached over http" in lines[0] and "needs a connection string" in lines[0]
    assert "Give --connection-string (or $AZURE_STORAGE_CONNECTION_STRING)" in lines[0]
    assert "--no-model-check" in lines[0]
    assert "--use-modelapp-secret" not in lines[0]  # the user may not read the Secret: not offered
    assert "Storage Blob Data Reader" not in lines[0]  # Entra ID is no way over http
    assert "Token credential" not in lines[0]
    assert not kube.patched


def test_rollback_offers_the_modelapps_secret_only_to_whoever_may_read_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_storage_env: None
) -> None:
    kube = use(monkeypatch, StubKube({APP_PATH: modelapp()}, may_read_secrets=True))
    code, _, err = run(capsys, "rollback", "iris")
    assert code == 9
    assert "--use-modelapp-secret (the ModelApp's own Secret ml/iris-storage, which you may read)" in err
    review = next(body for method, path, body in kube.calls if path.endswith("/selfsubjectaccessreviews"))
    assert review["spec"]["resourceAttributes"] == {
        "verb": "get",
        "resource": "secrets",
        "namespace": "ml",
        "name": "iris-storage",
    }
    assert not kube.patched


def test_rollback_over_https_also_names_entra_id(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_storage_env: None
) -> None:
    def no_credentials(self: Any) -> Any:
        raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")

    monkeypatch.setattr(BlobClient, "get_blob_properties", no_credentials)
    kube = use(monkeypatch, StubKube({APP_PATH: modelapp(HTTPS_URL, with_secret=False)}))
    code, _, err = run(capsys, "rollback", "iris")
    assert code == 9 and "no usable storage credentials" in err and "nothing changed" in err
    assert "Entra ID credentials with Storage Blob Data Reader" in err
    assert "--use-modelapp-secret" not in err  # workload identity: no Secret to offer
    assert not kube.patched


def _raise(error: BaseException) -> Any:
    def get_blob_properties(self: Any, **kwargs: Any) -> Any:
        raise error

    return get_blob_properties


def _forbidden() -> HttpResponseError:
    error = HttpResponseError("This request is not authorized to perform this operation.")
    error.status_code = 403
    return error


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (ServiceRequestError("Connection refused"), "cannot be reached: Connection refused"),
        (_forbidden(), "storage refused the read"),
        (ClientAuthenticationError("Server failed to authenticate the request"), "no usable storage credentials"),
        (ValueError("Token credential is only supported with HTTPS."), "the storage client refused the settings"),
        (RuntimeError("something else"), "RuntimeError: something else"),
    ],
)
def test_every_storage_failure_exits_9_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, error: BaseException, says: str
) -> None:
    monkeypatch.setattr(BlobClient, "get_blob_properties", _raise(error))
    kube = use(monkeypatch, StubKube({APP_PATH: modelapp()}))
    code, _, err = run(capsys, "rollback", "iris", "--connection-string", CONNECTION_STRING)
    assert code == 9, err
    assert "nothing changed" in err and says in err and "Give --connection-string" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not kube.patched


def test_a_malformed_connection_string_exits_9_not_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kube = use(monkeypatch, StubKube({APP_PATH: modelapp()}))
    code, _, err = run(capsys, "rollback", "iris", "--connection-string", "nonsense")
    assert code == 9 and "refused the settings: Connection string is either blank or malformed" in err
    assert not kube.patched


def test_a_gone_snapshot_still_exits_8(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.core.exceptions import ResourceNotFoundError

    monkeypatch.setattr(BlobClient, "get_blob_properties", _raise(ResourceNotFoundError("gone")))
    kube = use(monkeypatch, StubKube({APP_PATH: modelapp()}))
    code, _, err = run(capsys, "rollback", "iris", "--connection-string", CONNECTION_STRING)
    assert code == cli.EXIT_MODEL_GONE and f"snapshot {SNAP}" in err and "nothing changed" in err
    assert not kube.patched


# --- --use-modelapp-secret ---------------------------------------------------------------------


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str | None]]]:
    """pinned_etag replaced: records (snapshot, connection string) and finds the entry's version."""
    seen: list[tuple[str, str | None]] = []

    def pinned_etag(check: Any, connection_string: str | None, **kwargs: Any) -> str:
        seen.append((check.pin.snapshot, connection_string))
        return str(check.version)

    monkeypatch.setattr(storage, "pinned_etag", pinned_etag)
    yield seen


def test_use_modelapp_secret_checks_with_the_secrets_connection_string(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_storage_env: None,
    checked: list[tuple[str, str | None]],
) -> None:
    kube = use(monkeypatch, StubKube({APP_PATH: modelapp(), SECRET_PATH: secret(CONNECTION_STRING + "\n")}))
    code, out, err = run(capsys, "rollback", "iris", "--use-modelapp-secret", "-o", "json")
    assert code == 0, err
    assert checked == [(SNAP, CONNECTION_STRING)]
    assert ("GET", SECRET_PATH, None) in kube.calls and kube.patched
    assert json.loads(out)["revision"] == 1


def test_use_modelapp_secret_reads_the_key_the_modelapp_names(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, checked: list[tuple[str, str | None]]
) -> None:
    app = modelapp()
    app["spec"]["model"]["credentials"]["secretRef"]["key"] = "blob"
    use(monkeypatch, StubKube({APP_PATH: app, SECRET_PATH: secret("AccountName=x;AccountKey=eQ==", key="blob")}))
    code, _, err = run(capsys, "rollback", "iris", "--use-modelapp-secret")
    assert code == 0, err
    assert checked == [(SNAP, "AccountName=x;AccountKey=eQ==")]


@pytest.mark.parametrize(
    ("app", "answer", "says"),
    [
        (modelapp(), KubeApiError(403, "Forbidden", 'secrets "iris-storage" is forbidden'), "you may not read it"),
        (modelapp(), None, "it does not exist"),
        (modelapp(), secret(CONNECTION_STRING, key="other"), "has no connection string at key 'connectionString'"),
        (modelapp(with_secret=False), None, "the ModelApp names no credentials Secret"),
    ],
)
def test_use_modelapp_secret_failures_exit_9(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    checked: list[tuple[str, str | None]],
    app: dict[str, Any],
    answer: Any,
    says: str,
) -> None:
    objects: dict[str, Any] = {APP_PATH: app}
    if answer is not None:
        objects[SECRET_PATH] = answer
    kube = use(monkeypatch, StubKube(objects))
    code, _, err = run(capsys, "rollback", "iris", "--use-modelapp-secret")
    assert code == 9, err
    assert says in err and "nothing changed" in err and "--use-modelapp-secret: " in err
    assert "Give --connection-string" in err and "or --use-modelapp-secret (" not in err  # not offered again
    assert checked == [] and not kube.patched


def test_use_modelapp_secret_and_a_connection_string_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "rollback", "iris", "--use-modelapp-secret", "--connection-string", "x")
    assert code == cli.EXIT_USAGE and "not allowed with argument" in err


# --- shell completion ------------------------------------------------------------------------------


COMMANDS = ("publish-model", "set-image", "set-model", "status", "wait", "rollback", "promote", "abort", "completion")


def bash_array(script: str, name: str) -> list[str]:
    line = next(line for line in script.splitlines() if line.startswith(f"{name}=("))
    return shlex.split(line.removeprefix(f"{name}=(").removesuffix(")"))


def test_bash_completion_script(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "completion", "bash")
    assert code == 0 and out.strip() == completion_script("bash").strip()
    assert "-F _shtab_modelapp modelapp" in out.splitlines()[-1]
    assert bash_array(out, "_shtab_modelapp_subparsers") == list(COMMANDS)  # not the hidden name lister
    assert bash_array(out, "_shtab_modelapp_status__o_choices") == ["text", "json", "yaml"]
    assert "_shtab_modelapp_rollback_pos_0_COMPGEN=_modelapp_names" in out
    assert "--use-modelapp-secret" in out
    assert "__modelapp-names" in out.split("_modelapp_names() {", 1)[1]  # only the name lister calls it
    syntax = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True, check=False)
    assert syntax.returncode == 0, syntax.stderr


def test_zsh_completion_script(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "completion", "zsh")
    assert code == 0 and out.startswith("#compdef modelapp")
    for command in COMMANDS:
        assert f"{command}:" in out
    assert '":ModelApp name:_modelapp_names"' in out
    assert "(text json yaml)" in out
    assert "modelapp __modelapp-names ${words[1,CURRENT-1]}" in out
    assert "'__modelapp-names:" not in out


def test_bash_completion_completes_commands_choices_and_names(tmp_path: Path) -> None:
    """The generated script in a real bash: COMP_WORDS as bash sets them, the CLI itself stood in for
    by a script that records the words it is given and lists two ModelApps."""
    script = tmp_path / "modelapp.bash"
    script.write_text(completion_script("bash"))
    stand_in = tmp_path / "modelapp"
    stand_in.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\nprintf "iris\\nwine\\n"\n')
    stand_in.chmod(0o755)
    program = f"""
source {script}
complete_words() {{
  COMP_WORDS=("$@"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMPREPLY=()
  _shtab_modelapp
  local IFS=,; echo "${{COMPREPLY[*]}}"
}}
complete_words {stand_in} st
complete_words {stand_in} status -o ''
complete_words {stand_in} rollback --use
complete_words {stand_in} completion ''
complete_words {stand_in} status -n ml i
"""
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["status", "text,json,yaml", "--use-modelapp-secret", "bash,zsh", "iris"]
    assert (tmp_path / "args").read_text().split() == ["__modelapp-names", "status", "-n", "ml"]


def test_the_hidden_name_lister_uses_the_namespace_on_the_command_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
                "current-context": "x",
            }
        )
    )
    listings = {
        "/apis/modelapp.io/v1alpha1/namespaces/ml/modelapps": {
            "items": [{"metadata": {"name": "wine"}}, {"metadata": {"name": "iris"}}]
        }
    }

    class Listing(StubKube):
        def __init__(self, connection: Connection, *, timeout_seconds: float) -> None:
            super().__init__(listings)
            assert connection.server == "http://127.0.0.1:1" and timeout_seconds <= 5

    # The package exports the function `main` under the module's name: patch the module itself.
    monkeypatch.setattr(sys.modules["modelapp_operator.cli.main"], "KubeClient", Listing)
    words = ["rollback", "--kubeconfig", str(config), "-n", "ml", "--to-revision", "2"]
    code, out, err = run(capsys, "__modelapp-names", *words)
    assert (code, out.split(), err) == (0, ["iris", "wine"], "")
    # Not listable (here: the context's namespace has no listing): nothing, and no error for the shell.
    code, out, err = run(capsys, "__modelapp-names", "status", "--kubeconfig", str(config))
    assert (code, out.strip(), err) == (0, "", "")


def test_the_hidden_name_lister_is_not_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "__modelapp-names" not in out and "completion" in out


# --- kubectl-modelapp ----------------------------------------------------------------------------


def test_kubectl_modelapp_is_installed_beside_modelapp() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-modelapp"] == scripts["modelapp"] == "modelapp_operator.cli:main"


@pytest.mark.parametrize(
    ("argv0", "prog"),
    [
        ("/home/u/.krew/bin/kubectl-modelapp", "kubectl modelapp"),
        ("kubectl-modelapp.exe", "kubectl modelapp"),
        ("/usr/local/bin/modelapp", "modelapp"),
        ("/x/modelapp_operator/cli/__main__.py", "modelapp"),
    ],
)
def test_the_program_name_follows_how_it_was_invoked(argv0: str, prog: str) -> None:
    assert program_name(argv0) == prog


def test_as_a_kubectl_plugin_help_and_messages_say_kubectl_modelapp(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/kubectl-modelapp"])
    code, out, _ = run(capsys, "status", "--help")
    assert code == 0 and out.startswith("usage: kubectl modelapp status")
    assert "kubectl modelapp status iris -n ml -o yaml" in out
    code, _, err = run(capsys, "status", "iris", "--kubeconfig", str(tmp_path / "nope"))
    assert code == cli.EXIT_UNREACHABLE and err.startswith("kubectl modelapp: kubeconfig ")
    code, _, err = run(capsys, "status")
    assert code == cli.EXIT_USAGE and "kubectl modelapp status: error: " in err


def test_the_installed_kubectl_modelapp_runs(tmp_path: Path) -> None:
    executable = Path(sys.executable).parent / "kubectl-modelapp"
    assert executable.exists(), "reinstall the project (deploy/local/setup.sh) to get the kubectl-modelapp script"
    result = subprocess.run(
        [str(executable), "status", "iris", "--kubeconfig", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == cli.EXIT_UNREACHABLE
    assert result.stderr.startswith("kubectl modelapp: kubeconfig "), result.stderr
