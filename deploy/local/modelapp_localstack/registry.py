"""Debian's docker-registry (CNCF distribution) with TLS and htpasswd auth.

Its notifications stand in for ACR webhooks; they go to a URL the caller picks.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import secrets
import shutil
import ssl
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from .pki import CertificateAuthority
from .procs import ManagedProcess, StackError, free_port, log

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def _blob_path(digest: str) -> str:
    """Where an OCI layout keeps the blob `digest` (blobs/<algorithm>/<hex>)."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


@dataclass
class Registry:
    host: str
    username: str
    password: str
    ca_file: Path
    notify_token: str | None
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    def dockerconfigjson(self) -> str:
        auth = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return json.dumps({"auths": {self.host: {"username": self.username, "password": self.password,
                                                 "auth": auth}}})

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        request = urllib.request.Request(self.url + path, data=body, method=method)
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return response.status, dict(response.headers.items()), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers.items()), error.read()

    def _push_blob(self, repository: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, headers, _ = self._request("HEAD", f"/v2/{repository}/blobs/{digest}")
        if status == 200:
            return digest
        status, headers, body = self._request("POST", f"/v2/{repository}/blobs/uploads/", b"")
        if status != 202:
            raise StackError(f"blob upload start failed: {status} {body[:200]!r}")
        location = headers["Location"]
        if location.startswith("https://"):
            location = location.split("/", 3)[3]
            location = "/" + location
        separator = "&" if "?" in location else "?"
        status, _, body = self._request(
            "PUT", f"{location}{separator}digest={digest}", data,
            {"Content-Type": "application/octet-stream"},
        )
        if status != 201:
            raise StackError(f"blob upload failed: {status} {body[:200]!r}")
        return digest

    def _push_unique_layer(
        self, repository: str, path: str, files: dict[str, bytes]
    ) -> tuple[dict[str, Any], str]:
        """Push a gzipped layer holding one file of random content at `path` (and `files`); return its manifest
        descriptor and its diff ID (the uncompressed tar's digest, for the image config)."""
        tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=tar_bytes, mode="w") as archive:
            for name, payload in {path: secrets.token_hex(16).encode(), **files}.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mode = 0o644
                archive.addfile(info, io.BytesIO(payload))
        layer = gzip.compress(tar_bytes.getvalue(), mtime=0)
        descriptor = {"mediaType": OCI_LAYER, "digest": self._push_blob(repository, layer), "size": len(layer)}
        return descriptor, "sha256:" + hashlib.sha256(tar_bytes.getvalue()).hexdigest()

    def _put_manifest(self, repository: str, tag: str, manifest: dict[str, Any]) -> str:
        """PUT `manifest` as `tag`; return the digest the registry gives it."""
        data = json.dumps(manifest).encode()
        status, headers, body = self._request(
            "PUT", f"/v2/{repository}/manifests/{tag}", data, {"Content-Type": manifest["mediaType"]}
        )
        if status != 201:
            raise StackError(f"manifest push failed: {status} {body[:300]!r}")
        return headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(data).hexdigest()

    def push_oci_archive(self, archive: Path, repository: str, tag: str) -> str:
        """Push the image of an OCI archive (its index's first manifest) as `repository:tag`, blob by blob as
        the archive holds them (layers already compressed; blobs the registry has are skipped), the manifest
        with its own bytes: the pushed digest is the archive's. Return it.

        buildah's push first loaded the archive into its vfs storage, then compressed every layer again:
        31 s + 16 s for the app image on a warm machine (issue 23)."""
        with tarfile.open(archive) as tar:

            def read(name: str) -> bytes:
                member = tar.extractfile(name)
                if member is None:
                    raise StackError(f"{archive} has no {name}")
                return member.read()

            descriptor = json.loads(read("index.json"))["manifests"][0]
            manifest_bytes = read(_blob_path(descriptor["digest"]))
            manifest = json.loads(manifest_bytes)
            for blob in (manifest["config"], *manifest["layers"]):
                if self._push_blob(repository, read(_blob_path(blob["digest"]))) != blob["digest"]:
                    raise StackError(f"{archive}: blob {blob['digest']} does not match its digest")
        media_type = manifest.get("mediaType") or descriptor.get("mediaType") or OCI_MANIFEST
        status, headers, body = self._request(
            "PUT", f"/v2/{repository}/manifests/{tag}", manifest_bytes, {"Content-Type": media_type}
        )
        if status != 201:
            raise StackError(f"manifest push of {archive.name} failed: {status} {body[:300]!r}")
        return str(headers.get("Docker-Content-Digest") or descriptor["digest"])

    def push_random_image(self, repository: str, tag: str) -> str:
        """Push a small, unique, real OCI image (one layer with one file); return its digest."""
        layer, diff_id = self._push_unique_layer(repository, "payload.txt", {})
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/payload.txt"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }).encode()
        config_digest = self._push_blob(repository, config)
        return self._put_manifest(repository, tag, {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [layer],
        })

    def push_variant(
        self,
        repository: str,
        source_tag: str,
        tag: str,
        *,
        files: dict[str, bytes] | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        """Push `source_tag`'s image plus one small unique layer as `tag`; return the new digest.

        What a CI build of a code change looks like to a node: the same base layers, one new top
        layer. The manifest is rewritten (config diff_ids and layers) and pushed under `tag`.
        files (path in the image -> content) and env go into that layer and the config: a test's own
        variant of the project's image (a fault to inject), never a pulled one."""
        status, _, body = self._request("GET", f"/v2/{repository}/manifests/{source_tag}",
                                        headers={"Accept": OCI_MANIFEST})
        if status != 200:
            raise StackError(f"cannot read {repository}:{source_tag}: HTTP {status}")
        manifest = json.loads(body)
        status, _, config_body = self._request("GET", f"/v2/{repository}/blobs/{manifest['config']['digest']}")
        if status != 200:
            raise StackError(f"cannot read the config of {repository}:{source_tag}: HTTP {status}")
        config = json.loads(config_body)
        layer, diff_id = self._push_unique_layer(repository, "etc/modelapp-build-id", files or {})
        config["rootfs"]["diff_ids"].append(diff_id)
        if env:
            settings = config.setdefault("config", {})
            settings["Env"] = [*(settings.get("Env") or []), *(f"{k}={v}" for k, v in env.items())]
        config.pop("history", None)
        new_config = json.dumps(config).encode()
        config_digest = self._push_blob(repository, new_config)
        manifest["config"] = {**manifest["config"], "digest": config_digest, "size": len(new_config)}
        manifest["layers"] = [*manifest["layers"], layer]
        manifest.setdefault("mediaType", OCI_MANIFEST)
        return self._put_manifest(repository, tag, manifest)

    def resolve(self, repository: str, tag: str) -> str:
        """Tag to digest, as a client would: HEAD the manifest with the Accept headers."""
        status, headers, _ = self._request(
            "HEAD", f"/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}
        )
        if status != 200:
            raise StackError(f"cannot resolve {repository}:{tag}: HTTP {status}")
        return headers["Docker-Content-Digest"]

    def stop(self) -> None:
        self.process.stop()

    def _answers(self) -> bool:
        status, _, _ = self._request("GET", "/v2/")
        return status == 200

    def restart(self) -> None:
        """Stop and start again: same port, same config, same stored images."""
        self.process.restart(self._answers, 30)

    def stop_for(self, seconds: float) -> None:
        """An outage: down for `seconds` (port closed), then back with the same port and data."""
        self.process.restart(self._answers, 30, down_seconds=seconds, what="/v2/ after an outage")


def start_registry(
    run_dir: Path,
    ca: CertificateAuthority,
    *,
    notify_url: str | None = None,
    notify_token: str | None = None,
    host: str = "127.0.0.1",
) -> Registry:
    """host: the address to bind (loopback, or the host side of a real node's network, so the
    node's containerd and in-cluster pods reach it too)."""
    executable = shutil.which("docker-registry")
    if executable is None:
        raise StackError("docker-registry is missing: apt-get install docker-registry")
    started = time.monotonic()
    folder = run_dir / "registry"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    serving = ca.issue("registry", "modelapp-local-registry", dns_names=("localhost",),
                       ip_addresses=tuple(dict.fromkeys(("127.0.0.1", host))), server=True)
    username, password = "modelapp", secrets.token_urlsafe(16)
    htpasswd = folder / "htpasswd"
    htpasswd.write_text(f"{username}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(folder / "data")}, "delete": {"enabled": True}},
        "http": {
            "addr": f"{host}:{port}",
            "secret": secrets.token_hex(16),
            "tls": {"certificate": str(serving.cert), "key": str(serving.key)},
        },
        "auth": {"htpasswd": {"realm": "modelapp-local", "path": str(htpasswd)}},
    }
    if notify_url:
        headers = {"Authorization": [f"Bearer {notify_token}"]} if notify_token else {}
        config["notifications"] = {
            "events": {"includereferences": True},
            "endpoints": [{
                "name": "modelapp-operator",
                "url": notify_url,
                "headers": headers,
                "timeout": "2s",
                "threshold": 3,
                "backoff": "1s",
                # Pulls are not changes; only pushes matter to the operator.
                "ignoredmediatypes": ["application/octet-stream"],
                "ignore": {"actions": ["pull"]},
            }],
        }
    config_path = folder / "config.yml"
    config_path.write_text(yaml.safe_dump(config))
    process = ManagedProcess("docker-registry", [executable, "serve", str(config_path)],
                             run_dir / "logs" / "registry.log")
    process.start()
    registry = Registry(f"{host}:{port}", username, password, ca.cert_path, notify_token, process)

    def ready() -> bool:
        status, _, _ = registry._request("GET", "/v2/")
        return status == 200

    try:
        process.wait_ready(ready, 30, "/v2/")
    except BaseException:
        process.stop()
        raise
    log(f"registry up at {registry.url} in {time.monotonic() - started:.1f}s")
    return registry
