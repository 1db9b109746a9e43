"""Operator configuration from MODELAPP_* environment variables, checked once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from modelapp_operator.receiver import ReceiverConfig
    from modelapp_operator.watch import WatchConfig

LogFormat = Literal["text", "json"]

# A namespace name, or a kopf glob over names ("team-*", "!kube-*").
_NAMESPACE = re.compile(r"^!?[a-z0-9*?][-a-z0-9*?]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9a-fA-F:]+\](:[0-9]{1,5})?$")


class ConfigError(ValueError):
    """A configuration variable is invalid; the message names the variable."""


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

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return env.get(name, "").strip()

        namespaces = tuple(n.strip() for n in get("MODELAPP_NAMESPACES").split(",") if n.strip())
        for namespace in namespaces:
            if not _NAMESPACE.match(namespace):
                raise ConfigError(
                    f"MODELAPP_NAMESPACES: {namespace!r} is not a namespace name or glob "
                    "(expected a comma-separated list such as team-a,ml-*; empty for all namespaces)"
                )

        poll = _positive_float(env, "MODELAPP_POLL_INTERVAL_SECONDS", 30.0, minimum=1.0, maximum=86400.0)
        timeout = _positive_float(env, "MODELAPP_REGISTRY_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=600.0)

        log_format = get("MODELAPP_LOG_FORMAT").lower() or "text"
        if log_format not in ("text", "json"):
            raise ConfigError(f"MODELAPP_LOG_FORMAT: {log_format!r} is not one of: text, json")

        ca_file: Path | None = None
        if get("MODELAPP_REGISTRY_CA_FILE"):
            ca_file = Path(get("MODELAPP_REGISTRY_CA_FILE"))
            if not ca_file.is_file():
                raise ConfigError(f"MODELAPP_REGISTRY_CA_FILE: {str(ca_file)!r} is not a readable file")

        insecure = frozenset(h.strip() for h in get("MODELAPP_REGISTRY_INSECURE_HOSTS").split(",") if h.strip())
        for host in insecure:
            if not _HOST.match(host):
                raise ConfigError(
                    f"MODELAPP_REGISTRY_INSECURE_HOSTS: {host!r} is not a host[:port] "
                    "(expected a comma-separated list of registry hosts reached over plain HTTP)"
                )

        liveness_port = _int(env, "MODELAPP_LIVENESS_PORT", 8081, minimum=1, maximum=65535)

        azure_hosts = frozenset(
            h.strip().lower() for h in get("MODELAPP_REGISTRY_AZURE_IDENTITY_HOSTS").split(",") if h.strip()
        )
        for host in azure_hosts:
            if not _HOST.match(host.replace("*", "x")):
                raise ConfigError(
                    f"MODELAPP_REGISTRY_AZURE_IDENTITY_HOSTS: {host!r} is not a host or host glob "
                    "(expected a comma-separated list such as *.azurecr.io)"
                )

        # Imported here: both modules import ConfigError from this one.
        from modelapp_operator.receiver import ReceiverConfig  # noqa: PLC0415
        from modelapp_operator.watch import WatchConfig  # noqa: PLC0415

        watch = WatchConfig.from_env(env)
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
            watch=watch,
            receiver=receiver,
        )


def _positive_float(env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number of seconds") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}: {raw} is out of range [{minimum:g}, {maximum:g}]")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}: {raw} is out of range [{minimum}, {maximum}]")
    return value
