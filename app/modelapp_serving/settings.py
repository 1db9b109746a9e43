"""The serving app's one set of helpers for reading `MODELAPP_*` settings (config.py and gunicorn_conf.py).

Each helper names the variable in its error, so a bad setting stops start-up with a message a person can act on.
"""

from __future__ import annotations

from collections.abc import Mapping

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the env var."""


def env_required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is required and not set")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int | None = None) -> int:
    """An integer in [low, high]; unset or blank: default."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name} must be {bounds}, not {value}")
    return value


def env_bool(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    """true/false (also 1/0, yes/no, on/off); unset or blank: default."""
    raw = env.get(name, "")
    lowered = raw.strip().lower()
    if not lowered:
        return default
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")
