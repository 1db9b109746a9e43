"""The serving app's own start-up, lever by lever: exec `modelapp-serve` → first `GET /readyz` 200, no node.

What each start-up lever of issue 23 buys, measured side by side in one run: four copies of the current
app/modelapp_serving, each with one more lever undone (a text patch of the copy; the script stops if a patch
no longer applies), started in alternating order:

  all         the current code
  -lazy-id    azure.identity imported at module level again (download.py)
  -preimport  + the master no longer imports the web stack and the runtime before forking (gunicorn_conf.py)
  -inprocess  + modelapp-serve execs a second interpreter for gunicorn again (__main__.py): the code before

The model (the sample ONNX iris classifier, 0.5 kB) is already in the cache dir, verified by its sha256 at
start as in a pod that restarts; no download, no Azurite. `--cpus 0` pins every process to one CPU (a
one-CPU pod; gunicorn still starts 2 workers).

    .venv/bin/python bench/app_start.py [--runs 8] [--cpus 0]

Writes bench/out/app_start.json (bench/out/app_start-cpus<N>.json with --cpus).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from modelapp_serving.sample_model import export_onnx, train_iris_classifier  # noqa: E402

from bench.results import command_line, write_json  # noqa: E402

PORT = 18090
# (variant, file, text in the current code, text with the lever undone); each variant undoes its own patch
# and every patch of the variants before it.
UNDO = [
    (
        "-lazy-id",
        "download.py",
        "from azure.storage.blob import BlobClient, BlobServiceClient\n",
        "from azure.identity import DefaultAzureCredential\n"
        "from azure.storage.blob import BlobClient, BlobServiceClient\n",
    ),
    ("-preimport", "gunicorn_conf.py", "    import_before_fork(config)\n", "    del config\n"),
    (
        "-inprocess",
        "__main__.py",
        "    run_gunicorn(build_gunicorn_argv(extra))\n",
        "    os.execv(sys.executable, [sys.executable, '-m', 'gunicorn', *build_gunicorn_argv(extra)[1:]])\n",
    ),
]


def make_variants(work: Path) -> dict[str, Path]:
    source = REPO_ROOT / "app" / "modelapp_serving"
    variants = {"all": source.parent}
    undone: list[tuple[str, str, str]] = []
    for name, file, current, before in UNDO:
        undone.append((file, current, before))
        root = work / name
        shutil.copytree(source, root / "modelapp_serving", ignore=shutil.ignore_patterns("__pycache__"))
        for patched_file, text, replacement in undone:
            path = root / "modelapp_serving" / patched_file
            content = path.read_text()
            if content.count(text) != 1:
                raise SystemExit(f"{patched_file}: the lever's code changed; update bench/app_start.py's UNDO")
            if patched_file == "__main__.py" and "import os\n" not in content:
                content = content.replace("import sys\n", "import os\nimport sys\n", 1)
            path.write_text(content.replace(text, replacement))
        variants[name] = root
    return variants


def time_start(python_path: Path, cache: Path, sha256: str, model: bytes, cpus: str | None) -> float:
    cache.mkdir()
    (cache / f"{sha256}.onnx").write_bytes(model)
    env = dict(
        os.environ,
        MODELAPP_MODEL_URL="http://127.0.0.1:9/devstoreaccount1/models/m/model.onnx",
        MODELAPP_MODEL_ETAG='"0x1"',
        MODELAPP_MODEL_SHA256=sha256,
        MODELAPP_MODEL_FORMAT="onnx",
        MODELAPP_MODEL_CACHE_DIR=str(cache),
        MODELAPP_PORT=str(PORT),
        # A connection string: the credential a cached model never needs (no request is made).
        MODELAPP_MODEL_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;",
        PROMETHEUS_MULTIPROC_DIR=str(cache / "prometheus"),
        PYTHONPATH=str(python_path),
    )
    command = [str(Path(sys.executable).with_name("modelapp-serve"))]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < 60:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.005)
        raise SystemExit(f"{python_path}: not ready in 60 s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--cpus", default=None, help="taskset CPU list for every process, e.g. 0")
    args = parser.parse_args()
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="modelapp-app-start-") as temp:
        work = Path(temp)
        model = export_onnx(train_iris_classifier(), work / "iris.onnx").read_bytes()
        sha256 = hashlib.sha256(model).hexdigest()
        variants = make_variants(work)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for run in range(args.runs):
            order = list(variants) if run % 2 == 0 else list(variants)[::-1]
            for name in order:
                cache = work / f"cache-{name}-{run}"
                seconds[name].append(time_start(variants[name], cache, sha256, model, args.cpus))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    before = medians["-inprocess"]
    for name, values in seconds.items():
        runs = " ".join(f"{value:.2f}" for value in values)
        print(f"{name:11} median {medians[name]:.3f} s ({before / medians[name]:.2f}x the code before)  {runs}")
    suffix = f"-cpus{args.cpus}" if args.cpus is not None else ""
    write_json(
        f"app_start{suffix}",
        {
            "runs": args.runs,
            "cpus": args.cpus,
            "seconds": seconds,
            "median_seconds": medians,
            "speedup_over_before": {name: before / value for name, value in medians.items()},
            "load_average_before": load_before,
        },
        command=command_line(),
    )


if __name__ == "__main__":
    main()
