"""Azurite (pinned in package.json) standing in for Azure Blob Storage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .binaries import REPO_ROOT
from .pki import CertPair
from .procs import ManagedProcess, StackError, free_port, log, port_open

# Azurite's well-known development account (published in Azurite's README).
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass
class Azurite:
    blob_endpoint: str
    account_name: str
    account_key: str
    process: ManagedProcess

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account_name};"
            f"AccountKey={self.account_key};BlobEndpoint={self.blob_endpoint};"
        )

    def stop(self) -> None:
        self.process.stop()

    def _port_open(self) -> bool:
        parts = urlsplit(self.blob_endpoint)
        return port_open(parts.port or 80, parts.hostname or "127.0.0.1")

    def restart(self) -> None:
        """Stop and start again: same port, same data (a persistent --location)."""
        self.process.restart(self._port_open, 30)

    def stop_for(self, seconds: float) -> None:
        """An outage: down for `seconds` (port closed), then back with the same port and data."""
        self.process.restart(self._port_open, 30, down_seconds=seconds, what="blob port after an outage")


def start_azurite(
    run_dir: Path, *, in_memory: bool = False, host: str = "127.0.0.1", oauth_cert: CertPair | None = None
) -> Azurite:
    """host: the address to bind (loopback, or the host side of a real node's network).
    oauth_cert: a second instance in OAuth mode (`--oauth basic`, HTTPS with this certificate), its own
    data folder and log; it takes bearer tokens (issuer, audience and lifetime checked)."""
    executable = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"
    if not executable.exists():
        raise StackError(f"{executable} is missing: run `npm ci` in {REPO_ROOT}")
    started = time.monotonic()
    port = free_port()
    name = "azurite" if oauth_cert is None else "azurite-oauth"
    data = run_dir / name
    data.mkdir(parents=True, exist_ok=True)
    args = [
        str(executable),
        "--blobHost", host,
        "--blobPort", str(port),
        "--disableTelemetry",
        # The Python SDK speaks a newer API version than Azurite knows.
        "--skipApiVersionCheck",
        "--loose",
    ]
    if oauth_cert is not None:
        args += ["--oauth", "basic", "--cert", str(oauth_cert.cert), "--key", str(oauth_cert.key)]
    # Azurite refuses --location together with --inMemoryPersistence.
    args += ["--inMemoryPersistence"] if in_memory else ["--location", str(data)]
    process = ManagedProcess(name, args, run_dir / "logs" / f"{name}.log", cwd=data)
    process.start()
    try:
        process.wait_ready(lambda: port_open(port, host), 30, "blob port")
    except BaseException:
        process.stop()
        raise
    endpoint = f"{'http' if oauth_cert is None else 'https'}://{host}:{port}/{ACCOUNT_NAME}"
    log(f"Azurite up at {endpoint} in {time.monotonic() - started:.1f}s")
    # The OAuth instance is reached with bearer tokens only: its object carries no key.
    return Azurite(endpoint, ACCOUNT_NAME, ACCOUNT_KEY if oauth_cert is None else "", process)
