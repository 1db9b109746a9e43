"""Requests per second and p50/p99 latency: ModelApp against MLServer and KServe, on /predict (issue 5) and on
the Open Inference Protocol's (V2) infer endpoint (issue 21).

All three serve the same iris LogisticRegression (trained here with `modelapp_serving.sample_model`, fixed
random_state) on loopback with the same number of worker processes, and face the same load generator
(wrk with `bench/serving/post.lua`). Rounds are interleaved (A, B, C, A, B, C, ...) so that drift in the
machine's background load hits every server alike; the table shows per-server medians.

    .venv/bin/python bench/serving_rps.py            # about 4 minutes once the peer venvs exist

The peers run from their own virtualenvs under bench/out/venvs/ (git-ignored), built on first use from the
pinned `bench/serving/requirements-*.txt`. Every server process is stopped on exit, Ctrl-C included.
The table goes to stdout and to bench/out/serving_rps.md; the figures to bench/out/serving_rps.json and the
latency distributions (one curve per server, the round with the median req/s) to bench/out/serving_rps.png.

Like for like (--runtimes, default both): for each runtime, ModelApp and KServe serve the same estimator with
the same runtime: `sklearn` (ModelApp the skops file, KServe the joblib file; both call the estimator's
predict) and `onnx` (both run the same iris.onnx through onnxruntime with the same session options).
MLServer (scikit-learn, V2 protocol) is the third peer in both comparisons.

Like for like by protocol too (--protocols, default both): `v1` measures ModelApp's `POST /predict` and KServe's
V1 `:predict` (the same bytes); `v2` measures ModelApp's, KServe's and MLServer's `POST /v2/models/iris/infer`
with one and the same V2 body. MLServer speaks only V2: it is a peer of both.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import joblib  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_SOURCE_ROOT = REPO_ROOT / "app"
# bench/ is not a package and app/ is a source root: importable whether or not the project is installed.
if str(APP_SOURCE_ROOT) not in sys.path:
    sys.path.insert(0, str(APP_SOURCE_ROOT))

import modelapp_serving  # noqa: E402
from modelapp_serving import sample_model  # noqa: E402

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from bench.results import pyplot, write_json  # noqa: E402

SERVING_BENCH_DIR = REPO_ROOT / "bench" / "serving"
OUT_DIR = REPO_ROOT / "bench" / "out"
VENVS_DIR = OUT_DIR / "venvs"
RUN_DIR = OUT_DIR / "serving"
REPORT_PATH = OUT_DIR / "serving_rps.md"
WRK_SCRIPT = SERVING_BENCH_DIR / "post.lua"
KSERVE_SERVER_SCRIPT = SERVING_BENCH_DIR / "kserve_server.py"
PROJECT_VENV_BIN = Path(sys.executable).parent

LOOPBACK = "127.0.0.1"
MODEL_NAME = "iris"
SAMPLE_ROW = (5.1, 3.5, 1.4, 0.2)
READY_TIMEOUT_S = 180.0
STOP_GRACE_S = 10.0
GOAL_RATIO = 1.5

# What a client of each protocol sends for one row; KServe V1 and ModelApp take the same bytes, and every V2
# server the same V2 bytes: the input as ModelApp's metadata names it (KServe and MLServer take any name).
V1_BODY = json.dumps({"instances": [list(SAMPLE_ROW)]}).encode()
V2_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": list(SAMPLE_ROW)}]}
).encode()
PROTOCOLS = ("v1", "v2")


# --------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelFiles:
    onnx: Path
    skops: Path
    joblib: Path
    expected_prediction: Any
    """What the model answers for SAMPLE_ROW; every server must answer the same."""

    def sha256(self, path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()


def write_model_files(directory: Path) -> ModelFiles:
    """Train once; ModelApp gets ONNX (or skops), the peers the joblib file of the same estimator."""
    directory.mkdir(parents=True, exist_ok=True)
    classifier = sample_model.train_iris_classifier()
    onnx_path = sample_model.export_onnx(classifier, directory / f"{MODEL_NAME}.onnx")
    skops_path = sample_model.export_skops(classifier, directory / f"{MODEL_NAME}.skops")
    joblib_path = directory / f"{MODEL_NAME}.joblib"
    joblib.dump(classifier, joblib_path)
    expected = classifier.predict([list(SAMPLE_ROW)]).tolist()[0]
    return ModelFiles(onnx=onnx_path, skops=skops_path, joblib=joblib_path, expected_prediction=expected)


# ------------------------------------------------------------------------------------------ peer venvs


def ensure_venv(name: str, requirements: Path, log: TextIO) -> Path:
    """Build bench/out/venvs/<name> from a pinned requirements file unless it already matches; its bin/."""
    venv = VENVS_DIR / name
    marker = venv / ".requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes() + platform.python_version().encode()).hexdigest()
    python = venv / "bin" / "python"
    if python.exists() and marker.exists() and marker.read_text().strip() == digest:
        return venv / "bin"
    print(f"building {venv.relative_to(REPO_ROOT)} from {requirements.relative_to(REPO_ROOT)} ...", file=log)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(requirements)],
        check=True,
    )
    marker.write_text(digest + "\n")
    return venv / "bin"


def distribution_versions(python: Path, names: Sequence[str]) -> dict[str, str]:
    code = "import importlib.metadata as m, json, sys\nprint(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    completed = subprocess.run([str(python), "-c", code, *names], check=True, capture_output=True, text=True)
    versions: dict[str, str] = json.loads(completed.stdout)
    return versions


# ------------------------------------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and talk to it."""

    name: str
    key: str
    """Unique, file-name safe: log and body files are named after it."""
    protocol: str
    processes: str
    model_file: str
    argv: list[str]
    predict_url: str
    ready_url: str
    body: bytes
    read_prediction: Callable[[Any], Any]
    """Takes the decoded response document, returns the prediction for the single row sent."""
    env: dict[str, str] = field(default_factory=dict)
    unset_env: tuple[str, ...] = ()
    """Removed from the inherited environment (so that the server's own defaults apply)."""
    cwd: Path = REPO_ROOT
    versions: dict[str, str] = field(default_factory=dict)
    is_modelapp: bool = False
    runtime: str = "sklearn"
    """sklearn or onnx: what runs the model behind the server."""
    api: str = "v1"
    """v1 (`/predict`, KServe's `:predict`) or v2 (the Open Inference Protocol's infer): what is measured."""


@dataclass
class RunningServer:
    spec: ServerSpec
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


_PORTS_HANDED_OUT: set[int] = set()


def free_loopback_port() -> int:
    """A loopback port nothing listens on now and that this run has not handed out before."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACK, 0))
            port: int = probe.getsockname()[1]
        if port not in _PORTS_HANDED_OUT:
            _PORTS_HANDED_OUT.add(port)
            return port


class ServerFleet:
    """Starts servers in their own process groups and always stops every process of every group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.servers: list[RunningServer] = []

    def start(self, spec: ServerSpec) -> RunningServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.key}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                spec.argv,
                cwd=spec.cwd,
                env={**{k: v for k, v in os.environ.items() if k not in spec.unset_env}, **spec.env},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: one signal reaches its workers too
            )
        server = RunningServer(spec, process, log_path)
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            _signal_group(server.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for server in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        # Workers may outlive their parent: sweep every group, finished leader or not.
        for server in self.servers:
            _signal_group(server.process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.process.wait(timeout=5)
        self.servers.clear()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _http(url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"} if body is not None else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status: int = response.status
            return status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until_ready(server: RunningServer, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Poll the readiness URL until 200; the seconds it took. Fails fast if the process died."""
    started = time.monotonic()
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.spec.name} exited with {server.process.returncode} before it was ready; "
                f"log {server.log_path}:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError):
            status, _ = _http(server.spec.ready_url, timeout=2.0)
            if status == 200:
                return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(
                f"{server.spec.name} not ready after {timeout_s:.0f} s; log {server.log_path}:\n{server.log_tail()}"
            )
        time.sleep(0.25)


def check_prediction(server: RunningServer, expected: Any) -> None:
    status, body = _http(server.spec.predict_url, server.spec.body)
    if status != 200:
        raise RuntimeError(f"{server.spec.name}: POST {server.spec.predict_url} -> {status}: {body[:300]!r}")
    prediction = server.spec.read_prediction(json.loads(body))
    if prediction != expected:
        raise RuntimeError(f"{server.spec.name} predicted {prediction!r}, the model says {expected!r}")


# ---------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class LoadSettings:
    threads: int
    connections: int
    duration_s: int
    warmup_s: int
    timeout_s: int = 5

    def wrk_argv(self, url: str, body_file: Path, duration_s: int) -> list[str]:
        return [
            "wrk",
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{duration_s}s",
            f"--timeout={self.timeout_s}s",
            "-s",
            str(WRK_SCRIPT),
            url,
            "--",
            str(body_file),
        ]


@dataclass(frozen=True)
class LoadResult:
    requests: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    distribution_ms: tuple[tuple[float, float], ...] = ()
    """(percentile, latency ms) pairs, wrk's own latency histogram."""


def parse_wrk_summary(stdout: str) -> LoadResult:
    """Read the `WRK_JSON {...}` line that post.lua's done() prints."""
    for line in stdout.splitlines():
        if line.startswith("WRK_JSON "):
            summary = json.loads(line.removeprefix("WRK_JSON "))
            errors = sum(
                int(summary[key])
                for key in ("errors_connect", "errors_read", "errors_write", "errors_status", "errors_timeout")
            )
            duration_s = int(summary["duration_us"]) / 1e6
            return LoadResult(
                requests=int(summary["requests"]),
                requests_per_s=int(summary["requests"]) / duration_s if duration_s > 0 else 0.0,
                p50_ms=int(summary["latency_p50_us"]) / 1000,
                p90_ms=int(summary["latency_p90_us"]) / 1000,
                p99_ms=int(summary["latency_p99_us"]) / 1000,
                errors=errors,
                distribution_ms=tuple(
                    (float(p), int(us) / 1000) for p, us in summary.get("latency_percentiles_us", [])
                ),
            )
    raise RuntimeError(f"no WRK_JSON line in wrk's output:\n{stdout[-2000:]}")


def run_wrk(settings: LoadSettings, url: str, body_file: Path, duration_s: int) -> LoadResult:
    completed = subprocess.run(
        settings.wrk_argv(url, body_file, duration_s),
        capture_output=True,
        text=True,
        check=True,
        timeout=duration_s + settings.timeout_s + 30,
    )
    return parse_wrk_summary(completed.stdout)


# ------------------------------------------------------------------------------------------- profile

# Where a sampled stack of a ModelApp worker is, judged by the first of these frames found in it.
PROFILE_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model predict (onnxruntime / estimator)", ("OnnxModel.predict", "SklearnModel.predict")),
    ("app: parse body, build answer", ("parse_features", "predictions_body", "ServedModel.infer")),
    (
        "WSGI around the app (the /predict fast path or Flask/werkzeug, and metrics)",
        ("PredictFastPath.__call__", "Flask.__call__", "MetricsMiddleware.__call__"),
    ),
    ("gunicorn: write the response", ("Response.write", "Response.send_headers", "Response.close")),
    ("gunicorn: close the connection (close_graceful waits for the client's FIN)", ("close_graceful",)),
    ("gunicorn: parse the request", ("Parser.__next__", "Request.__init__ (gunicorn")),
    (
        "gunicorn gthread: wake the poll loop after each request (PollableMethodQueue.defer, a pipe write)",
        ("PollableMethodQueue.defer",),
    ),
    ("gunicorn: accept, poll, hand requests to threads", ("accept", "select", "enqueue_req", "_worker")),
)


IDLE_LEAF_FRAMES = ("EpollSelector.select", "_worker (concurrent/futures/thread.py", "Condition.wait", "sleep")
"""A sample whose innermost frame is one of these is a thread waiting, not working."""
IDLE_LABEL = "(waiting: idle threads blocked on events or work; not in the shares below)"


def summarize_collapsed_stacks(text: str) -> list[tuple[str, float]]:
    """Per PROFILE_CATEGORIES entry (plus "other"), its share of the busy samples in py-spy's raw output.

    py-spy also samples threads that only wait (a gthread pool is mostly that); those are counted apart,
    as a share of all samples, so the other shares say where the working time goes.
    """
    other_label = "other (gunicorn bookkeeping, master)"
    counts: dict[str, int] = {label: 0 for label, _ in PROFILE_CATEGORIES}
    counts[other_label] = 0
    idle = 0
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        leaf = stack.rsplit(";", 1)[-1]
        if leaf.startswith(IDLE_LEAF_FRAMES):
            idle += count
            continue
        for label, needles in PROFILE_CATEGORIES:
            if any(needle in stack for needle in needles):
                counts[label] += count
                break
        else:
            counts[other_label] += count
    busy = total - idle
    shares = [(IDLE_LABEL, 100.0 * idle / total if total else 0.0)]
    shares += [(label, 100.0 * n / busy if busy else 0.0) for label, n in counts.items()]
    return shares


def profile_with_py_spy(
    server: RunningServer, load: LoadSettings, body_file: Path, py_spy: Path, seconds: int
) -> tuple[LoadResult, Path, list[tuple[str, float]]]:
    """Sample every process of the server (py-spy --subprocesses) while wrk loads it."""
    output = RUN_DIR / f"py-spy-{server.spec.key}.txt"
    recorder = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(server.process.pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            "250",
            "--duration",
            str(seconds),
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        result = run_wrk(load, server.spec.predict_url, body_file, seconds)
        recorder.wait(timeout=seconds + 30)
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    text = output.read_text() if output.exists() else ""
    return result, output, summarize_collapsed_stacks(text)


# -------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ServerSummary:
    spec: ServerSpec
    rounds: list[LoadResult]

    @property
    def requests_per_s(self) -> float:
        return statistics.median(r.requests_per_s for r in self.rounds)

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.rounds)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.rounds)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.rounds)


def build_report(
    summaries: Sequence[ServerSummary],
    *,
    command: str,
    load: LoadSettings,
    rounds: int,
    model_files: ModelFiles,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    elapsed_s: float,
) -> str:
    """The markdown report: settings, one row per server, the verdict against the goal."""
    lines = [
        "# /predict and V2 infer: ModelApp vs KServe vs MLServer (issues 5 and 21)",
        "",
        f"Command: `{command}`",
        "",
        f"- Machine: {os.cpu_count()} CPUs, shared with the load generator; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after ({elapsed_s:.0f} s run).",
        f"- Load: `wrk -t{load.threads} -c{load.connections} -d{load.duration_s}s` on loopback, one-row body "
        f"`{V1_BODY.decode()}` (V1) or `{V2_BODY.decode()}` (V2, the same for every V2 server), "
        f"{load.warmup_s} s warm-up before every measurement, {rounds} interleaved rounds; req/s, p50 and p99 "
        "are medians over the rounds.",
        f"- Model: iris LogisticRegression (`modelapp_serving.sample_model`, random_state "
        f"{_sample_random_state()}), every server checked to predict {model_files.expected_prediction!r} for "
        f"{list(SAMPLE_ROW)} first. sha256: onnx {model_files.sha256(model_files.onnx)[:12]}…, "
        f"joblib {model_files.sha256(model_files.joblib)[:12]}…",
        "",
        "| Server | Protocol (endpoint) | Processes | Model file | req/s | p50 ms | p99 ms "
        "| req/s per round | errors |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for summary in summaries:
        per_round = " / ".join(f"{r.requests_per_s:,.0f}" for r in summary.rounds)
        lines.append(
            f"| {summary.spec.name} | {summary.spec.protocol} | {summary.spec.processes} "
            f"| {summary.spec.model_file} | {summary.requests_per_s:,.0f} | {summary.p50_ms:.2f} "
            f"| {summary.p99_ms:.2f} | {per_round} | {summary.errors} |"
        )
    lines.append("")
    for comparison in comparisons(summaries):
        lines.append(
            f"- {comparison['modelapp']} / best peer ({comparison['best_peer']}): "
            f"**{comparison['ratio']:.2f}x** req/s, p99 {comparison['modelapp_p99_ms']:.2f} ms vs "
            f"{comparison['best_peer_p99_ms']:.2f} ms. Goal (>= {GOAL_RATIO}x req/s at equal or lower p99): "
            f"**{'met' if comparison['met'] else 'not met'}**."
        )
    lines.append("")
    lines.append("Versions:")
    lines.append("")
    shown_already: set[str] = set()
    for summary in summaries:
        shown = ", ".join(f"{name} {version}" for name, version in summary.spec.versions.items())
        if shown not in shown_already:  # ModelApp variants share one line
            shown_already.add(shown)
            lines.append(f"- {summary.spec.name.split()[0]}: {shown}")
    lines.append(f"- load generator: {_wrk_version()}")
    return "\n".join(lines) + "\n"


def comparisons(summaries: Sequence[ServerSummary]) -> list[dict[str, Any]]:
    """Per ModelApp server: against the better peer of its runtime and protocol (KServe with that runtime and
    protocol, or MLServer, which is the peer of both protocols)."""
    found = []
    for ours in (s for s in summaries if s.spec.is_modelapp):
        peers = [
            s
            for s in summaries
            if not s.spec.is_modelapp
            and (s.spec.key == "mlserver" or (s.spec.runtime == ours.spec.runtime and s.spec.api == ours.spec.api))
        ]
        if not peers:
            continue
        best = max(peers, key=lambda s: s.requests_per_s)
        ratio = ours.requests_per_s / best.requests_per_s if best.requests_per_s > 0 else float("inf")
        found.append(
            {
                "runtime": ours.spec.runtime,
                "api": ours.spec.api,
                "modelapp": ours.spec.name,
                "best_peer": best.spec.name,
                "ratio": round(ratio, 3),
                "modelapp_rps": round(ours.requests_per_s, 1),
                "best_peer_rps": round(best.requests_per_s, 1),
                "modelapp_p99_ms": ours.p99_ms,
                "best_peer_p99_ms": best.p99_ms,
                "met": ratio >= GOAL_RATIO and ours.p99_ms <= best.p99_ms,
            }
        )
    return found


def median_round(summary: ServerSummary) -> LoadResult:
    ordered = sorted(summary.rounds, key=lambda r: r.requests_per_s)
    return ordered[(len(ordered) - 1) // 2]


def write_figures(summaries: Sequence[ServerSummary], command: str, load: LoadSettings, rounds: int) -> None:
    """bench/out/serving_rps.json (stable keys) and serving_rps.png (latency distribution per server)."""
    figures: dict[str, Any] = {
        "load": {
            "tool": "wrk",
            "threads": load.threads,
            "connections": load.connections,
            "duration_s": load.duration_s,
            "warmup_s": load.warmup_s,
            "rounds": rounds,
        },
        "goal_ratio": GOAL_RATIO,
        "servers": [
            {
                "key": s.spec.key,
                "name": s.spec.name,
                "runtime": s.spec.runtime,
                "api": s.spec.api,
                "is_modelapp": s.spec.is_modelapp,
                "processes": s.spec.processes,
                "protocol": s.spec.protocol,
                "model_file": s.spec.model_file,
                "versions": s.spec.versions,
                "requests_per_s": round(s.requests_per_s, 1),
                "p50_ms": s.p50_ms,
                "p99_ms": s.p99_ms,
                "errors": s.errors,
                "rounds": [
                    {
                        "requests_per_s": round(r.requests_per_s, 1),
                        "p50_ms": r.p50_ms,
                        "p90_ms": r.p90_ms,
                        "p99_ms": r.p99_ms,
                        "errors": r.errors,
                        "latency_percentiles_ms": [list(point) for point in r.distribution_ms],
                    }
                    for r in s.rounds
                ],
            }
            for s in summaries
        ],
        "comparisons": comparisons(summaries),
    }
    write_json("serving_rps", figures, command=command)
    plot_distributions(figures["servers"])


def plot_distributions(servers: Sequence[dict[str, Any]]) -> None:
    """bench/out/serving_rps.png from the JSON's servers: per runtime, each server's round with the median req/s."""
    plt = pyplot()
    runtimes = sorted({s["runtime"] for s in servers if s["is_modelapp"]}, reverse=True) or ["sklearn"]
    figure, axes_list = plt.subplots(1, len(runtimes), figsize=(6.5 * len(runtimes), 4.8), squeeze=False)
    ours_colors = ("tab:blue", "tab:purple", "tab:cyan", "tab:brown")
    for axes, runtime in zip(axes_list[0], runtimes, strict=True):
        ours = 0
        for s in servers:
            if s["runtime"] != runtime and s["key"] != "mlserver":
                continue
            rounds = sorted(s["rounds"], key=lambda r: r["requests_per_s"])
            points = rounds[(len(rounds) - 1) // 2]["latency_percentiles_ms"] if rounds else []
            if not points:
                continue
            label = f"{s['name']}: {s['requests_per_s']:,.0f} req/s, p99 {s['p99_ms']:.2f} ms"
            if s["is_modelapp"]:
                color, ours = ours_colors[ours % len(ours_colors)], ours + 1
            else:
                color = "tab:green" if s["key"] == "mlserver" else "tab:orange"
            axes.plot([p / 100 for p, _ in points], [ms for _, ms in points], marker=".", color=color, label=label)
        axes.set_yscale("log")
        axes.set_xscale("logit")
        axes.set_xlabel("percentile of requests")
        axes.set_ylabel("latency ms (wrk, request sent to response read)")
        axes.set_title(f"latency distribution (/predict and V2 infer), {runtime}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(OUT_DIR / "serving_rps.png", dpi=110)
    plt.close(figure)


def build_profile_section(name: str, result: LoadResult, output: Path, shares: Sequence[tuple[str, float]]) -> str:
    lines = [
        "",
        f"## Where {name} spends its time (py-spy, all processes, one more load run)",
        "",
        f"{result.requests_per_s:,.0f} req/s while sampled (py-spy itself costs some CPU); raw stacks: "
        f"`{output.relative_to(REPO_ROOT)}`. Shares are of the busy samples (kernel time in a syscall counts "
        "as busy: sending on loopback wakes the client).",
        "",
        "| where | share of samples |",
        "| --- | ---: |",
    ]
    lines += [f"| {label} | {share:.1f} % |" for label, share in shares]
    return "\n".join(lines) + "\n"


def _sample_random_state() -> int:
    return sample_model.RANDOM_STATE


def _wrk_version() -> str:
    completed = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    first = (completed.stdout or completed.stderr).splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk"


# ------------------------------------------------------------------------------------------ specs


def modelapp_spec(
    model_files: ModelFiles,
    workers: int,
    port: int,
    model_format: str,
    worker_class: str | None,
    threads: int,
    reuse_port: bool = False,
    api: str = "v1",
) -> ServerSpec:
    """The app as it runs in a pod whose cache already holds the verified file; `api` v2 measures its V2 infer.

    The app only loads pinned blobs; a file named after its sha256 in MODELAPP_MODEL_CACHE_DIR is re-hashed
    and reused without any download, so the blob URL below (loopback, nothing listens there) is never
    contacted. Started through `python -m modelapp_serving`, which execs gunicorn with the app's config.
    """
    model_path = model_files.onnx if model_format == "onnx" else model_files.skops
    sha256 = model_files.sha256(model_path)
    base = f"http://{LOOPBACK}:{port}"
    tuning: dict[str, str] = {}
    unset: tuple[str, ...] = ()
    runtime = "onnx" if model_format == "onnx" else "sklearn"
    if worker_class is None:
        defaults = modelapp_default_worker_class()
        name, key = "ModelApp", "modelapp"
        worker_text = f"{defaults.worker_class} workers" + (
            f" x {defaults.threads} threads" if defaults.worker_class == "gthread" else ""
        )
        worker_text += ", reuse-port" if defaults.reuse_port else ""
        worker_text += " (the app's defaults)"
        # What ships is what is measured: nothing from the caller's environment tunes this variant.
        unset = ("MODELAPP_WORKER_CLASS", "MODELAPP_THREADS", "MODELAPP_REUSE_PORT")
    else:
        if worker_class == "gthread":
            name, key = f"ModelApp gthread x{threads}", f"modelapp-gthread-{threads}"
            worker_text = f"gthread workers x {threads} threads"
            tuning = {"MODELAPP_WORKER_CLASS": "gthread", "MODELAPP_THREADS": str(threads)}
        else:
            name, key = f"ModelApp {worker_class}", f"modelapp-{worker_class}"
            worker_text = f"{worker_class} workers"
            tuning = {"MODELAPP_WORKER_CLASS": worker_class, "MODELAPP_THREADS": "1"}
        # Variants say both ways, so that a variant means the same whatever the app's default is.
        tuning["MODELAPP_REUSE_PORT"] = "true" if reuse_port else "false"
        if reuse_port:
            name, key, worker_text = f"{name} reuse-port", f"{key}-reuse-port", f"{worker_text}, reuse-port"
    if api == "v2":
        name, key = name.replace("ModelApp", "ModelApp V2", 1), key.replace("modelapp", "modelapp-v2", 1)
    name, key = f"{name} [{runtime}]", f"{key}-{runtime}"
    cache_dir = RUN_DIR / f"cache-{key}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    shutil.copyfile(model_path, cache_dir / f"{sha256}{model_path.suffix}")
    return ServerSpec(
        name=name,
        key=key,
        is_modelapp=True,
        api=api,
        protocol=(
            f"**V2** inference protocol (`POST /v2/models/{MODEL_NAME}/infer`)"
            if api == "v2"
            else "V1 JSON `instances` (`POST /predict`)"
        ),
        processes=f"gunicorn, {workers} {worker_text}",
        model_file=model_path.name,
        argv=[
            str(PROJECT_VENV_BIN / "python"),
            "-m",
            "modelapp_serving",
            "--",
            "--bind",
            f"{LOOPBACK}:{port}",
            "--workers",
            str(workers),
        ],
        env={
            "MODELAPP_MODEL_URL": f"http://{LOOPBACK}:9/devstoreaccount1/models/{model_path.name}",
            "MODELAPP_MODEL_ETAG": '"0x0BENCHCACHEDFILE"',
            "MODELAPP_MODEL_SHA256": sha256,
            "MODELAPP_MODEL_FORMAT": model_format,
            "MODELAPP_MODEL_CACHE_DIR": str(cache_dir),
            "MODELAPP_MODEL_CONNECTION_STRING": "",
            "MODELAPP_PORT": str(port),
            "MODELAPP_MODEL_NAME": MODEL_NAME,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(APP_SOURCE_ROOT), os.environ.get("PYTHONPATH")])),
            "MODELAPP_WORKERS": str(workers),
            **tuning,
        },
        unset_env=unset,
        predict_url=f"{base}/v2/models/{MODEL_NAME}/infer" if api == "v2" else f"{base}/predict",
        ready_url=f"{base}/readyz",
        body=V2_BODY if api == "v2" else V1_BODY,
        read_prediction=read_v2_prediction if api == "v2" else read_v1_prediction,
        versions={"modelapp": modelapp_serving.__version__, **distribution_versions(Path(sys.executable), _APP_DISTS)},
        runtime=runtime,
    )


@dataclass(frozen=True)
class GunicornDefaults:
    worker_class: str
    threads: int
    reuse_port: bool


def modelapp_default_worker_class() -> GunicornDefaults:
    """The worker class, threads and reuse-port the app's gunicorn config picks when nothing overrides them."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MODELAPP_WORKER_CLASS", "MODELAPP_THREADS", "MODELAPP_REUSE_PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
    code = "import modelapp_serving.gunicorn_conf as c; print(c.worker_class, c.threads, c.reuse_port)"
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, check=True, capture_output=True, text=True
    )
    return parse_gunicorn_defaults(completed.stdout)


def parse_gunicorn_defaults(stdout: str) -> GunicornDefaults:
    worker_class, threads, reuse_port = stdout.split()
    return GunicornDefaults(worker_class, int(threads), reuse_port == "True")


_APP_DISTS = ("flask", "gunicorn", "onnxruntime", "scikit-learn")


def read_v1_prediction(document: Any) -> Any:
    return document["predictions"][0]


def read_v2_prediction(document: Any) -> Any:
    return document["outputs"][0]["data"][0]


def kserve_spec(
    model_files: ModelFiles, workers: int, port: int, venv_bin: Path, runtime: str = "sklearn", api: str = "v1"
) -> ServerSpec:
    """KServe's ModelServer with a `kserve.Model` calling the estimator (sklearn) or onnxruntime (onnx); `api` v2
    measures its V2 infer endpoint (the same server answers both)."""
    base = f"http://{LOOPBACK}:{port}"
    v2 = api == "v2"
    model_file = model_files.onnx if runtime == "onnx" else model_files.joblib
    extra_dists = ("onnxruntime",) if runtime == "onnx" else ("scikit-learn",)
    log_config = RUN_DIR / "kserve-logging.json"
    log_config.write_text(json.dumps(KSERVE_QUIET_LOGGING, indent=1))
    return ServerSpec(
        name=f"KServe V2 [{runtime}]" if v2 else f"KServe [{runtime}]",
        key=f"kserve-v2-{runtime}" if v2 else f"kserve-{runtime}",
        api=api,
        protocol=(
            f"**V2** inference protocol (`POST /v2/models/{MODEL_NAME}/infer`)"
            if v2
            else f"V1 JSON `instances` (`POST /v1/models/{MODEL_NAME}:predict`)"
        ),
        processes=f"kserve ModelServer, {workers} uvicorn workers",
        model_file=model_file.name,
        runtime=runtime,
        argv=[
            str(venv_bin / "python"),
            str(KSERVE_SERVER_SCRIPT),
            "--model_file",
            str(model_file),
            "--model_name",
            MODEL_NAME,
            "--http_port",
            str(port),
            "--workers",
            str(workers),
            "--enable_grpc",
            "false",
            "--enable_latency_logging",
            "false",
            "--log_config_file",
            str(log_config),
        ],
        predict_url=f"{base}/v2/models/{MODEL_NAME}/infer" if v2 else f"{base}/v1/models/{MODEL_NAME}:predict",
        ready_url=f"{base}/v2/models/{MODEL_NAME}/ready" if v2 else f"{base}/v1/models/{MODEL_NAME}",
        body=V2_BODY if v2 else V1_BODY,
        read_prediction=read_v2_prediction if v2 else read_v1_prediction,
        versions=distribution_versions(venv_bin / "python", ("kserve", "fastapi", "uvicorn", *extra_dists)),
    )


# kserve's own logging config minus the two per-request loggers (access log, timing trace): ModelApp's
# gunicorn logs no access lines either, and MLServer has none with debug off.
KSERVE_QUIET_LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(process)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {
        "kserve": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "kserve.trace": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}


def mlserver_spec(
    model_files: ModelFiles, parallel_workers: int, ports: tuple[int, int, int], venv_bin: Path
) -> ServerSpec:
    http_port, grpc_port, metrics_port = ports
    repository = RUN_DIR / "mlserver"
    model_dir = repository / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_files.joblib, model_dir / "model.joblib")
    settings = {
        "debug": False,
        "host": LOOPBACK,
        "http_port": http_port,
        "grpc_port": grpc_port,  # cannot be turned off; kept on loopback
        "metrics_port": metrics_port,
        "parallel_workers": parallel_workers,
    }
    (repository / "settings.json").write_text(json.dumps(settings, indent=1))
    model_settings = {
        "name": MODEL_NAME,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=1))
    base = f"http://{LOOPBACK}:{http_port}"
    processes = (
        "1 process (inference in the HTTP process)"
        if parallel_workers == 0
        else f"1 HTTP process + {parallel_workers} inference workers"
    )
    return ServerSpec(
        name="MLServer",
        key="mlserver",
        api="v2",
        protocol=f"**V2** inference protocol (`POST /v2/models/{MODEL_NAME}/infer`)",
        processes=processes,
        model_file=model_files.joblib.name,
        argv=[str(venv_bin / "mlserver"), "start", str(repository)],
        predict_url=f"{base}/v2/models/{MODEL_NAME}/infer",
        ready_url=f"{base}/v2/models/{MODEL_NAME}/ready",
        body=V2_BODY,
        read_prediction=read_v2_prediction,
        versions=distribution_versions(
            venv_bin / "python", ("mlserver", "mlserver-sklearn", "fastapi", "uvicorn", "scikit-learn")
        ),
    )


# -------------------------------------------------------------------------------------------- main


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stopping_on_termination() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP all unwind as KeyboardInterrupt, so the `finally` that stops the servers runs.

    SIGINT too: a shell that starts the benchmark in the background leaves SIGINT ignored.
    """
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


DEFAULT_SERVERS = "modelapp,kserve,mlserver"


@dataclass(frozen=True)
class ServerEntry:
    kind: str
    """modelapp, kserve or mlserver."""
    worker_class: str | None = None
    threads: int = 1
    reuse_port: bool = False


def parse_server_entry(entry: str) -> ServerEntry:
    """`kserve`, `mlserver`, `modelapp` (the app's defaults), or `modelapp:sync|:asgi|:gthread:THREADS[+reuse-port]`."""
    text, plus, option = entry.strip().lower().partition("+")
    if plus and option != "reuse-port":
        raise ValueError(f"{entry!r}: the only option is +reuse-port")
    parts = [part.strip() for part in text.split(":")]
    kind = parts[0]
    if kind in ("kserve", "mlserver") and len(parts) == 1 and not plus:
        return ServerEntry(kind)
    if kind != "modelapp" or len(parts) > 3:
        raise ValueError(f"unknown server {entry!r}")
    reuse_port = bool(plus)
    if len(parts) == 1:
        if reuse_port:
            raise ValueError(
                f"{entry!r}: plain modelapp runs the app's defaults; +reuse-port goes with :sync or :gthread"
            )
        return ServerEntry(kind)
    worker_class = parts[1]
    if worker_class in ("sync", "asgi") and len(parts) == 2:
        return ServerEntry(kind, worker_class, reuse_port=reuse_port)
    if worker_class == "gthread":
        threads = parts[2] if len(parts) == 3 else "1"
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"{entry!r}: gthread needs a positive thread count, e.g. modelapp:gthread:4")
        return ServerEntry(kind, "gthread", int(threads), reuse_port)
    raise ValueError(
        f"{entry!r}: use modelapp, modelapp:sync, modelapp:asgi or modelapp:gthread:THREADS, then +reuse-port"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/serving_rps.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes per server (default 2)")
    parser.add_argument("--connections", type=int, default=8, help="wrk -c (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--servers",
        default=DEFAULT_SERVERS,
        help="comma-separated servers, run in this order each round: modelapp (the app's default worker\n"
        "settings), modelapp:sync, modelapp:asgi or modelapp:gthread:THREADS, each with reuse-port off unless\n"
        "+reuse-port (one SO_REUSEPORT socket per worker), kserve, mlserver (default: %(default)s)",
    )
    parser.add_argument(
        "--runtimes",
        default="sklearn,onnx",
        help="runtimes compared like for like, each on ModelApp and KServe: sklearn (ModelApp skops, KServe\n"
        "joblib; the estimator's predict on both), onnx (the same iris.onnx through onnxruntime on both)\n"
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--protocols",
        default="v1,v2",
        help="protocols compared like for like: v1 (ModelApp POST /predict, KServe V1 :predict), v2 (the Open\n"
        "Inference Protocol's infer on ModelApp and KServe); MLServer (V2 only) is a peer of both\n"
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--mlserver-parallel-workers",
        type=int,
        default=None,
        help="MLServer inference workers (default: --workers)",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="after the rounds, sample each ModelApp variant with py-spy during one more load run and\n"
        "print where its time goes (py-spy from bench/serving/requirements-tools.txt)",
    )
    parser.add_argument("--report", type=Path, default=REPORT_PATH, help="markdown output file")
    parser.add_argument("--replot", action="store_true", help="only redraw serving_rps.png from serving_rps.json")
    args = parser.parse_args(argv)
    try:
        args.server_entries = [parse_server_entry(entry) for entry in args.servers.split(",") if entry.strip()]
    except ValueError as error:
        parser.error(f"--servers: {error}")
    if not args.server_entries:
        parser.error("--servers: name at least one server")
    args.runtime_list = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not args.runtime_list or set(args.runtime_list) - {"sklearn", "onnx"}:
        parser.error("--runtimes: sklearn, onnx or both")
    args.protocol_list = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not args.protocol_list or set(args.protocol_list) - set(PROTOCOLS):
        parser.error("--protocols: v1, v2 or both")
    if args.connections < args.threads:
        parser.error("--connections must be at least --threads")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        plot_distributions(json.loads((OUT_DIR / "serving_rps.json").read_text())["servers"])
        return 0
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    command = shlex.join([".venv/bin/python", "bench/serving_rps.py", *(sys.argv[1:] if argv is None else argv)])
    load = LoadSettings(args.threads, args.connections, args.duration, args.warmup)
    started = time.monotonic()
    load_before = os.getloadavg()

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    model_files = write_model_files(RUN_DIR / "models")
    specs: list[ServerSpec] = []
    combinations = [(a, r, e) for a in args.protocol_list for r in args.runtime_list for e in args.server_entries]
    for api, runtime, entry in combinations:
        if entry.kind == "modelapp":
            port = free_loopback_port()
            spec = modelapp_spec(
                model_files,
                args.workers,
                port,
                "onnx" if runtime == "onnx" else "skops",
                entry.worker_class,
                entry.threads,
                entry.reuse_port,
                api,
            )
        elif entry.kind == "kserve":
            venv_bin = ensure_venv("kserve", SERVING_BENCH_DIR / "requirements-kserve.txt", sys.stderr)
            spec = kserve_spec(model_files, args.workers, free_loopback_port(), venv_bin, runtime, api)
        else:
            if any(existing.key == "mlserver" for existing in specs):
                continue  # one MLServer (scikit-learn) is the third peer of every runtime and protocol
            venv_bin = ensure_venv("mlserver", SERVING_BENCH_DIR / "requirements-mlserver.txt", sys.stderr)
            parallel = args.workers if args.mlserver_parallel_workers is None else args.mlserver_parallel_workers
            ports = (free_loopback_port(), free_loopback_port(), free_loopback_port())
            spec = mlserver_spec(model_files, parallel, ports, venv_bin)
        if any(existing.key == spec.key for existing in specs):
            print(f"--servers: {spec.name} named twice", file=sys.stderr)
            return 2
        specs.append(spec)

    fleet = ServerFleet(RUN_DIR / "logs")
    results: dict[str, list[LoadResult]] = {spec.key: [] for spec in specs}
    profiles: list[tuple[LoadResult, Path, list[tuple[str, float]]]] = []
    profiled: list[str] = []
    try:
        with stopping_on_termination():
            servers = [fleet.start(spec) for spec in specs]
            for server in servers:
                seconds = wait_until_ready(server)
                check_prediction(server, model_files.expected_prediction)
                print(f"{server.spec.name} ready in {seconds:.1f} s at {server.spec.predict_url}", file=sys.stderr)
            bodies = {}
            for server in servers:
                body_file = RUN_DIR / f"body-{server.spec.key}.json"
                body_file.write_bytes(server.spec.body)
                bodies[server.spec.key] = body_file
            for round_index in range(1, args.rounds + 1):
                for server in servers:
                    body_file = bodies[server.spec.key]
                    if load.warmup_s > 0:
                        run_wrk(load, server.spec.predict_url, body_file, load.warmup_s)
                    result = run_wrk(load, server.spec.predict_url, body_file, load.duration_s)
                    results[server.spec.key].append(result)
                    print(
                        f"round {round_index} {server.spec.name}: {result.requests_per_s:,.0f} req/s, "
                        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, errors {result.errors}",
                        file=sys.stderr,
                    )
                    if server.process.poll() is not None:
                        raise RuntimeError(f"{server.spec.name} died during the run:\n{server.log_tail()}")
            if args.py_spy:
                tools_bin = ensure_venv("tools", SERVING_BENCH_DIR / "requirements-tools.txt", sys.stderr)
                for server in servers:
                    if server.spec.is_modelapp:
                        profiles.append(
                            profile_with_py_spy(
                                server, load, bodies[server.spec.key], tools_bin / "py-spy", load.duration_s
                            )
                        )
                        profiled.append(server.spec.name)
    except KeyboardInterrupt:
        print("interrupted: stopping the servers", file=sys.stderr)
        return 130
    finally:
        fleet.stop_all()

    summaries = [ServerSummary(spec, results[spec.key]) for spec in specs]
    report = build_report(
        summaries,
        command=command,
        load=load,
        rounds=args.rounds,
        model_files=model_files,
        load_before=load_before,
        load_after=os.getloadavg(),
        elapsed_s=time.monotonic() - started,
    )
    for name, (result, output, shares) in zip(profiled, profiles, strict=True):
        report += build_profile_section(name, result, output, shares)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    write_figures(summaries, command, load, args.rounds)
    print(report)
    print(f"written to {args.report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
