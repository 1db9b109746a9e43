"""Debian's `prometheus` in the local stack: listens only on the stack's host address, keeps its data in
the run folder, scrapes what tests hand it (file-based targets), loads rule files, answers PromQL.

Targets: `scrape(job, [host:port, ...])` writes `targets/<job>.json`, which Prometheus watches and
re-reads at once. Rules: `load_rules(name, groups)` writes `rules/<name>.yaml` and reloads.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .procs import ManagedProcess, StackError, free_port, log

SCRAPE_INTERVAL_SECONDS = 1


@dataclass
class Prometheus:
    url: str  # http://host:port
    folder: Path
    process: ManagedProcess

    def scrape(self, job: str, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
        """Scrape targets (host:port) as `job` every second, replacing the job's earlier targets."""
        entries = [{"targets": list(targets), "labels": dict(labels or {})}]
        staging = self.folder / "targets" / f".{job}.json.tmp"
        staging.write_text(json.dumps(entries))
        staging.replace(self.folder / "targets" / f"{job}.json")

    def load_rules(self, name: str, groups: Sequence[Mapping[str, Any]]) -> None:
        (self.folder / "rules" / f"{name}.yaml").write_text(yaml.safe_dump({"groups": list(groups)}))
        self._post("/-/reload")

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a success answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
            body = json.loads(answer.read())
        if body.get("status") != "success":
            raise StackError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [time, "text"]}, ...]."""
        data = self.api("query", query=promql)
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of a query that yields one series (None: no series)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise StackError(f"{promql!r} yields {len(result)} series")
        return float(result[0]["value"][1])

    def targets_up(self, job: str) -> bool:
        active = self.api("targets", state="active")["activeTargets"]
        return any(t["labels"].get("job") == job and t["health"] == "up" for t in active)

    def _post(self, path: str) -> None:
        request = urllib.request.Request(f"{self.url}{path}", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        self.process.stop()


def start_prometheus(run_dir: Path, *, host: str = "127.0.0.1") -> Prometheus:
    """Start Debian's prometheus on host (loopback, or the host side of a real node's network)."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("prometheus is missing: run deploy/local/setup.sh (Debian package `prometheus`)")
    started = time.monotonic()
    folder = run_dir / "prometheus"
    for sub in ("data", "targets", "rules"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s", "evaluation_interval": "1s"},
        "rule_files": [str(folder / "rules" / "*.yaml")],
        "scrape_configs": [
            {
                "job_name": "file",
                "file_sd_configs": [{"files": [str(folder / "targets" / "*.json")], "refresh_interval": "5s"}],
                # The job is the file's name (scrape("operator", ...) -> job="operator").
                "relabel_configs": [
                    {"source_labels": ["__meta_filepath"], "regex": r".*/([^/]+)\.json", "target_label": "job"}
                ],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    url = f"http://{host}:{port}"
    args = [
        binary,
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        "--storage.tsdb.retention.time=1d",
        f"--web.listen-address={host}:{port}",
        "--web.enable-lifecycle",  # POST /-/reload after new rules
        "--log.level=warn",
    ]
    process = ManagedProcess("prometheus", args, run_dir / "logs" / "prometheus.log", cwd=folder)
    process.start()

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as answer:
            return bool(answer.status == 200)

    try:
        process.wait_ready(ready, 30, "ready endpoint")
    except BaseException:
        process.stop()
        raise
    log(f"Prometheus up at {url} in {time.monotonic() - started:.1f}s")
    return Prometheus(url, folder, process)
