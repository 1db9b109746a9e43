"""The `modelapp` command line: arguments, help, exit codes, one-line errors, kubeconfig reading,
and the wait loop (with a fake clock; the real API server is in tests/cluster/test_cli_modelapp.py)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from modelapp_localstack.procs import free_port
from modelapp_operator.cli import commands as cli
from modelapp_operator.cli.kube import KubeApiError, KubeConfigError, load_connection
from modelapp_operator.cli.main import main as cli_main
from modelapp_operator.cli.status import Verdict

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "c" * 64


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli_main(list(argv))
    except SystemExit as exit_:  # argparse exits for --help and usage errors
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def kubeconfig(tmp_path: Path, server: str, **user: Any) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
                "users": [{"name": "u", "user": user or {"token": "t0ken"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
                "current-context": "x",
            }
        )
    )
    return path


def test_help_lists_commands_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("publish-model", "set-image", "set-model", "status", "wait", "rollback"):
        assert command in out
    assert "examples:" in out and "exit codes:" in out
    assert "6    wait: the rollout failed" in out and "7    wait: not Ready" in out


@pytest.mark.parametrize("command", ["publish-model", "set-image", "set-model", "status", "wait", "rollback"])
def test_each_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "example" in out and "--namespace" in out and "--output" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["set-image", "iris"], "--digest"),
        (["set-image", "iris", "--digest", "sha256:abc"], "is not a digest"),
        (["wait", "iris", "--timeout", "-1"], "must be positive"),
        (["wait", "iris", "--digest", "latest"], "is not a digest"),
        (["status", "iris", "-o", "xml"], "invalid choice"),
        (["rollback", "iris", "--to-revision", "two"], "invalid int value"),
        (["set-model", "iris"], "one of the arguments --version --follow is required"),
        (["publish-model", "m.onnx", "--container", "models"], "--blob"),
    ],
)
def test_bad_arguments_exit_2_with_usage(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, _, err = run(capsys, *argv)
    assert code == cli.EXIT_USAGE
    assert message in err and "Traceback" not in err


def test_publish_model_needs_a_destination(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "MODELAPP_MODEL_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run(capsys, "publish-model", "m.onnx", "--container", "models", "--blob", "m.onnx")
    assert code == cli.EXIT_USAGE and "--account-url" in err


def test_publish_model_missing_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(
        capsys,
        "publish-model",
        str(tmp_path / "absent.onnx"),
        "--connection-string",
        "UseDevelopmentStorage=true",
        "--container",
        "models",
        "--blob",
        "m.onnx",
    )
    assert code == cli.EXIT_ERROR
    assert err.strip().splitlines() == [f"modelapp: publish-model: {tmp_path / 'absent.onnx'} is not a file"]


def test_missing_kubeconfig_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "status", "iris", "--kubeconfig", str(tmp_path / "nope"))
    assert code == cli.EXIT_UNREACHABLE
    assert err.strip().splitlines() == [
        f"modelapp: kubeconfig {tmp_path / 'nope'} does not exist (set --kubeconfig or KUBECONFIG)"
    ]


def test_connection_refused_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = kubeconfig(tmp_path, f"https://127.0.0.1:{free_port()}")
    for argv in (["status", "iris"], ["set-image", "iris", "--digest", DIGEST], ["wait", "iris", "--timeout", "1"]):
        code, _, err = run(capsys, *argv, "--kubeconfig", str(config))
        assert code == cli.EXIT_UNREACHABLE, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "cannot reach https://127.0.0.1:" in lines[0] and "refused" in lines[0]


def test_the_installed_entry_point_runs_without_a_traceback(tmp_path: Path) -> None:
    config = kubeconfig(tmp_path, f"https://127.0.0.1:{free_port()}")
    result = subprocess.run(
        [sys.executable, "-m", "modelapp_operator.cli", "status", "iris", "--kubeconfig", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == cli.EXIT_UNREACHABLE
    assert "Traceback" not in result.stderr and result.stderr.startswith("modelapp: ModelApp team/iris:")


def test_kubeconfig_context_namespace_token_and_inline_ca(tmp_path: Path) -> None:
    config = kubeconfig(tmp_path, "https://127.0.0.1:6443", token="abc")
    connection = load_connection(str(config))
    assert (connection.server, connection.namespace, connection.token) == ("https://127.0.0.1:6443", "team", "abc")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert load_connection(str(kubeconfig(tmp_path, "http://127.0.0.1:1", tokenFile="token"))).token == "from-file"


def test_kubeconfig_exec_plugin_supplies_the_token(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os\n"
        "assert json.loads(os.environ['KUBERNETES_EXEC_INFO'])['kind'] == 'ExecCredential'\n"
        "print(json.dumps({'status': {'token': os.environ['GREETING'] + '-token'}}))\n"
    )
    exec_spec = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": sys.executable,
        "args": [str(plugin)],
        "env": [{"name": "GREETING", "value": "hello"}],
    }
    assert load_connection(str(kubeconfig(tmp_path, "http://127.0.0.1:1", exec=exec_spec))).token == "hello-token"
    failing = {"command": sys.executable, "args": ["-c", "import sys; sys.exit('no login')"]}
    with pytest.raises(KubeConfigError, match="exited 1: no login"):
        load_connection(str(kubeconfig(tmp_path, "http://127.0.0.1:1", exec=failing)))


def test_kubeconfig_with_an_unknown_context_or_bad_ca(tmp_path: Path) -> None:
    config = kubeconfig(tmp_path, "https://127.0.0.1:6443")
    with pytest.raises(KubeConfigError, match="no context named 'other'"):
        load_connection(str(config), "other")
    document = yaml.safe_load(config.read_text())
    document["clusters"][0]["cluster"] = {
        "server": "https://127.0.0.1:6443",
        "certificate-authority-data": base64.b64encode(b"not a certificate").decode(),
    }
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(KubeConfigError, match="unusable TLS settings"):
        load_connection(str(config))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def ready_body(digest: str, ready: str = "True", reason: str = "Available") -> dict[str, Any]:
    return {
        "metadata": {"generation": 2},
        "spec": {"image": {"digest": digest}, "model": {}},
        "status": {
            "observedGeneration": 2,
            "image": {"digest": digest},
            "model": {"version": '"0x1"'},
            "conditions": [{"type": "Ready", "status": ready, "reason": reason, "observedGeneration": 2}],
        },
    }


def test_wait_for_returns_when_ready_and_retries_api_trouble() -> None:
    clock = FakeClock()
    answers: list[Any] = [
        KubeApiError(0, "Unreachable", "connection refused"),
        KubeApiError(503, "ServiceUnavailable", "etcd"),
        ready_body(DIGEST, "False", "RollingOut"),
        ready_body(DIGEST),
    ]

    def fetch() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    code, verdict = cli.wait_for(fetch, DIGEST, None, 30, interval=2, clock=clock, sleep=clock.sleep)
    assert (code, verdict.state, clock.now) == (cli.EXIT_OK, "ready", 6.0)


def test_wait_for_times_out_with_the_last_reason() -> None:
    clock = FakeClock()
    code, verdict = cli.wait_for(
        lambda: ready_body(DIGEST, "False", "RollingOut"), DIGEST, None, 5, interval=2, clock=clock, sleep=clock.sleep
    )
    assert (code, verdict.reason, clock.now) == (cli.EXIT_TIMEOUT, "RollingOut", 5.0)


def test_wait_for_stops_on_a_failure() -> None:
    clock = FakeClock()
    body = ready_body(DIGEST, "False", "ProgressDeadlineExceeded")
    body["status"]["conditions"].append(
        {"type": "Degraded", "status": "True", "reason": "ProgressDeadlineExceeded", "observedGeneration": 2}
    )
    code, verdict = cli.wait_for(lambda: body, DIGEST, None, 60, clock=clock, sleep=clock.sleep)
    assert (code, verdict) == (cli.EXIT_ROLLOUT_FAILED, Verdict("failed", "ProgressDeadlineExceeded", ""))


def test_wait_for_raises_what_retrying_cannot_fix() -> None:
    def forbidden() -> dict[str, Any]:
        raise KubeApiError(403, "Forbidden", "no")

    with pytest.raises(KubeApiError):
        cli.wait_for(forbidden, None, None, 60, sleep=lambda _: None)


def test_progress_prints_one_line_per_change_when_not_a_terminal(tmp_path: Path) -> None:
    with (tmp_path / "err").open("w+") as stream:
        progress = cli.Progress(stream)
        for text in ("waiting: RollingOut: 0/2 (1s)", "waiting: RollingOut: 0/2 (2s)", "waiting: RollingOut: 1/2 (3s)"):
            progress.update(text)
        progress.done()
        stream.seek(0)
        assert stream.read().splitlines() == ["waiting: RollingOut: 0/2 (1s)", "waiting: RollingOut: 1/2 (3s)"]


def test_json_output_of_publish_model_is_parseable(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelapp_serving import publish

    def fake_publish(path: Any, destination: Any, **kwargs: Any) -> publish.PublishedModel:
        assert destination == ("models", "iris.onnx") and kwargs["connection_string"] == "cs"
        return publish.PublishedModel('"0x1"', "d" * 64, 3, "http://x/models/iris.onnx", "onnx", True)

    monkeypatch.setattr(publish, "publish_model", fake_publish)
    code, out, _ = run(
        capsys,
        "publish-model",
        "m.onnx",
        "--connection-string",
        "cs",
        "--container",
        "models",
        "--blob",
        "iris.onnx",
        "-o",
        "json",
    )
    assert code == 0 and json.loads(out)["etag"] == '"0x1"'


def test_publish_model_without_the_serving_app_says_what_is_missing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's image holds no serving app: the one command that needs its publisher says so."""
    monkeypatch.setitem(sys.modules, "modelapp_serving.publish", None)  # importing it raises ImportError
    code, _, err = run(
        capsys, "publish-model", "m.onnx", "--connection-string", "cs", "--container", "c", "--blob", "b"
    )
    assert code == 1 and "needs the serving app's package (modelapp_serving)" in err
