"""Every worker refuses the same model at about the same time: exactly one of them exits for all."""

from __future__ import annotations

import os

import pytest
from modelapp_serving.refusal_token import REFUSAL_TOKEN_FD_ENV, create_refusal_token, take_refusal_token

pytestmark = pytest.mark.unit


def test_only_the_first_worker_to_refuse_takes_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    token_fd = create_refusal_token()
    try:
        monkeypatch.setenv(REFUSAL_TOKEN_FD_ENV, str(token_fd))
        taken = [take_refusal_token() for _ in range(3)]
    finally:
        os.close(token_fd)
    assert taken == [True, False, False]


def test_a_process_outside_the_gunicorn_master_always_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REFUSAL_TOKEN_FD_ENV, raising=False)
    assert take_refusal_token() and take_refusal_token()
