"""Which storage accounts, containers and registries the operator may use for a ModelApp of a namespace.

The platform admin decides, never the tenant: rules for every namespace (MODELAPP_ALLOWED_STORAGE,
MODELAPP_ALLOWED_REGISTRIES; by default `*.blob.core.windows.net` and `*.azurecr.io`), plus rules for
some namespaces from a file the admin mounts from a ConfigMap of the operator's own namespace
(MODELAPP_ALLOWED_SOURCES_FILE); config.py reads them. A host outside the rules is refused before any
request: the operator sends nothing there, so neither its own token nor a tenant's credential.

Patterns: `host[:port]`, where a `*` label stands for exactly one DNS label (`*.azurecr.io` matches
`team.azurecr.io`, never `a.b.azurecr.io` nor `azurecr.io`), no port means the scheme's default port,
and `:*` any port. Storage entries may add `/container` (a glob over container names, `*` for all).
Pure: no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

AZURE_STORAGE_DEFAULT = "*.blob.core.windows.net"
AZURE_REGISTRY_DEFAULT = "*.azurecr.io"

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_CONTAINER_GLOB = re.compile(r"^[a-z0-9*?-]{1,63}$")
_NAMESPACE_GLOB = re.compile(r"^[a-z0-9*?][-a-z0-9*?]{0,62}$")
_DEFAULT_PORTS = {"https": 443, "http": 80}
ANY_PORT = -1
# A refusal needs the admin to change the operator's configuration (which restarts it): retry seldom.
NOT_ALLOWED_RETRY_SECONDS = 300.0


@dataclass(frozen=True)
class HostPattern:
    """`host[:port]` with whole-label `*` wildcards; port None: the scheme's default; ANY_PORT: any."""

    labels: tuple[str, ...]
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Raise ValueError (naming the pattern) when it is not a host pattern."""
        raw = text.strip().lower()
        host, port = raw, None
        if raw.count(":") == 1:
            host, _, port_text = raw.partition(":")
            if port_text == "*":
                port = ANY_PORT
            elif port_text.isdigit() and 1 <= int(port_text) <= 65535:
                port = int(port_text)
            else:
                raise ValueError(f"{text!r}: the port must be 1-65535 or *")
        labels = tuple(host.split("."))
        if not host or not all(label == "*" or _LABEL.match(label) for label in labels):
            raise ValueError(f"{text!r} is not a host[:port] pattern (a '*' stands for one whole label)")
        if "*" in labels and (labels[-1] == "*" or sum(label != "*" for label in labels) < 2):
            raise ValueError(f"{text!r} is too broad: name at least the two last labels of the domain")
        return cls(labels, port)

    def matches(self, host: str, port: int | None, default_port: int) -> bool:
        labels = host.lower().split(".")
        if len(labels) != len(self.labels):
            return False
        pairs = zip(self.labels, labels, strict=True)
        if not all((p == "*" and _LABEL.match(label)) or p == label for p, label in pairs):
            return False
        effective = default_port if port is None else port
        if self.port == ANY_PORT:
            return True
        return effective == (default_port if self.port is None else self.port)

    def __str__(self) -> str:
        host = ".".join(self.labels)
        if self.port is None:
            return host
        return f"{host}:{'*' if self.port == ANY_PORT else self.port}"


@dataclass(frozen=True)
class StorageRule:
    """An account (host pattern) and the containers in it; containers empty: every container."""

    account: HostPattern
    containers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> StorageRule:
        """`host[:port]` or `host[:port]/container-glob`; raise ValueError naming the entry."""
        host, sep, container = text.strip().partition("/")
        if sep and not _CONTAINER_GLOB.match(container):
            raise ValueError(f"{text!r}: {container!r} is not a container name or glob")
        return cls(HostPattern.parse(host), (container,) if sep and container != "*" else ())

    def allows(self, host: str, port: int | None, default_port: int, container: str) -> bool:
        if not self.account.matches(host, port, default_port):
            return False
        return not self.containers or any(fnmatch.fnmatchcase(container, glob) for glob in self.containers)

    def __str__(self) -> str:
        return f"{self.account}/{','.join(self.containers)}" if self.containers else str(self.account)


@dataclass(frozen=True)
class SourceRules:
    storage: tuple[StorageRule, ...] = ()
    registries: tuple[HostPattern, ...] = ()

    def __add__(self, other: SourceRules) -> SourceRules:
        return SourceRules(self.storage + other.storage, self.registries + other.registries)


AZURE_DEFAULTS: Final = SourceRules(
    storage=(StorageRule.parse(AZURE_STORAGE_DEFAULT),), registries=(HostPattern.parse(AZURE_REGISTRY_DEFAULT),)
)


@dataclass(frozen=True)
class AllowedSources:
    """Rules for every namespace, plus the rules of the namespaces (names or globs) listed on their own."""

    everywhere: SourceRules = AZURE_DEFAULTS
    namespaces: tuple[tuple[str, SourceRules], ...] = field(default=())

    def rules_for(self, namespace: str) -> SourceRules:
        rules = self.everywhere
        for pattern, extra in self.namespaces:
            if fnmatch.fnmatchcase(namespace, pattern):
                rules = rules + extra
        return rules


def parse_namespace_rules(document: object) -> tuple[tuple[str, SourceRules], ...]:
    """The admin's file, parsed: `{namespaces: {<name or glob>: {storage: [...], registries: [...]}}}`.
    Raise ValueError naming the entry that is wrong."""
    if not isinstance(document, Mapping) or set(document) - {"namespaces"}:
        raise ValueError("expected a mapping with one key, 'namespaces'")
    namespaces = document.get("namespaces") or {}
    if not isinstance(namespaces, Mapping):
        raise ValueError("'namespaces' must map namespace names (or globs) to their rules")
    parsed = []
    for name, entry in namespaces.items():
        if not isinstance(name, str) or not _NAMESPACE_GLOB.match(name):
            raise ValueError(f"namespaces: {name!r} is not a namespace name or glob")
        if not isinstance(entry, Mapping) or set(entry) - {"storage", "registries"}:
            raise ValueError(f"namespaces.{name}: expected 'storage' and/or 'registries' lists")
        storage = tuple(
            StorageRule.parse(item) for item in _strings(entry.get("storage"), f"namespaces.{name}.storage")
        )
        registries = tuple(
            HostPattern.parse(item) for item in _strings(entry.get("registries"), f"namespaces.{name}.registries")
        )
        parsed.append((name, SourceRules(storage, registries)))
    return tuple(parsed)


def _strings(value: object, where: str) -> Iterable[str]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}: expected a list of strings")
    return value


# --- the decisions ----------------------------------------------------------------------------------

_HOW = (
    "the platform admin allows it in MODELAPP_ALLOWED_{what} (every namespace) or for this namespace in "
    "the operator's MODELAPP_ALLOWED_SOURCES_FILE (docs/operations.md, 'Allowed accounts and registries')"
)


def storage_refusal(sources: AllowedSources, namespace: str, account_url: str, container: str) -> str | None:
    """Why the operator may not use this account and container for a ModelApp of the namespace; None: it may."""
    parts = urlsplit(account_url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = 0
    default_port = _DEFAULT_PORTS.get(parts.scheme, 443)
    if host and any(rule.allows(host, port, default_port, container) for rule in sources.rules_for(namespace).storage):
        return None
    where = parts.netloc.lower() or account_url
    return (
        f"storage account {where} (container {container}) is not allowed for namespace {namespace}: the operator "
        f"sends nothing there until {_HOW.format(what='STORAGE')}"
    )


def registry_refusal(sources: AllowedSources, namespace: str, registry: str, *, default_port: int = 443) -> str | None:
    """Why the operator may not ask this registry (`host[:port]`) for a ModelApp of the namespace; None: it may."""
    host, _, port_text = registry.lower().rpartition(":") if registry.count(":") == 1 else (registry.lower(), "", "")
    port = int(port_text) if port_text.isdigit() else None
    if any(pattern.matches(host, port, default_port) for pattern in sources.rules_for(namespace).registries):
        return None
    return (
        f"registry {registry} is not allowed for namespace {namespace}: the operator sends nothing there until "
        f"{_HOW.format(what='REGISTRIES')}"
    )
