"""The gunicorn settings the app ships: defaults and their MODELAPP_* overrides."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest
from modelapp_serving import gunicorn_conf

pytestmark = pytest.mark.unit

SETTINGS_ENV = (
    "MODELAPP_WORKERS",
    "MODELAPP_WORKER_CLASS",
    "MODELAPP_THREADS",
    "MODELAPP_REUSE_PORT",
    "MODELAPP_LOG_LEVEL",
    "MODELAPP_ACCESS_LOG",
)


def load_conf(monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return importlib.reload(gunicorn_conf)


@pytest.fixture(autouse=True)
def _reload_with_the_real_env_afterwards(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield
    monkeypatch.undo()
    importlib.reload(gunicorn_conf)


def test_defaults_are_asgi_one_worker_per_cpu_and_reuse_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)))
    conf = load_conf(monkeypatch)
    assert conf.worker_class == "uvicorn_worker.UvicornWorker"
    assert conf.wsgi_app == "modelapp_serving.web:create_asgi_app()"
    assert conf.reuse_port is True
    assert conf.workers == max(2, conf._cores())  # 6 CPUs, or fewer under a cgroup quota


def test_at_least_two_workers_on_one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert load_conf(monkeypatch).workers == 2


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = load_conf(
        monkeypatch, MODELAPP_WORKERS="3", MODELAPP_THREADS="8", MODELAPP_WORKER_CLASS="sync", MODELAPP_REUSE_PORT="off"
    )
    assert (conf.workers, conf.threads, conf.worker_class, conf.reuse_port) == (3, 8, "sync", False)
    assert conf.wsgi_app == "modelapp_serving.web:create_app()"


@pytest.mark.parametrize(
    ("name", "value"),
    [("MODELAPP_REUSE_PORT", "maybe"), ("MODELAPP_WORKER_CLASS", "eventlet"), ("MODELAPP_LOG_LEVEL", "loud")],
)
def test_a_bad_value_stops_start_up_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    with pytest.raises(SystemExit, match=f"configuration error: {name}: "):
        load_conf(monkeypatch, **{name: value})
