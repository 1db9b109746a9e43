"""ServingConfig.from_env: good values, defaults, and errors that name the env var."""

from __future__ import annotations

from pathlib import Path

import pytest
from modelapp_contract.blob import parse_blob_url, redact_url
from modelapp_serving.config import ConfigError, ModelFormat, ServerConfig, ServingConfig

pytestmark = pytest.mark.unit

SHA = "ab" * 32
GOOD_ENV = {
    "MODELAPP_MODEL_URL": "https://acct.blob.core.windows.net/models/team/iris.onnx",
    "MODELAPP_MODEL_ETAG": '"0x8DC0000000000000"',
    "MODELAPP_MODEL_SHA256": SHA.upper(),
    "MODELAPP_MODEL_FORMAT": "onnx",
}


def test_good_env_gives_typed_config_with_defaults() -> None:
    config = ServingConfig.from_env(GOOD_ENV)
    assert config.model is not None
    assert config.model.sha256 == SHA
    assert config.model.format is ModelFormat.ONNX
    assert config.model.etag == '"0x8DC0000000000000"'
    assert config.cache_dir == Path("/var/cache/modelapp")
    assert config.connection_string is None
    assert not config.allow_pickle and not config.exit_on_refusal
    location = config.model.location
    assert (location.account_url, location.container, location.blob) == (
        "https://acct.blob.core.windows.net",
        "models",
        "team/iris.onnx",
    )


def test_connection_string_is_not_in_repr() -> None:
    config = ServingConfig.from_env({**GOOD_ENV, "MODELAPP_MODEL_CONNECTION_STRING": "AccountKey=secret"})
    assert config.connection_string == "AccountKey=secret"
    assert "secret" not in repr(config)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"MODELAPP_MODEL_URL": ""}, "MODELAPP_MODEL_URL"),
        ({"MODELAPP_MODEL_URL": "ftp://x/y/z"}, "MODELAPP_MODEL_URL"),
        ({"MODELAPP_MODEL_URL": "https://acct.blob.core.windows.net/only-container"}, "MODELAPP_MODEL_URL"),
        ({"MODELAPP_MODEL_ETAG": " "}, "MODELAPP_MODEL_ETAG"),
        ({"MODELAPP_MODEL_SHA256": "abc"}, "MODELAPP_MODEL_SHA256"),
        ({"MODELAPP_MODEL_FORMAT": "tensorflow"}, "MODELAPP_MODEL_FORMAT"),
        ({"MODELAPP_MODEL_FORMAT": "pickle"}, "MODELAPP_ALLOW_PICKLE"),
        ({"MODELAPP_ALLOW_PICKLE": "maybe"}, "MODELAPP_ALLOW_PICKLE"),
        ({"MODELAPP_MAX_REQUEST_BYTES": "0"}, "MODELAPP_MAX_REQUEST_BYTES"),
        ({"MODELAPP_MODEL_CACHE_DIR": "relative/dir"}, "MODELAPP_MODEL_CACHE_DIR"),
        ({"MODELAPP_DOWNLOAD_CONCURRENCY": "0"}, "MODELAPP_DOWNLOAD_CONCURRENCY"),
    ],
)
def test_bad_setting_is_refused_naming_the_env_var(change: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        ServingConfig.from_env({**GOOD_ENV, **change})


def test_missing_variable_is_named() -> None:
    env = dict(GOOD_ENV)
    del env["MODELAPP_MODEL_SHA256"]
    with pytest.raises(ConfigError, match="MODELAPP_MODEL_SHA256: required"):
        ServingConfig.from_env(env)


def test_pickle_is_accepted_only_with_opt_in() -> None:
    config = ServingConfig.from_env({**GOOD_ENV, "MODELAPP_MODEL_FORMAT": "pickle", "MODELAPP_ALLOW_PICKLE": "true"})
    assert config.model is not None
    assert config.model.format is ModelFormat.PICKLE
    assert config.allow_pickle


def test_azurite_url_keeps_the_account_in_the_account_url() -> None:
    location = parse_blob_url("http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx")
    assert location.account_url == "http://127.0.0.1:10000/devstoreaccount1"
    assert (location.container, location.blob) == ("models", "iris.onnx")
    assert location.url == "http://127.0.0.1:10000/devstoreaccount1/models/iris.onnx"


def test_redact_url_drops_sas_and_user_info() -> None:
    url = "https://user:pw@acct.blob.core.windows.net/models/iris.onnx?sv=2024&sig=SECRET#frag"
    assert redact_url(url) == "https://acct.blob.core.windows.net/models/iris.onnx"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("m.onnx", ModelFormat.ONNX), ("m.SKOPS", ModelFormat.SKOPS), ("m.joblib", ModelFormat.PICKLE)],
)
def test_format_from_suffix(name: str, expected: ModelFormat) -> None:
    assert ModelFormat.from_suffix(name) is expected


def test_unknown_suffix_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot infer"):
        ModelFormat.from_suffix("model.bin")


def test_the_refusal_setting_is_read_at_start_up() -> None:
    assert ServingConfig.from_env({**GOOD_ENV, "MODELAPP_EXIT_ON_REFUSAL": "true"}).exit_on_refusal
    with pytest.raises(ConfigError, match="MODELAPP_EXIT_ON_REFUSAL"):
        ServingConfig.from_env({**GOOD_ENV, "MODELAPP_EXIT_ON_REFUSAL": "sometimes"})


def test_server_settings_are_checked_at_start_up() -> None:
    assert ServerConfig.from_env({}) == ServerConfig(port=8080, liveness_port=8081)
    server = ServerConfig.from_env({"MODELAPP_PORT": "9000", "MODELAPP_LOG_LEVEL": "DEBUG", "MODELAPP_WORKERS": "3"})
    assert (server.port, server.liveness_port, server.log_level, server.workers) == (9000, 9001, "debug", 3)
    for name, value in (
        ("MODELAPP_PORT", "http"),
        ("MODELAPP_PORT", "70000"),
        ("MODELAPP_WORKER_CLASS", "eventlet"),
        ("MODELAPP_LOG_LEVEL", "verbose"),
        ("MODELAPP_ACCESS_LOG", "maybe"),
        ("MODELAPP_WORKERS", "0"),
    ):
        with pytest.raises(ConfigError, match=f"^{name}: "):
            ServerConfig.from_env({name: value})
