"""What the watch hub caches and subscribes by: one key per image tag and per model blob, and who asks.

A key names what is asked (registry host, repository, tag / account, container, blob) and under
which credentials, as a non-reversible hash: two ModelApps with different pull Secrets for one
tag are two keys, so one's credentials never answer for the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from modelapp_contract.blob import account_name_of, normalize_account_url
from modelapp_operator.api.modelapp_types import BlobLocation
from modelapp_operator.clients.blob_storage import BlobCredential, ConnectionStringCredential
from modelapp_operator.clients.registry import RegistryCredentials

AppKey = tuple[str, str]  # (namespace, name) of a ModelApp


def _secret_id(*parts: str) -> str:
    """A stable, non-reversible identity for credentials (never the credentials themselves)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ImageKey:
    host: str  # registry host[:port], lowercased
    path: str  # repository path inside the registry
    tag: str
    credentials_id: str  # "" for anonymous / the operator's own identity
    kind = "registry"  # for metrics: what kind of endpoint answers this key

    @property
    def reference(self) -> str:
        return f"{self.host}/{self.path}:{self.tag}"

    @property
    def endpoint(self) -> str:
        """The registry host (a bounded metrics label)."""
        return self.host


@dataclass(frozen=True)
class ModelKey:
    account_url: str  # normalized: lowercased scheme and host, no trailing slash
    container: str
    blob: str
    credentials_id: str  # "operator-identity" or a hash of the connection string
    kind = "storage"  # for metrics: what kind of endpoint answers this key

    @property
    def account_name(self) -> str:
        return account_name_of(self.account_url)

    @property
    def endpoint(self) -> str:
        """The storage account name (a bounded metrics label)."""
        return self.account_name

    @property
    def reference(self) -> str:
        return f"{self.account_url}/{self.container}/{self.blob}"


WatchKey = ImageKey | ModelKey


def image_key(repository: str, tag: str, credentials: RegistryCredentials | None) -> ImageKey:
    host, _, path = repository.partition("/")
    identity = _secret_id(credentials.username, credentials.password) if credentials else ""
    return ImageKey(host.lower(), path, tag, identity)


def model_key(location: BlobLocation, credential: BlobCredential) -> ModelKey:
    if isinstance(credential, ConnectionStringCredential):
        identity = "connection-string:" + _secret_id(credential.connection_string)
    else:
        identity = "operator-identity"
    return ModelKey(normalize_account_url(location.account_url), location.container, location.name, identity)
