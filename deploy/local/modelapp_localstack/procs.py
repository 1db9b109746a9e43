"""Start, watch and stop the stack's child processes.

Every child gets its own process group and a log file in the run folder, so
stopping the stack (or Ctrl-C) takes down whatever the child started too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .cleanup import current_ledger, process_start_time


class StackError(RuntimeError):
    """A component failed to start; the message says which and where its log is."""


def free_port() -> int:
    """A loopback port that is free right now (the OS picks it, so tests can run side by side)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def log(message: str) -> None:
    """Progress for people: one line on stderr, so stdout stays usable for `env` output.

    A closed stderr (a `| tee` that Ctrl-C stopped first) must not abort the clean-up that logs."""
    with contextlib.suppress(OSError, ValueError):
        print(f"[stack {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class ManagedProcess:
    name: str
    args: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.popen = subprocess.Popen(
                list(self.args),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        ledger = current_ledger.get()
        if ledger is not None:
            # Its own session makes it a process-group leader: the group reaches its children too.
            ledger.record("process-group", pgid=self.popen.pid, start_time=process_start_time(self.popen.pid),
                          name=self.name)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def wait_ready(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `check` until it is true; fail fast with the log tail if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise StackError(
                    f"{self.name} exited while waiting for {what} (log {self.log_path}):\n{self.log_tail()}"
                )
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(0.1)
        raise StackError(f"{self.name}: no {what} after {timeout:.0f}s (log {self.log_path}):\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL its process group (a crash, not a shutdown)."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def restart(
        self,
        check: Callable[[], bool] | None = None,
        timeout: float = 60,
        *,
        kill: bool = False,
        down_seconds: float = 0.0,
        what: str = "ready after restart",
    ) -> None:
        """Stop it (SIGTERM, or SIGKILL with kill=True), stay down for `down_seconds` (an outage), and start it
        again with the same arguments (so the same port and the same data); `check`: wait until it answers."""
        self.kill() if kill else self.stop()
        time.sleep(down_seconds)
        self.start()
        if check is not None:
            self.wait_ready(check, timeout, what)

    def stop(self, grace: float = 5.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=grace)
