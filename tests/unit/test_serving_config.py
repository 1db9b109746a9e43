"""ServingConfig.from_env: good values, defaults, and errors that name the env var."""

from __future__ import annotations

from pathlib import Path

import pytest
from modelapp_serving.config import ConfigError, ModelFormat, ServingConfig
from modelapp_serving.model_blob import parse_blob_url, redact_url

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
    assert config.port == 8080
    assert config.connection_string is None
    assert not config.allow_pickle
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
        ({"MODELAPP_PORT": "http"}, "MODELAPP_PORT"),
        ({"MODELAPP_PORT": "70000"}, "MODELAPP_PORT"),
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
    with pytest.raises(ConfigError, match="MODELAPP_MODEL_SHA256 is required"):
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
