"""Reading `MODELAPP_*` settings: one set of helpers for the operator and the app, with one boolean rule.

Every helper takes the environment as a mapping and the variable's name; surrounding blanks are ignored, and
unset and blank mean the same: the default. A bad value raises ConfigError whose message starts with the
variable's name (`NAME: what is wrong`), so start-up stops with a message a person can act on.

The boolean rule, on both sides: true, yes, on or 1 mean true; false, no, off or 0 mean false; in any case.
Anything else is refused, never read as false.

`Variable` describes one setting (name, default, meaning) for `--help` (`environment_help`) and the docs'
tables, which a unit test keeps in step with what each side reads.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable first."""


@dataclass(frozen=True)
class Variable:
    """One variable a program reads, as its `--help` shows it."""

    name: str
    default: str  # as shown; "" when unset means off or none
    meaning: str


def text(env: Mapping[str, str], name: str) -> str:
    """The value without surrounding blanks; "" when unset."""
    return env.get(name, "").strip()


def required(env: Mapping[str, str], name: str) -> str:
    value = text(env, name)
    if not value:
        raise ConfigError(f"{name}: required and not set")
    return value


def integer(env: Mapping[str, str], name: str, default: int, *, low: int, high: int | None = None) -> int:
    """An integer in [low, high]; unset or blank: default."""
    return _bounded(env, name, default, int, "an integer", low, high)


def number(env: Mapping[str, str], name: str, default: float, *, low: float, high: float) -> float:
    """A number in [low, high]; unset or blank: default."""
    return _bounded(env, name, default, float, "a number", low, high)


N = TypeVar("N", int, float)


def _bounded(
    env: Mapping[str, str], name: str, default: N, parse: Callable[[str], N], what: str, low: N, high: N | None
) -> N:
    raw = text(env, name)
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not {what}") from None
    if value < low or (high is not None and value > high):
        bounds = f"[{low:g}, {high:g}]" if high is not None else f"[{low:g}, ...]"
        raise ConfigError(f"{name}: {value:g} is out of range {bounds}")
    return value


def switch(env: Mapping[str, str], name: str) -> bool | None:
    """A boolean by the one rule (see the module); unset or blank: None."""
    raw = text(env, name)
    lowered = raw.lower()
    if not lowered:
        return None
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ConfigError(f"{name}: {raw!r} is not true or false (also yes/no, on/off, 1/0)")


def boolean(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    """A boolean by the one rule; unset or blank: default."""
    value = switch(env, name)
    return default if value is None else value


def choice(env: Mapping[str, str], name: str, default: str, choices: Iterable[str]) -> str:
    """One of choices, compared in lower case; unset or blank: default."""
    allowed = tuple(choices)
    value = text(env, name).lower() or default
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of: {', '.join(allowed)}")
    return value


def file_text(env: Mapping[str, str], name: str) -> str | None:
    """The content of the file the variable names, without surrounding blanks (a mounted Secret's key); None
    when unset. ConfigError naming the variable when the file cannot be read (never its content)."""
    path = text(env, name)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(f"{name}: cannot read {path}: {reason}") from None


def items(env: Mapping[str, str], name: str) -> list[str]:
    """A comma-separated list, blanks dropped."""
    return [item.strip() for item in text(env, name).split(",") if item.strip()]


def environment_help(variables: Iterable[Variable], *, heading: str = "Environment:", width: int = 120) -> str:
    """A `--help` section listing variables with their meanings and defaults."""
    rows = [
        (variable.name, variable.meaning + (f" (default: {variable.default})" if variable.default else ""))
        for variable in variables
    ]
    column = max(len(name) for name, _ in rows) + 2
    indent = " " * (column + 2)
    lines = [
        textwrap.fill(meaning, width, initial_indent=f"  {name:<{column}}", subsequent_indent=indent)
        for name, meaning in rows
    ]
    return "\n".join([heading, *lines, ""])
