"""The stable pair's user-facing latency with shadow traffic on and off, side by side (issue 20, section 3).

Three app processes on loopback, each as in a pod whose cache already holds the verified model (gunicorn, the
app's default ASGI workers; the blob URL names a port where nothing listens and is never contacted):

  off        the stable pair, no shadow;
  on         the same stable pair with MODELAPP_SHADOW_URL at the candidate, MODELAPP_SHADOW_PERCENT=100:
             every request the user sends is also sent to the candidate after the user's answer;
  candidate  a model with permuted labels (every shadowed answer disagrees), the candidate's side.

An open-loop load generator (asyncio + aiohttp; each request sent at its scheduled time, latency taken from
that time, so a stall is not hidden by sending less) sends the same body to `off` and to `on` in alternating
rounds at each rate. The table gives each side's median p50/p99 over its rounds and the ratio on/off; the
goal is p99 on <= 1.2x off. On this machine the candidate shares the two cores with the stable pair (in a
cluster it has its own pods), so the figure is an upper bound of shadowing's cost.

    .venv/bin/python bench/shadow_overhead.py [--rates 25,200] [--seconds 20] [--rounds 3] [--workers 2]

Writes bench/out/shadow_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
for root in (REPO_ROOT, REPO_ROOT / "app"):  # bench/ is not a package; app/ is a source root
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))

from modelapp_localstack.procs import free_port  # noqa: E402
from modelapp_serving.sample_model import write_sample_models  # noqa: E402

from bench.results import command_line, write_json  # noqa: E402

LOOPBACK = "127.0.0.1"
BODY = json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}).encode()
STABLE_IMAGE = "registry.local/apps/iris@sha256:" + "a" * 64
CANDIDATE_IMAGE = "registry.local/apps/iris@sha256:" + "b" * 64


@contextmanager
def serving(model: Path, folder: Path, workers: int, image: str, **env: str) -> Iterator[int]:
    """One app process whose cache already holds `model`; yields its port once /readyz answers 200."""
    sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
    cache = folder / "cache"
    prometheus = folder / "prometheus"
    for path in (cache, prometheus):
        path.mkdir(parents=True)
    shutil.copyfile(model, cache / f"{sha256}.onnx")
    port = free_port()
    process_env = {
        **os.environ,
        "MODELAPP_MODEL_URL": f"http://{LOOPBACK}:9/devstoreaccount1/models/{model.name}",
        "MODELAPP_MODEL_ETAG": '"0x0BENCH' + sha256[:8].upper() + '"',
        "MODELAPP_MODEL_SHA256": sha256,
        "MODELAPP_MODEL_FORMAT": "onnx",
        "MODELAPP_MODEL_CACHE_DIR": str(cache),
        "MODELAPP_MODEL_CONNECTION_STRING": "",
        "MODELAPP_PORT": str(port),
        "MODELAPP_LIVENESS_PORT": str(free_port()),
        "MODELAPP_WORKERS": str(workers),
        "MODELAPP_IMAGE": image,
        "PROMETHEUS_MULTIPROC_DIR": str(prometheus),
        **env,
    }
    log = (folder / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "modelapp_serving", "--", "--bind", f"{LOOPBACK}:{port}"],
        env=process_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"the app on {port} did not become ready: {(folder / 'serve.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)
        yield port
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


async def open_loop(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """`rate` requests per second for `seconds`, each at its scheduled time; latencies from that time (ms)."""
    latencies: list[float] = []
    failures = 0
    count = int(rate * seconds)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2

        async def one(index: int) -> None:
            nonlocal failures
            scheduled = start + index / rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            try:
                async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    if response.status != 200:
                        failures += 1
            except (aiohttp.ClientError, TimeoutError):
                failures += 1
            latencies.append((loop.time() - scheduled) * 1000.0)

        await asyncio.gather(*(one(index) for index in range(count)))
    latencies.sort()
    return {
        "requests": count,
        "failed": failures,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def shadow_counts(port: int) -> dict[str, float]:
    """The 'on' side's shadow outcomes and drops, summed over candidates: `<metric>:<outcome or reason>`."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("modelapp_shadow_comparisons_total", "modelapp_shadow_dropped_total"):
                key = f"{sample.name}:{sample.labels.get('outcome') or sample.labels.get('reason')}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def measure(
    sides: dict[str, int], rates: Sequence[float], seconds: float, rounds: int
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Rounds per rate, alternating which side goes first; each side warmed for 2 s at the rate first."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {str(rate): {side: [] for side in sides} for rate in rates}
    for rate in rates:
        for port in sides.values():
            asyncio.run(open_loop(f"http://{LOOPBACK}:{port}/predict", rate, 2.0))
        for index in range(rounds):
            for side in sorted(sides, reverse=index % 2 == 1):
                result = asyncio.run(open_loop(f"http://{LOOPBACK}:{sides[side]}/predict", rate, seconds))
                results[str(rate)][side].append(result)
                print(
                    f"{rate:>6.0f}/s {side:>3}: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms,"
                    f" {result['failed']} failed of {result['requests']}",
                    flush=True,
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="25,200", help="requests per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per app process")
    args = parser.parse_args(argv)
    rates = [float(rate) for rate in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="modelapp-shadow-bench-") as tmp:
        folder = Path(tmp)
        stable_model = write_sample_models(folder / "v1").onnx
        candidate_model = write_sample_models(folder / "permuted", label_shift=1).onnx
        with (
            serving(candidate_model, folder / "candidate", args.workers, CANDIDATE_IMAGE) as candidate,
            serving(stable_model, folder / "off", args.workers, STABLE_IMAGE) as off,
            serving(
                stable_model, folder / "on", args.workers, STABLE_IMAGE,
                MODELAPP_SHADOW_URL=f"http://{LOOPBACK}:{candidate}", MODELAPP_SHADOW_PERCENT="100",
            ) as on,
        ):  # fmt: skip
            rounds = measure({"off": off, "on": on}, rates, args.seconds, args.rounds)
            counts = shadow_counts(on)
    table: list[dict[str, Any]] = []
    for rate in rates:
        row: dict[str, Any] = {"rate_per_second": rate}
        for side in ("off", "on"):
            results = rounds[str(rate)][side]
            row[f"{side}_p50_ms"] = statistics.median(r["p50_ms"] for r in results)
            row[f"{side}_p99_ms"] = statistics.median(r["p99_ms"] for r in results)
            row[f"{side}_failed"] = sum(r["failed"] for r in results)
            row[f"{side}_requests"] = sum(r["requests"] for r in results)
        row["p99_ratio_on_off"] = row["on_p99_ms"] / row["off_p99_ms"]
        row["p50_ratio_on_off"] = row["on_p50_ms"] / row["off_p50_ms"]
        table.append(row)
    print("\n| rate | p50 off | p50 on | p99 off | p99 on | p99 on/off | failed (off / on) |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['rate_per_second']:.0f}/s | {row['off_p50_ms']:.2f} ms | {row['on_p50_ms']:.2f} ms |"
              f" {row['off_p99_ms']:.2f} ms | {row['on_p99_ms']:.2f} ms | {row['p99_ratio_on_off']:.2f} |"
              f" {row['off_failed']} / {row['on_failed']} |")  # fmt: skip
    print(f"\nshadow counts on the 'on' side: {json.dumps(counts)}")
    path = write_json(
        "shadow_overhead",
        {"workers": args.workers, "seconds": args.seconds, "rounds": args.rounds, "table": table,
         "shadow_counts": counts, "rounds_raw": rounds},
        command=command_line(),
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
