"""The app reads the storage connection string from the file the operator mounts (a Secret volume), not from
its environment; a file it cannot read stops it naming the variable, never quoting a value."""

from __future__ import annotations

from pathlib import Path

import pytest
from modelapp_serving.config import ConfigError, ServingConfig

from tests.unit.test_serving_config import GOOD_ENV

pytestmark = pytest.mark.unit

CONNECTION = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net"


def test_the_connection_string_is_read_from_its_file(tmp_path: Path) -> None:
    path = tmp_path / "connectionString"
    path.write_text(CONNECTION + "\n")
    config = ServingConfig.from_env({**GOOD_ENV, "MODELAPP_MODEL_CONNECTION_STRING_FILE": str(path)})
    assert config.connection_string == CONNECTION
    assert "a2V5" not in repr(config)


def test_the_file_wins_over_a_value(tmp_path: Path) -> None:
    path = tmp_path / "connectionString"
    path.write_text(CONNECTION)
    env = {**GOOD_ENV, "MODELAPP_MODEL_CONNECTION_STRING_FILE": str(path), "MODELAPP_MODEL_CONNECTION_STRING": "x"}
    assert ServingConfig.from_env(env).connection_string == CONNECTION


def test_an_unreadable_file_names_the_variable(tmp_path: Path) -> None:
    env = {**GOOD_ENV, "MODELAPP_MODEL_CONNECTION_STRING_FILE": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match="MODELAPP_MODEL_CONNECTION_STRING_FILE: cannot read"):
        ServingConfig.from_env(env)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + CONNECTION.encode())
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        ServingConfig.from_env({**GOOD_ENV, "MODELAPP_MODEL_CONNECTION_STRING_FILE": str(binary)})
    assert "a2V5" not in str(caught.value)


def test_neither_set_means_workload_identity() -> None:
    assert ServingConfig.from_env(GOOD_ENV).connection_string is None
