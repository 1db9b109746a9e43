"""Leave nothing behind: a ledger of what the stack made, one idempotent undo, and a janitor.

Everything the stack creates outside its own processes' memory is written to a ledger in the run
folder before (or right after) it is made: process groups, network namespaces, links, cgroups,
files outside the run folder. `undo()` reads the ledger and removes all of it, in an order that
works (processes first, then mounts, network, cgroups, files); it can run any number of times.

The stack's own `stop()` calls `undo()`. A janitor process (`python -m modelapp_localstack.cleanup`)
also holds the read end of a pipe from the stack's process: when that process dies for any reason
(Ctrl-C with output piped to a `tee` that died first, SIGKILL, a crashed test runner), the pipe
closes and the janitor runs the same `undo()`. It ignores the terminal's signals, so the Ctrl-C
that stopped its parent cannot stop it half-way.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LEDGER_NAME = "cleanup-ledger.jsonl"
CGROUP_ROOT = Path("/sys/fs/cgroup")
TERM_GRACE_SECONDS = 5.0
_RUN_DIR_VARIABLE = "MODELAPP_JANITOR_RUN_DIR"
_REMOVE_VARIABLE = "MODELAPP_JANITOR_REMOVE_RUN_DIR"


@dataclass(frozen=True)
class Ledger:
    """An append-only JSON-lines file of things to undo, kept in the run folder."""

    path: Path

    def record(self, kind: str, **fields: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as ledger:
            ledger.write(json.dumps({"kind": kind, **fields}) + "\n")
            ledger.flush()
            os.fsync(ledger.fileno())

    def entries(self) -> list[dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError):
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return []


# The ledger that processes started in this context record themselves in (see procs.ManagedProcess).
current_ledger: contextvars.ContextVar[Ledger | None] = contextvars.ContextVar("current_ledger", default=None)


@contextlib.contextmanager
def recording_into(ledger: Ledger) -> Iterator[None]:
    token = current_ledger.set(ledger)
    try:
        yield
    finally:
        current_ledger.reset(token)


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one that reused its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _run(*args: str) -> None:
    subprocess.run(list(args), capture_output=True, check=False, timeout=30)


def ancestry(pid: int) -> list[int]:
    """`pid` and its parents up to init: the stack's own process and whatever started it."""
    chain = []
    while pid > 1:
        chain.append(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return chain


def _processes_mentioning(text: str, spared: set[int]) -> list[int]:
    """Processes whose command line names `text` (the run folder): shims, helpers, children; but
    never the stack's own process or the shell that started it with `--run-dir`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        with contextlib.suppress(OSError):
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
    return found


def _cgroup_pids(relative: str) -> list[int]:
    pids: set[int] = set()
    for hierarchy in _hierarchies():
        top = hierarchy / relative.lstrip("/")
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(line) for line in procs.read_text().split())
    return sorted(pids)


def _netns_pids(name: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def _hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies (cgroups v2 has one; the unified mount has no controllers here)."""
    if not CGROUP_ROOT.is_dir():
        return []
    return [path for path in CGROUP_ROOT.iterdir() if path.is_dir() and not path.is_symlink()]


def _kill(pids: list[int], groups: list[int]) -> None:
    """SIGTERM, a short grace period, then SIGKILL; for single processes and process groups."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signum)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        if signum == signal.SIGTERM:
            deadline = time.monotonic() + TERM_GRACE_SECONDS
            while time.monotonic() < deadline and any(_alive(pid) for pid in [*pids, *groups]):
                time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes (its parent reaps it).
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _unmount_under(folder: Path) -> None:
    """Lazily unmount everything mounted below `folder`, deepest first (overlays, tmpfs, netns)."""
    prefix = str(folder.resolve()) + "/"
    for _ in range(3):
        with contextlib.suppress(OSError):
            mounts = [
                line.split()[4].encode().decode("unicode_escape")
                for line in Path("/proc/self/mountinfo").read_text().splitlines()
            ]
        targets = sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True)
        if not targets:
            return
        for target in targets:
            _run("umount", "-l", target)


def delete_nft_table(netns: str, family: str, name: str) -> None:
    """Delete an nftables table in a network namespace of the stack's; nothing if either is gone."""
    _run("nsenter", f"--net=/run/netns/{netns}", "--", "nft", "delete", "table", family, name)


def _remove_cgroup_tree(relative: str) -> None:
    for hierarchy in _hierarchies():
        top = hierarchy / relative.lstrip("/")
        if not top.is_dir():
            continue
        # rmdir children before parents; a cgroup folder only goes once its processes are gone.
        for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def undo(ledger: Ledger, run_dir: Path, *, remove_run_dir: bool) -> None:
    """Remove everything the ledger names, then (optionally) the run folder. Idempotent."""
    entries = ledger.entries()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_kind.setdefault(entry["kind"], []).append(entry)

    groups = [
        entry["pgid"] for entry in by_kind.get("process-group", [])
        # Only a group whose leader is gone or is still the process we started: pids get reused.
        if process_start_time(entry["pgid"]) in (None, entry.get("start_time"))
    ]
    spared = {os.getpid()} | {
        entry["pid"] for entry in by_kind.get("spare", [])
        if process_start_time(entry["pid"]) == entry.get("start_time")
    }
    pids = _processes_mentioning(str(run_dir), spared)
    for entry in by_kind.get("cgroup", []):
        pids += _cgroup_pids(entry["path"])
    for entry in by_kind.get("netns", []):
        pids += _netns_pids(entry["name"])
    _kill(sorted(set(pids)), groups)
    # Containers may have been started while we were killing: one more pass over their cgroups.
    for entry in by_kind.get("cgroup", []):
        _kill(_cgroup_pids(entry["path"]), [])

    # A killed kube-network-policies leaves its table: queue rules with no reader drop pod traffic.
    for entry in by_kind.get("nft-table", []):
        delete_nft_table(entry["netns"], entry["family"], entry["name"])
    _unmount_under(run_dir)
    for entry in by_kind.get("netns", []):
        _run("ip", "netns", "delete", entry["name"])
    for entry in by_kind.get("link", []):
        _run("ip", "link", "delete", entry["name"])
    for entry in by_kind.get("cgroup", []):
        _remove_cgroup_tree(entry["path"])
    for entry in by_kind.get("symlinks-into", []):
        folder = Path(entry["folder"])
        with contextlib.suppress(OSError):
            for link in folder.iterdir():
                if link.is_symlink() and os.readlink(link).startswith(str(run_dir)):
                    link.unlink(missing_ok=True)
    for entry in by_kind.get("path", []):
        path = Path(entry["path"])
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if remove_run_dir:
        _unmount_under(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class Janitor:
    """The watching process; `release()` is the normal end (after the stack's own undo)."""

    process: subprocess.Popen[bytes]
    pipe: IO[bytes]

    @classmethod
    def start(cls, run_dir: Path, ledger: Ledger, *, remove_run_dir: bool) -> Janitor:
        """Start the janitor for `run_dir`; the calling process and its ancestors are never killed."""
        for pid in ancestry(os.getpid()):
            ledger.record("spare", pid=pid, start_time=process_start_time(pid))
        log_file = (run_dir / "logs" / "janitor.log")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "modelapp_localstack.cleanup"],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Not in the terminal's process group: the Ctrl-C that stops the stack must not stop this.
                start_new_session=True,
                # The run folder goes in the environment, not the command line: undo() kills every
                # process whose command line names the run folder, and the janitor must outlive that.
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(sys.path),
                    _RUN_DIR_VARIABLE: str(run_dir),
                    _REMOVE_VARIABLE: "1" if remove_run_dir else "0",
                },
            )
        assert process.stdin is not None
        return cls(process, process.stdin)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=60)


def _watch(run_dir: Path, remove_run_dir: bool) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    # Blocks until the stack's process closes the pipe or dies.
    sys.stdin.buffer.read()
    started = time.monotonic()
    undo(Ledger(run_dir / LEDGER_NAME), run_dir, remove_run_dir=remove_run_dir)
    print(f"janitor: cleaned {run_dir} in {time.monotonic() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_watch(Path(os.environ[_RUN_DIR_VARIABLE]), os.environ.get(_REMOVE_VARIABLE) == "1"))
