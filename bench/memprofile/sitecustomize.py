"""Where the operator's memory goes, for bench/scale.py --tracemalloc (bench only: never in an image).

bench/scale.py puts this folder on the operator's PYTHONPATH and names a report file in
MODELAPP_BENCH_TRACEMALLOC; Python's `site` imports this module at start-up. It traces every
allocation (one frame each) and, every SNAPSHOT_SECONDS, takes a snapshot: the report file is
rewritten with the allocation sites of the snapshot with the most traced memory (`peak`) and of
the newest one (`last`), grouped by file:line and by module. Tracing costs CPU and memory of its
own, so a run with it measures where memory goes, not the operator's RSS.
"""

from __future__ import annotations

import json
import os
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

SNAPSHOT_SECONDS = 15.0
TOP = 40


def _group(snapshot: tracemalloc.Snapshot, key: str) -> list[dict[str, Any]]:
    stats = snapshot.statistics(key)
    return [
        {"where": str(stat.traceback).strip(), "kib": round(stat.size / 1024, 1), "blocks": stat.count}
        for stat in stats[:TOP]
    ]


def _module(frame_file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "operator/", "contract/"):
        if marker in frame_file:
            return frame_file.split(marker, 1)[1].rsplit("/", 1)[0] or frame_file
    return frame_file


def _by_package(snapshot: tracemalloc.Snapshot) -> list[dict[str, Any]]:
    sizes: dict[str, list[int]] = {}
    for stat in snapshot.statistics("filename"):
        entry = sizes.setdefault(_module(stat.traceback[0].filename), [0, 0])
        entry[0] += stat.size
        entry[1] += stat.count
    ranked = sorted(sizes.items(), key=lambda item: -item[1][0])[:TOP]
    return [{"where": name, "kib": round(size / 1024, 1), "blocks": count} for name, (size, count) in ranked]


def _report(snapshot: tracemalloc.Snapshot, traced: int, at: float) -> dict[str, Any]:
    return {
        "seconds_since_start": round(at, 1),
        "traced_mib": round(traced / 2**20, 1),
        "rss_mib": round(_rss_kib() / 1024, 1),
        "by_package": _by_package(snapshot),
        "by_line": _group(snapshot, "lineno"),
    }


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _run(path: Path) -> None:
    started = time.monotonic()
    peak: dict[str, Any] | None = None
    while True:
        time.sleep(SNAPSHOT_SECONDS)
        traced, _ = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot()
        last = _report(snapshot, traced, time.monotonic() - started)
        del snapshot
        if peak is None or last["traced_mib"] >= peak["traced_mib"]:
            peak = last
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"peak": peak, "last": last}, indent=1) + "\n")
        partial.rename(path)


_target = os.environ.get("MODELAPP_BENCH_TRACEMALLOC")
if _target:
    tracemalloc.start(1)
    threading.Thread(target=_run, args=(Path(_target),), name="bench-tracemalloc", daemon=True).start()
