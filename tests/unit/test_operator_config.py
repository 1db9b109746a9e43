"""Operator configuration: defaults, and start-up errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from modelapp_operator.__main__ import main
from modelapp_operator.config import ConfigError, OperatorConfig

pytestmark = pytest.mark.unit


def test_defaults() -> None:
    config = OperatorConfig.from_env({})
    assert config.namespaces == () and config.clusterwide
    assert config.poll_interval_seconds == 30.0
    assert config.log_format == "text"
    assert config.registry_ca_file is None and config.registry_insecure_hosts == frozenset()


def test_values(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    config = OperatorConfig.from_env(
        {
            "MODELAPP_NAMESPACES": " team-a, ml-* ,",
            "MODELAPP_POLL_INTERVAL_SECONDS": "12.5",
            "MODELAPP_LOG_FORMAT": "JSON",
            "MODELAPP_REGISTRY_CA_FILE": str(ca),
            "MODELAPP_REGISTRY_INSECURE_HOSTS": "127.0.0.1:5000,registry.local",
        }
    )
    assert config.namespaces == ("team-a", "ml-*") and not config.clusterwide
    assert config.poll_interval_seconds == 12.5
    assert config.log_format == "json"
    assert config.registry_ca_file == ca
    assert config.registry_insecure_hosts == {"127.0.0.1:5000", "registry.local"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MODELAPP_NAMESPACES", "Team_A"),
        ("MODELAPP_POLL_INTERVAL_SECONDS", "soon"),
        ("MODELAPP_POLL_INTERVAL_SECONDS", "0"),
        ("MODELAPP_LOG_FORMAT", "xml"),
        ("MODELAPP_REGISTRY_CA_FILE", "/nonexistent/ca.pem"),
        ("MODELAPP_REGISTRY_INSECURE_HOSTS", "http://x/"),
        ("MODELAPP_LIVENESS_PORT", "70000"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: "):
        OperatorConfig.from_env({name: value})


def test_main_exits_2_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELAPP_POLL_INTERVAL_SECONDS", "-1")
    assert main([]) == 2
    assert "MODELAPP_POLL_INTERVAL_SECONDS" in capsys.readouterr().err


@pytest.mark.parametrize("leader_election", [True, False])
def test_main_needs_no_password_database_entry(monkeypatch: pytest.MonkeyPatch, leader_election: bool) -> None:
    """The image runs as a bare UID: kopf's default identity (getpass.getuser) raised KeyError there and the
    operator exited at start-up in its pod; main names the replica itself."""
    import getpass

    import kopf

    def no_entry() -> str:
        raise KeyError("getpwuid(): uid not found: 10001")

    seen: dict[str, object] = {}
    monkeypatch.setattr(getpass, "getuser", no_entry)
    monkeypatch.setattr(kopf, "run", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("MODELAPP_METRICS_PORT", "off")
    if leader_election:
        monkeypatch.setenv("MODELAPP_LEADER_ELECTION", "modelapp-operator-leader")
        monkeypatch.setenv("MODELAPP_POD_NAMESPACE", "modelapp-system")
        monkeypatch.setenv("MODELAPP_POD_NAME", "modelapp-operator-abc12")
    assert main(["--liveness", "off"]) == 0
    identity = seen["identity"]
    assert isinstance(identity, str) and identity
    if leader_election:
        assert identity == "modelapp-operator-abc12"
