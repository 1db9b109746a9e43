"""The operator's configuration: every MODELAPP_* variable it reads, read and checked here once at start-up.

`OperatorConfig.from_env` reads them all (the watch hub's and the webhook receiver's too) with the
contract's one set of helpers (modelapp_contract.settings, which the app uses too: one boolean rule); an
invalid value raises ConfigError naming the variable, and `modelapp-operator` exits 2.
`VARIABLES` names each one with its default and meaning: `modelapp-operator --help` prints it, and a unit
test keeps it, the reads below and the docs' table the same set.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import yaml
from modelapp_contract.settings import (
    FALSE_WORDS,
    ConfigError,
    Variable,
    choice,
    integer,
    items,
    number,
    switch,
    text,
)
from modelapp_operator.plan.sources import (
    AZURE_REGISTRY_DEFAULT,
    AZURE_STORAGE_DEFAULT,
    AllowedSources,
    HostPattern,
    SourceRules,
    StorageRule,
    parse_namespace_rules,
)

__all__ = [
    "VARIABLES",
    "ConfigError",
    "LeaderElectionConfig",
    "OperatorConfig",
    "ReceiverConfig",
    "Variable",
    "WatchConfig",
]

LogFormat = Literal["text", "json"]

DEFAULT_COALESCE_SECONDS = 0.2
DEFAULT_CONCURRENCY = 16
DEFAULT_ERROR_TTL_SECONDS = 5.0
DEFAULT_RECEIVER_PORT = 8082  # 8081 is kopf's liveness endpoint
DEFAULT_METRICS_PORT = 8083

# Caps on bodies read from hosts outside the cluster (a tenant names them): a registry streaming an endless
# manifest, or a token endpoint an endless answer, fails the resolution instead of growing the operator.
MANIFEST_MAX_BYTES = 4 * 1024 * 1024  # the distribution registry's own limit for a manifest it accepts
TOKEN_RESPONSE_MAX_BYTES = 64 * 1024  # ACR's refresh and access tokens are JWTs of 1-3 KiB
STORAGE_RESPONSE_MAX_BYTES = 4 * 1024 * 1024  # a listing page of at most LIST_PAGE_SIZE snapshots, an error
SOURCES_FILE_MAX_BYTES = 1024 * 1024

# A namespace name, or a kopf glob over names ("team-*", "!kube-*").
_NAMESPACE = re.compile(r"^!?[a-z0-9*?][-a-z0-9*?]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9a-fA-F:]+\](:[0-9]{1,5})?$")


VARIABLES: tuple[Variable, ...] = (
    Variable("MODELAPP_NAMESPACES", "all", "comma-separated namespaces or globs to watch; -n/-A override it"),
    Variable("MODELAPP_POLL_INTERVAL_SECONDS", "30", "how often followed tags and blobs are resolved again"),
    Variable("MODELAPP_CHANGE_COALESCE_SECONDS", "0.2", "changes seen within this window make one reconcile"),
    Variable("MODELAPP_WATCH_CONCURRENCY", "16", "tag and blob requests one poll of an endpoint makes at once"),
    Variable("MODELAPP_WATCH_ERROR_TTL_SECONDS", "5", "how long a failed tag or blob resolution is reused"),
    Variable("MODELAPP_LOG_FORMAT", "text", "text or json"),
    Variable("MODELAPP_REGISTRY_CA_FILE", "", "extra PEM CA bundle for registries with a private CA"),
    Variable("MODELAPP_REGISTRY_INSECURE_HOSTS", "", "comma-separated registry host[:port]s reached over plain HTTP"),
    Variable(
        "MODELAPP_REGISTRY_AZURE_IDENTITY_HOSTS",
        "",
        "registries (globs, e.g. *.azurecr.io) reached with the operator's Entra ID identity when a ModelApp "
        "has no pull Secret",
    ),
    Variable("MODELAPP_REGISTRY_TIMEOUT_SECONDS", "10", "timeout of one registry or blob call"),
    Variable(
        "MODELAPP_ALLOWED_STORAGE",
        AZURE_STORAGE_DEFAULT,
        "storage accounts every namespace's ModelApps may name (host[:port][/container] patterns; none: no account)",
    ),
    Variable(
        "MODELAPP_ALLOWED_REGISTRIES",
        AZURE_REGISTRY_DEFAULT,
        "registries every namespace's ModelApps may name (host[:port] patterns; none: no registry)",
    ),
    Variable(
        "MODELAPP_ALLOWED_SOURCES_FILE",
        "",
        "YAML file (a ConfigMap of the operator's namespace) with more accounts and registries per namespace",
    ),
    Variable("MODELAPP_SECRET_CACHE_SECONDS", "10", "how long a pull or storage Secret read is reused (0: not at all)"),
    Variable("MODELAPP_LIVENESS_PORT", "8081", "port of kopf's liveness endpoint (/healthz)"),
    Variable("MODELAPP_METRICS_PORT", str(DEFAULT_METRICS_PORT), "port of Prometheus /metrics; 0 or off: none"),
    Variable("MODELAPP_METRICS_BIND", "0.0.0.0", "address /metrics listens on"),  # noqa: S104
    Variable("MODELAPP_RECEIVER_ENABLED", "on when a token is set", "true or false: the webhook receiver"),
    Variable("MODELAPP_RECEIVER_TOKEN", "", "the token webhook senders present (Authorization: Bearer only)"),
    Variable(
        "MODELAPP_RECEIVER_TOKEN_FILE",
        "",
        "a file of accepted tokens, one per line (two during a rotation), re-read when it changes (a mounted Secret)",
    ),
    Variable("MODELAPP_RECEIVER_PORT", str(DEFAULT_RECEIVER_PORT), "port of the webhook receiver"),
    Variable("MODELAPP_RECEIVER_BIND", "0.0.0.0", "address the webhook receiver listens on"),  # noqa: S104
    Variable("MODELAPP_RECEIVER_DEFAULT_REGISTRY", "", "registry host of push events that name none"),
    Variable("MODELAPP_LEADER_ELECTION", "standalone", "name of the Lease the replicas elect one active with"),
    Variable("MODELAPP_LEADER_ELECTION_NAMESPACE", "MODELAPP_POD_NAMESPACE", "namespace of that Lease"),
    Variable("MODELAPP_LEADER_ELECTION_LEASE_SECONDS", "15", "a lease not renewed this long is free to take"),
    Variable("MODELAPP_LEADER_ELECTION_RENEW_DEADLINE_SECONDS", "10", "the leader stops acting if not renewed by then"),
    Variable("MODELAPP_LEADER_ELECTION_RETRY_SECONDS", "2", "how often the Lease is renewed or tried"),
    Variable("MODELAPP_POD_NAME", "", "downward API metadata.name: this replica's identity in the Lease"),
    Variable("MODELAPP_POD_NAMESPACE", "", "downward API metadata.namespace: the operator's own namespace"),
)


# --- the helpers (the rest are the contract's: modelapp_contract.settings) -----------------------------


def _file(env: Mapping[str, str], name: str) -> Path | None:
    raw = text(env, name)
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{name}: {str(path)!r} is not a readable file")
    return path


# --- the watch hub ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchConfig:
    coalesce_seconds: float = DEFAULT_COALESCE_SECONDS
    concurrency: int = DEFAULT_CONCURRENCY
    error_ttl_seconds: float = DEFAULT_ERROR_TTL_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WatchConfig:
        return cls(
            coalesce_seconds=number(
                environ, "MODELAPP_CHANGE_COALESCE_SECONDS", DEFAULT_COALESCE_SECONDS, low=0.0, high=60.0
            ),
            concurrency=integer(environ, "MODELAPP_WATCH_CONCURRENCY", DEFAULT_CONCURRENCY, low=1, high=256),
            error_ttl_seconds=number(
                environ, "MODELAPP_WATCH_ERROR_TTL_SECONDS", DEFAULT_ERROR_TTL_SECONDS, low=0.0, high=3600.0
            ),
        )


# --- the webhook receiver --------------------------------------------------------------------------


class TokenSource:
    """The receiver's accepted tokens, from a value or a file (re-read when the mounted Secret changes).

    A file holds one token per line (blank lines and `#` comments ignored): during a rotation it holds
    the new token and the old one, so senders move one at a time and no webhook is refused meanwhile."""

    def __init__(self, value: str | None = None, file: Path | None = None) -> None:
        if (value is None) == (file is None):
            raise ValueError("give exactly one of value or file")
        self._values: tuple[bytes, ...] = _tokens(value) if value is not None else ()
        self._file = file
        self._mtime: float | None = None
        if file is not None:
            self._reload()
        if not self._values:
            raise ConfigError("the receiver token is empty")

    def _reload(self) -> None:
        assert self._file is not None
        try:
            mtime = self._file.stat().st_mtime
            if mtime != self._mtime:
                values = _tokens(self._file.read_text())
                if values:
                    self._values, self._mtime = values, mtime
        except OSError as error:
            if not self._values:
                raise ConfigError(f"MODELAPP_RECEIVER_TOKEN_FILE: cannot read {self._file}: {error.strerror}") from None

    @property
    def count(self) -> int:
        return len(self._values)

    def matches(self, candidate: str) -> bool:
        if self._file is not None:
            self._reload()
        given = candidate.encode()
        # Compared with every token, each in constant time: which one matched (or how many there are) leaks nothing.
        found = [hmac.compare_digest(given, value) for value in self._values]
        return any(found)

    def __repr__(self) -> str:
        return "TokenSource(<redacted>)"


def _tokens(raw: str) -> tuple[bytes, ...]:
    lines = (line.strip() for line in raw.splitlines())
    return tuple(line.encode() for line in lines if line and not line.startswith("#"))


@dataclass(frozen=True)
class ReceiverConfig:
    enabled: bool = False
    bind: str = "0.0.0.0"  # noqa: S104 - in the cluster the Service sends webhooks to the pod IP
    port: int = DEFAULT_RECEIVER_PORT
    token: TokenSource | None = None
    default_registry: str | None = None  # host for events that do not name one

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ReceiverConfig:
        env = os.environ if environ is None else environ
        token: TokenSource | None = None
        if text(env, "MODELAPP_RECEIVER_TOKEN") and text(env, "MODELAPP_RECEIVER_TOKEN_FILE"):
            raise ConfigError("set only one of MODELAPP_RECEIVER_TOKEN and MODELAPP_RECEIVER_TOKEN_FILE")
        if text(env, "MODELAPP_RECEIVER_TOKEN"):
            token = TokenSource(value=text(env, "MODELAPP_RECEIVER_TOKEN"))
        else:
            token_file = _file(env, "MODELAPP_RECEIVER_TOKEN_FILE")
            token = TokenSource(file=token_file) if token_file is not None else None

        wanted = switch(env, "MODELAPP_RECEIVER_ENABLED")
        enabled = token is not None if wanted is None else wanted
        if enabled and token is None:
            raise ConfigError(
                "MODELAPP_RECEIVER_ENABLED is true but no token is set: set MODELAPP_RECEIVER_TOKEN or "
                "MODELAPP_RECEIVER_TOKEN_FILE (webhooks must send it as Authorization: Bearer <token>)"
            )
        port = integer(env, "MODELAPP_RECEIVER_PORT", DEFAULT_RECEIVER_PORT, low=1, high=65535)
        bind = text(env, "MODELAPP_RECEIVER_BIND") or "0.0.0.0"  # noqa: S104
        default_registry = text(env, "MODELAPP_RECEIVER_DEFAULT_REGISTRY").lower() or None
        return cls(enabled=enabled, bind=bind, port=port, token=token, default_registry=default_registry)


# --- two replicas, one active (leader election on a Lease) ------------------------------------------

_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclass(frozen=True)
class LeaderElectionConfig:
    """client-go's leader election on a coordination.k8s.io/v1 Lease (modelapp_operator.leader): the replica
    holding the Lease acts, the others stand by. The Lease lives in the operator's own namespace, which
    tenants cannot write."""

    lease_name: str
    namespace: str  # the operator's own namespace
    identity: str  # this replica's pod name: the standby forwards webhooks to that pod's IP
    lease_seconds: float = 15.0  # client-go's defaults: 15 / 10 / 2
    renew_deadline_seconds: float = 10.0  # < lease_seconds: the leader stops acting before its lease can expire
    retry_seconds: float = 2.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LeaderElectionConfig | None:
        name = text(env, "MODELAPP_LEADER_ELECTION")
        if not name:
            return None
        if not _OBJECT_NAME.match(name) or len(name) > 253:
            raise ConfigError(f"MODELAPP_LEADER_ELECTION: {name!r} is not an object name")
        namespace = text(env, "MODELAPP_LEADER_ELECTION_NAMESPACE") or text(env, "MODELAPP_POD_NAMESPACE")
        if not namespace:
            raise ConfigError(
                "MODELAPP_LEADER_ELECTION needs the operator's own namespace: set MODELAPP_POD_NAMESPACE "
                "(downward API metadata.namespace) or MODELAPP_LEADER_ELECTION_NAMESPACE"
            )
        if not _NAMESPACE.match(namespace) or set(namespace) & set("*?!"):
            raise ConfigError(f"MODELAPP_LEADER_ELECTION_NAMESPACE: {namespace!r} is not a namespace name")
        identity = text(env, "MODELAPP_POD_NAME")
        if not identity:
            raise ConfigError("MODELAPP_LEADER_ELECTION needs MODELAPP_POD_NAME (downward API metadata.name)")
        lease = number(env, "MODELAPP_LEADER_ELECTION_LEASE_SECONDS", 15.0, low=2.0, high=600.0)
        deadline = number(env, "MODELAPP_LEADER_ELECTION_RENEW_DEADLINE_SECONDS", 10.0, low=1.0, high=600.0)
        retry = number(env, "MODELAPP_LEADER_ELECTION_RETRY_SECONDS", 2.0, low=0.1, high=60.0)
        # client-go's own checks (leaderelection.NewLeaderElector): lease > deadline > retry * 1.2.
        if not lease > deadline:
            raise ConfigError(
                "MODELAPP_LEADER_ELECTION_RENEW_DEADLINE_SECONDS must be less than "
                "MODELAPP_LEADER_ELECTION_LEASE_SECONDS"
            )
        if not deadline > retry * 1.2:
            raise ConfigError("MODELAPP_LEADER_ELECTION_RETRY_SECONDS times 1.2 must be less than the renew deadline")
        return cls(
            lease_name=name,
            namespace=namespace,
            identity=identity,
            lease_seconds=lease,
            renew_deadline_seconds=deadline,
            retry_seconds=retry,
        )


# --- where the operator may go for a namespace (plan/sources.py decides) ------------------------------


def allowed_sources(env: Mapping[str, str]) -> AllowedSources:
    """MODELAPP_ALLOWED_STORAGE / _REGISTRIES (every namespace; the Azure defaults when unset, `none`: nothing)
    and the per-namespace rules of MODELAPP_ALLOWED_SOURCES_FILE, read once at start-up."""
    try:
        storage = tuple(StorageRule.parse(item) for item in _allowed(env, "MODELAPP_ALLOWED_STORAGE"))
    except ValueError as error:
        raise ConfigError(f"MODELAPP_ALLOWED_STORAGE: {error}") from None
    try:
        registries = tuple(HostPattern.parse(item) for item in _allowed(env, "MODELAPP_ALLOWED_REGISTRIES"))
    except ValueError as error:
        raise ConfigError(f"MODELAPP_ALLOWED_REGISTRIES: {error}") from None
    path = _file(env, "MODELAPP_ALLOWED_SOURCES_FILE")
    namespaces: tuple[tuple[str, SourceRules], ...] = ()
    if path is not None:
        try:
            raw = path.read_bytes()[: SOURCES_FILE_MAX_BYTES + 1]
            if len(raw) > SOURCES_FILE_MAX_BYTES:
                raise ValueError(f"larger than {SOURCES_FILE_MAX_BYTES} bytes")
            namespaces = parse_namespace_rules(yaml.safe_load(raw) or {})
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise ConfigError(f"MODELAPP_ALLOWED_SOURCES_FILE: {path}: {str(error).splitlines()[0]}") from None
    return AllowedSources(SourceRules(storage, registries), namespaces)


def _allowed(env: Mapping[str, str], name: str) -> list[str]:
    if text(env, name).lower() == "none":
        return []
    return items(env, name) or [next(v.default for v in VARIABLES if v.name == name)]


ALLOWED_BY_DEFAULT: Final = AllowedSources()


# --- the operator ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    poll_interval_seconds: float = 30.0
    log_format: LogFormat = "text"
    registry_ca_file: Path | None = None
    registry_insecure_hosts: frozenset[str] = frozenset()
    registry_timeout_seconds: float = 10.0
    liveness_port: int = 8081
    # Registries reached with the operator's Entra ID identity when a ModelApp has no pull Secret.
    registry_azure_identity_hosts: frozenset[str] = frozenset()
    watch: WatchConfig | None = None  # change detection (coalescing, concurrency); None: defaults
    receiver: ReceiverConfig | None = None  # webhook receiver; None: off
    leader_election: LeaderElectionConfig | None = None  # two replicas, one active; None: standalone (one replica)
    metrics_port: int | None = DEFAULT_METRICS_PORT  # Prometheus /metrics; None: off
    metrics_bind: str = "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod IP
    # How long a Secret read is reused (pull and storage credentials; 0: read every time). A cold
    # start of 1,000 ModelApps sharing 10 Secrets read them 808 times; a rotated Secret is seen this
    # much later at most, and a missing one is never remembered.
    secret_cache_seconds: float = 10.0
    # The storage accounts, containers and registries each namespace's ModelApps may name (plan/sources.py).
    sources: AllowedSources = ALLOWED_BY_DEFAULT

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ

        namespaces = tuple(items(env, "MODELAPP_NAMESPACES"))
        for namespace in namespaces:
            if not _NAMESPACE.match(namespace):
                raise ConfigError(
                    f"MODELAPP_NAMESPACES: {namespace!r} is not a namespace name or glob "
                    "(expected a comma-separated list such as team-a,ml-*; empty for all namespaces)"
                )

        poll = number(env, "MODELAPP_POLL_INTERVAL_SECONDS", 30.0, low=1.0, high=86400.0)
        timeout = number(env, "MODELAPP_REGISTRY_TIMEOUT_SECONDS", 10.0, low=0.1, high=600.0)

        log_format = choice(env, "MODELAPP_LOG_FORMAT", "text", ("text", "json"))

        ca_file = _file(env, "MODELAPP_REGISTRY_CA_FILE")

        insecure = frozenset(items(env, "MODELAPP_REGISTRY_INSECURE_HOSTS"))
        for host in insecure:
            if not _HOST.match(host):
                raise ConfigError(
                    f"MODELAPP_REGISTRY_INSECURE_HOSTS: {host!r} is not a host[:port] "
                    "(expected a comma-separated list of registry hosts reached over plain HTTP)"
                )

        liveness_port = integer(env, "MODELAPP_LIVENESS_PORT", 8081, low=1, high=65535)

        metrics_port: int | None = None
        if text(env, "MODELAPP_METRICS_PORT").lower() not in FALSE_WORDS:
            metrics_port = integer(env, "MODELAPP_METRICS_PORT", DEFAULT_METRICS_PORT, low=1, high=65535)

        azure_hosts = frozenset(h.lower() for h in items(env, "MODELAPP_REGISTRY_AZURE_IDENTITY_HOSTS"))
        for host in azure_hosts:
            if not _HOST.match(host.replace("*", "x")):
                raise ConfigError(
                    f"MODELAPP_REGISTRY_AZURE_IDENTITY_HOSTS: {host!r} is not a host or host glob "
                    "(expected a comma-separated list such as *.azurecr.io)"
                )

        secret_cache = number(env, "MODELAPP_SECRET_CACHE_SECONDS", 10.0, low=0.0, high=3600.0)

        receiver = ReceiverConfig.from_env(env)
        return cls(
            namespaces=namespaces,
            poll_interval_seconds=poll,
            log_format="json" if log_format == "json" else "text",
            registry_ca_file=ca_file,
            registry_insecure_hosts=insecure,
            registry_timeout_seconds=timeout,
            liveness_port=liveness_port,
            registry_azure_identity_hosts=azure_hosts,
            watch=WatchConfig.from_env(env),
            receiver=receiver,
            leader_election=LeaderElectionConfig.from_env(env),
            metrics_port=metrics_port,
            metrics_bind=text(env, "MODELAPP_METRICS_BIND") or "0.0.0.0",  # noqa: S104
            secret_cache_seconds=secret_cache,
            sources=allowed_sources(env),
        )
