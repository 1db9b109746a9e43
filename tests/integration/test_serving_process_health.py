"""The serving process as the kubelet sees it: liveness apart from the workers, and refusals that end it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from modelapp_contract.termination import EXIT_MODEL_REFUSED
from modelapp_localstack import Azurite
from modelapp_localstack.procs import free_port
from modelapp_serving.publish import PublishedModel, publish_model
from modelapp_serving.sample_model import write_sample_models

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def published(azurite: Azurite, tmp_path_factory: pytest.TempPathFactory) -> PublishedModel:
    directory = tmp_path_factory.mktemp("sample")
    write_sample_models(directory)
    url = f"{azurite.blob_endpoint}/models-{uuid.uuid4().hex[:12]}/iris.onnx"
    return publish_model(directory / "iris.onnx", url, connection_string=azurite.connection_string)


def serve(
    azurite: Azurite, published: PublishedModel, tmp_path: Path, **overrides: str
) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    port, liveness_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    env = {
        **os.environ,
        "MODELAPP_MODEL_URL": published.url,
        "MODELAPP_MODEL_ETAG": published.etag,
        "MODELAPP_MODEL_SHA256": published.sha256,
        "MODELAPP_MODEL_FORMAT": "onnx",
        "MODELAPP_MODEL_CONNECTION_STRING": azurite.connection_string,
        "MODELAPP_MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "MODELAPP_PORT": str(port),
        "MODELAPP_LIVENESS_PORT": str(liveness_port),
        "MODELAPP_WORKERS": "2",
        **overrides,
    }
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "modelapp_serving", "--", "--bind", f"127.0.0.1:{port}"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return server, port, liveness_port, log_path


def serve_until_refused(azurite: Azurite, published: PublishedModel, tmp_path: Path, **overrides: str) -> str:
    """Serve `published` until the server ends; check it ended refusing the model (exit 4); its log."""
    server, _, _, log_path = serve(azurite, published, tmp_path, MODELAPP_EXIT_ON_REFUSAL="true", **overrides)
    try:
        code = server.wait(timeout=90)
    finally:
        stop(server)
    log_text = log_path.read_text()
    assert code == EXIT_MODEL_REFUSED, log_text
    return log_text


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def http_status(url: str, timeout: float) -> int:
    """The HTTP status, or 0 when nothing answered within the time-out."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def wait_for(url: str, status: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while http_status(url, 2) != status:
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        time.sleep(0.2)


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.fixture
def ready_server(
    azurite: Azurite, published: PublishedModel, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    server, port, liveness_port, _ = serve(azurite, published, tmp_path)
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz", 200)
        yield server, port, liveness_port
    finally:
        stop(server)


def test_liveness_is_answered_while_every_worker_is_stuck(
    ready_server: tuple[subprocess.Popen[bytes], int, int],
) -> None:
    """Workers that answer nothing (stopped here; in a pod: a /predict burst or a starved CPU) take the
    pod out of the Service through readiness, but liveness, answered by the master, stays 200."""
    server, port, liveness_port = ready_server
    workers = worker_pids(server.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert http_status(f"http://127.0.0.1:{port}/readyz", 1.0) == 0  # the workers answer nothing
        started = time.monotonic()
        for _ in range(20):
            assert http_status(f"http://127.0.0.1:{liveness_port}/livez", 1.0) == 200
        assert time.monotonic() - started < 5
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    assert http_status(f"http://127.0.0.1:{port}/readyz", 5) == 200
    assert http_status(f"http://127.0.0.1:{liveness_port}/nothing", 2) == 404


def test_liveness_answers_from_the_start_before_the_model_is_loaded(
    azurite: Azurite, published: PublishedModel, tmp_path: Path
) -> None:
    """Slow downloads and loads are the startup probe's to time, never liveness's."""
    # A blob that is never there: the app retries the download and stays not ready, but alive.
    missing = published.url.rsplit("/", 1)[0] + "/missing.onnx"
    server, port, liveness_port, _ = serve(azurite, published, tmp_path, MODELAPP_MODEL_URL=missing)
    try:
        wait_for(f"http://127.0.0.1:{liveness_port}/livez", 200, timeout=60)
        wait_for(f"http://127.0.0.1:{port}/readyz", 503, timeout=60)
        assert http_status(f"http://127.0.0.1:{liveness_port}/livez", 2) == 200
    finally:
        stop(server)


def test_a_refused_model_ends_the_server_with_a_non_zero_exit_code(
    azurite: Azurite, published: PublishedModel, tmp_path: Path
) -> None:
    log_text = serve_until_refused(azurite, published, tmp_path, MODELAPP_MODEL_SHA256="0" * 64)
    assert "expected " + "0" * 64 in log_text


def test_bytes_that_are_not_a_model_end_the_server_with_the_runtimes_reason(azurite: Azurite, tmp_path: Path) -> None:
    source = tmp_path / "not-a-model.onnx"
    source.write_bytes(b"these bytes are not an ONNX graph\n" * 100)
    url = f"{azurite.blob_endpoint}/models-{uuid.uuid4().hex[:12]}/broken.onnx"
    broken = publish_model(source, url, connection_string=azurite.connection_string)
    log_text = serve_until_refused(azurite, broken, tmp_path)
    assert "cannot load the onnx model" in log_text
