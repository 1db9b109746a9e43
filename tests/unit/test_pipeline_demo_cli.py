"""The demo's command line (the run itself is tests/cluster/test_deploy_demo.py)."""

from __future__ import annotations

import pytest
from modelapp_localstack import demo

pytestmark = pytest.mark.unit


def test_help_names_once_and_cleanup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--once" in out and "Ctrl-C" in out and "cleans up" in out


def test_unknown_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--twice"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --twice" in capsys.readouterr().err
