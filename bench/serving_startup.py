"""Start-up benchmark: verified model download from Azurite vs the transport ceiling, side by side.

Publishes a random blob (1 GiB by default) to a private Azurite on loopback, then times, interleaved in
one run (alternating which goes first):

  - the verified download: `fetch_verified_model` with a pinned version (the blob's snapshot, as the
    operator pins it), If-Match on the ETag, sha256 while streaming, atomic write into the cache dir;
  - the transport ceiling: the same snapshot fetched through the same SDK client, the same ranged reads
    (`RangedBlobReader`: same concurrency, chunk size and If-Match) with nothing hashed or written;
  - the SDK's own parallel downloader (`download_blob(max_concurrency=...).readinto`) into a discarding
    sink, the same client settings: a second ceiling, so a slower transport cannot flatter the ratio;

plus, for context, writing the same number of bytes into a new file with no network (the page-cache
cost the verified download pays and the ceilings do not), `shutil.copyfile` of the file and sha256 of
the file on disk. Goal: the verified download reaches >= 80 % of the faster ceiling's throughput
(ratio of the medians).

    .venv/bin/python bench/serving_startup.py [--size-mib 1024] [--runs 3]

Writes bench/out/serving_startup.json and bench/out/serving_startup.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# bench/ is not a package: make the source roots importable when run as a script.
for _source_root in ("app", "deploy/local"):
    if str(REPO_ROOT / _source_root) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / _source_root))

from azure.storage.blob import BlobServiceClient  # noqa: E402
from modelapp_localstack.azurite import start_azurite  # noqa: E402
from modelapp_serving.config import ModelFormat, ModelSpec  # noqa: E402
from modelapp_serving.download import (  # noqa: E402
    DownloadSettings,
    RangedBlobReader,
    fetch_verified_model,
    file_sha256,
    make_blob_client,
    pinned_conditions,
)
from modelapp_serving.model_blob import PinnedVersion  # noqa: E402
from modelapp_serving.publish import publish_model  # noqa: E402

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from bench.results import OUT_DIR, command_line, write_json  # noqa: E402

_WRITE_BYTES = 64 << 20
GOAL_RATIO = 0.8


@dataclass(frozen=True)
class Timing:
    name: str
    seconds: list[float]
    size: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.median_s


class DiscardingWriter:
    """A seekable sink: measures what Azurite and the SDK deliver without hashing or writing."""

    def __init__(self) -> None:
        self._position = 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._position = offset
        return offset

    def write(self, data: bytes) -> int:
        self._position += len(data)
        return len(data)


def write_random_file(path: Path, size: int) -> None:
    with path.open("wb") as file:
        remaining = size
        while remaining:
            chunk = min(remaining, _WRITE_BYTES)
            file.write(os.urandom(chunk))
            remaining -= chunk


CPU_PIDS: list[int] = []
"""Other processes whose CPU time counts toward each run (Azurite)."""
CPU_SECONDS: dict[str, list[float]] = {}
"""Per method name: CPU seconds (this process, all threads, plus CPU_PIDS) of each run."""


def _cpu_now() -> float:
    times = os.times()
    total = times.user + times.system
    for pid in CPU_PIDS:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def time_runs(
    runs: int, action: Callable[[], None], cleanup: Callable[[], None], name: str | None = None
) -> list[float]:
    seconds = []
    for _ in range(runs):
        cleanup()
        # Every method starts with no dirty pages of an earlier one still being written back: the copy and
        # the verified download each leave 1 GiB behind, which slowed whichever ran next.
        os.sync()
        cpu_before = _cpu_now()
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
        if name is not None:
            CPU_SECONDS.setdefault(name, []).append(_cpu_now() - cpu_before)
    cleanup()
    return seconds


def write_new_file(path: Path, size: int, buffer: bytes) -> None:
    """Fill a new file with pwrite from one reused buffer: what the verified download's writes cost."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        for offset in range(0, size, len(buffer)):
            os.pwrite(fd, memoryview(buffer)[: min(len(buffer), size - offset)], offset)
    finally:
        os.close(fd)


def markdown_table(
    download: Timing, ceilings: list[Timing], context: list[Timing], settings: DownloadSettings, runs: int
) -> str:
    ceiling = max(ceilings, key=lambda timing: timing.mb_per_s)
    ratio = download.mb_per_s / ceiling.mb_per_s
    verdict = "meets" if ratio >= GOAL_RATIO else "misses"
    lines = [
        f"Model start-up: {download.size / (1 << 20):.0f} MiB blob, median of {runs} runs "
        f"(concurrency {settings.concurrency}, chunk {settings.chunk_bytes >> 20} MiB)",
        "",
        "| method | median s | MB/s | runs (s) |",
        "|---|---:|---:|---|",
    ]
    for timing in (download, *ceilings, *context):
        runs_text = ", ".join(f"{s:.2f}" for s in timing.seconds)
        lines.append(f"| {timing.name} | {timing.median_s:.2f} | {timing.mb_per_s:.0f} | {runs_text} |")
    lines += [
        "",
        f"verified download / faster transport ceiling: **{ratio:.2f}** ({verdict} the {GOAL_RATIO:.0%} goal); "
        f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=DownloadSettings.concurrency)
    parser.add_argument("--chunk-mib", type=int, default=DownloadSettings.chunk_bytes >> 20)
    parser.add_argument("--work-dir", type=Path, default=None, help="where the temp folder goes (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be at least 3 (medians)")
    size = args.size_mib << 20

    with tempfile.TemporaryDirectory(prefix="modelapp-bench-", dir=args.work_dir) as temp:
        work = Path(temp)
        print(f"writing {args.size_mib} MiB of random bytes …", file=sys.stderr)
        source = work / "model.onnx"
        write_random_file(source, size)
        # On disk in the temp folder (Azurite refuses --inMemoryPersistence together with --location).
        azurite = start_azurite(work / "run")
        try:
            print("publishing to Azurite …", file=sys.stderr)
            blob_url = f"{azurite.blob_endpoint}/bench/model.onnx"
            published = publish_model(source, blob_url, connection_string=azurite.connection_string, progress=True)
            # Pinned as the operator pins it on Azurite (no version IDs there): a snapshot taken If-Match.
            blob = BlobServiceClient.from_connection_string(azurite.connection_string).get_blob_client(
                "bench", "model.onnx"
            )
            snapshot = str(blob.create_snapshot()["snapshot"])
            spec = ModelSpec(
                url=blob_url,
                etag=published.etag,
                sha256=published.sha256,
                format=ModelFormat.ONNX,
                pin=PinnedVersion(snapshot=snapshot),
            )
            settings = DownloadSettings(
                connection_string=azurite.connection_string,
                concurrency=args.concurrency,
                chunk_bytes=args.chunk_mib << 20,
            )
            cache_dir = work / "cache"
            copy_target = work / "copy.onnx"

            def clear_cache() -> None:
                shutil.rmtree(cache_dir, ignore_errors=True)

            def download() -> None:
                result = fetch_verified_model(spec, cache_dir, settings)
                if not result.downloaded or result.size != size:
                    raise RuntimeError("the benchmark expected a fresh, complete download")

            def remove_copy() -> None:
                copy_target.unlink(missing_ok=True)

            print("timing …", file=sys.stderr)
            # Interleave so both see the same machine load; alternate which goes first.
            download_s: list[float] = []
            copy_s: list[float] = []

            def copy() -> None:
                shutil.copyfile(source, copy_target)

            hash_s: list[float] = []
            raw_s: list[float] = []
            sdk_s: list[float] = []
            write_s: list[float] = []
            raw_client = make_blob_client(spec, settings)
            write_target = work / "written.onnx"
            write_buffer = os.urandom(settings.chunk_bytes)

            def raw_download() -> None:
                # The verified download's transport exactly (client, ranges, concurrency, If-Match); the
                # chunks are dropped: nothing hashed, nothing written.
                reader = RangedBlobReader(
                    raw_client,
                    concurrency=settings.concurrency,
                    chunk_bytes=settings.chunk_bytes,
                    conditions=pinned_conditions(spec),
                )
                received = sum(len(data) for _offset, data in reader.chunks())
                if received != size:
                    raise RuntimeError(f"the ceiling received {received} of {size} bytes")

            def sdk_download() -> None:
                raw_client.download_blob(max_concurrency=settings.concurrency).readinto(DiscardingWriter())

            sdk_file_s: list[float] = []
            sdk_file_target = work / "sdk-readinto.onnx"

            def sdk_download_to_file() -> None:
                # What the SDK alone does to the same disk: its parallel downloader into a file (writes
                # included; no pin, no If-Match per range, no hash, no atomic rename).
                with sdk_file_target.open("wb") as file:
                    raw_client.download_blob(max_concurrency=settings.concurrency).readinto(file)

            def remove_sdk_file() -> None:
                sdk_file_target.unlink(missing_ok=True)

            def write_only() -> None:
                write_new_file(write_target, size, write_buffer)

            def remove_written() -> None:
                write_target.unlink(missing_ok=True)

            def hash_only() -> None:
                file_sha256(source)

            if azurite.process.popen is not None:
                CPU_PIDS.append(azurite.process.popen.pid)
            for run in range(args.runs):
                hash_s += time_runs(1, hash_only, lambda: None, "sha256_on_disk")
                write_s += time_runs(1, write_only, remove_written, "page_cache_write")
                if run % 2 == 0:
                    raw_s += time_runs(1, raw_download, lambda: None, "transport_ceiling")
                    download_s += time_runs(1, download, clear_cache, "verified_download")
                    sdk_s += time_runs(1, sdk_download, lambda: None, "sdk_parallel_downloader")
                    sdk_file_s += time_runs(1, sdk_download_to_file, remove_sdk_file, "sdk_readinto_file")
                else:
                    sdk_file_s += time_runs(1, sdk_download_to_file, remove_sdk_file, "sdk_readinto_file")
                    sdk_s += time_runs(1, sdk_download, lambda: None, "sdk_parallel_downloader")
                    download_s += time_runs(1, download, clear_cache, "verified_download")
                    raw_s += time_runs(1, raw_download, lambda: None, "transport_ceiling")
                copy_s += time_runs(1, copy, remove_copy, "copyfile")
        finally:
            azurite.stop()

    download_timing = Timing("verified download (pinned snapshot, If-Match, sha256, atomic write)", download_s, size)
    copy_timing = Timing("shutil.copyfile (same disk; context)", copy_s, size)
    raw_timing = Timing(
        "transport ceiling: same snapshot, same SDK ranged reads and If-Match, nothing hashed or written", raw_s, size
    )
    sdk_timing = Timing("SDK's own parallel downloader, same client settings, discarding (second ceiling)", sdk_s, size)
    write_timing = Timing("pwrite the same bytes into a new file, no network (context)", write_s, size)
    sdk_file_timing = Timing(
        "SDK's own download_blob().readinto(file) to the same disk, writes included, nothing hashed", sdk_file_s, size
    )
    hash_timing = Timing("sha256 of the file on disk (context)", hash_s, size)
    text = markdown_table(
        download_timing,
        [raw_timing, sdk_timing],
        [sdk_file_timing, write_timing, copy_timing, hash_timing],
        settings,
        args.runs,
    )
    command = command_line()
    text = f"Command: `{command}`\n\n" + text
    cpu_lines = [
        f"- {key}: CPU seconds per run (this process, all threads, + Azurite) "
        + ", ".join(f"{c:.2f}" for c in CPU_SECONDS.get(key, []))
        + f" over wall seconds {', '.join(f'{w:.2f}' for w in wall)}"
        for key, wall in (
            ("verified_download", download_s),
            ("transport_ceiling", raw_s),
            ("sdk_parallel_downloader", sdk_s),
            ("sdk_readinto_file", sdk_file_s),
            ("page_cache_write", write_s),
            ("sha256_on_disk", hash_s),
        )
    ]
    text += "\n\n" + "\n".join(cpu_lines)
    print(text)
    figures = {
        "size_bytes": size,
        "runs": args.runs,
        "concurrency": settings.concurrency,
        "chunk_bytes": settings.chunk_bytes,
        "goal_ratio": GOAL_RATIO,
        "ratio_verified_over_ceiling": round(
            download_timing.mb_per_s / max(raw_timing.mb_per_s, sdk_timing.mb_per_s), 3
        ),
        "ratio_verified_over_sdk_readinto_file": round(download_timing.mb_per_s / sdk_file_timing.mb_per_s, 3),
        "methods": {
            key: {
                "seconds": timing.seconds,
                "median_s": round(timing.median_s, 3),
                "mb_per_s": round(timing.mb_per_s, 1),
                "cpu_seconds": [round(c, 2) for c in CPU_SECONDS.get(key, [])],
            }
            for key, timing in (
                ("verified_download", download_timing),
                ("transport_ceiling", raw_timing),
                ("sdk_parallel_downloader", sdk_timing),
                ("sdk_readinto_file", sdk_file_timing),
                ("page_cache_write", write_timing),
                ("copyfile", copy_timing),
                ("sha256_on_disk", hash_timing),
            )
        },
    }
    write_json("serving_startup", figures, command=command)
    (OUT_DIR / "serving_startup.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
