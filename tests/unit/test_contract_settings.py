"""One settings helper for the operator and the app (modelapp_contract.settings): one boolean rule, one error form."""

from __future__ import annotations

import pytest
from modelapp_contract.settings import (
    FALSE_WORDS,
    TRUE_WORDS,
    ConfigError,
    boolean,
    choice,
    integer,
    items,
    number,
    required,
    switch,
)
from modelapp_operator.config import ReceiverConfig
from modelapp_serving.config import ServerConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("word", "meaning"), [*((w, True) for w in TRUE_WORDS), *((w, False) for w in FALSE_WORDS)])
def test_both_sides_read_a_boolean_by_the_same_rule(word: str, meaning: bool) -> None:
    for spelled in (word, word.upper(), f" {word} "):
        assert switch({"X": spelled}, "X") is meaning
        # The operator's receiver switch and the app's access log: the same words mean the same.
        token = {"MODELAPP_RECEIVER_TOKEN": "t"}
        assert ReceiverConfig.from_env({**token, "MODELAPP_RECEIVER_ENABLED": spelled}).enabled is meaning
        assert ServerConfig.from_env({"MODELAPP_ACCESS_LOG": spelled}).access_log is meaning


def test_anything_else_is_refused_never_read_as_false() -> None:
    for value in ("maybe", "2", "enabled", "t"):
        with pytest.raises(ConfigError, match=r"^X: .* is not true or false"):
            boolean({"X": value}, "X", default=False)
    assert boolean({}, "X", default=True) is True and boolean({"X": "  "}, "X", default=False) is False


def test_every_error_starts_with_the_variables_name() -> None:
    cases = (
        lambda: required({}, "X"),
        lambda: integer({"X": "1.5"}, "X", 1, low=0),
        lambda: integer({"X": "70000"}, "X", 1, low=1, high=65535),
        lambda: integer({"X": "0"}, "X", 1, low=1),
        lambda: number({"X": "soon"}, "X", 1.0, low=0.0, high=2.0),
        lambda: number({"X": "3"}, "X", 1.0, low=0.0, high=2.0),
        lambda: choice({"X": "xml"}, "X", "text", ("text", "json")),
    )
    for case in cases:
        with pytest.raises(ConfigError, match=r"^X: "):
            case()


def test_values_defaults_and_lists() -> None:
    assert integer({"X": " 7 "}, "X", 1, low=1) == 7 and integer({}, "X", 3, low=1) == 3
    assert number({"X": "0.5"}, "X", 1.0, low=0.0, high=1.0) == 0.5
    assert (
        choice({"X": "JSON"}, "X", "text", ("text", "json")) == "json" and choice({}, "X", "text", ("text",)) == "text"
    )
    assert items({"X": " a, b ,,"}, "X") == ["a", "b"] and items({}, "X") == []
