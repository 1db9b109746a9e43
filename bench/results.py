"""Figures people can look at: every benchmark writes bench/out/<name>.json (stable keys) and, where a
curve says more than a table, bench/out/<name>*.png (matplotlib, no display needed).

JSON layout, shared by all benchmarks:

    {"benchmark": "<name>", "schema": 1, "command": "<exact command>", "started_utc": "...",
     "machine": {"cpus": N, "load_before": [...], "load_after": [...]}, ...benchmark's own keys...}
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "bench" / "out"
SCHEMA = 1


def command_line(argv: Sequence[str] | None = None) -> str:
    """The exact command, as RESULTS.md shows it (relative script path, the project venv's python)."""
    args = list(sys.argv if argv is None else argv)
    script = Path(args[0])
    with_path = str(script.resolve().relative_to(REPO_ROOT)) if script.is_absolute() else str(script)
    return shlex.join([".venv/bin/python", with_path, *args[1:]])


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write null instead (stable keys, parseable by any reader)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(name: str, figures: Mapping[str, Any], *, command: str, out_dir: Path = OUT_DIR) -> Path:
    document = {
        "benchmark": name,
        "schema": SCHEMA,
        "command": command,
        "written_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "load_after": list(os.getloadavg())},
        **figures,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(_clean(document), indent=1, sort_keys=False) + "\n")
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend."""
    matplotlib.use("Agg")
    return plt
