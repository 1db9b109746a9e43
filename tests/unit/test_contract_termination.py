"""The termination message a refusing pod leaves, as the app writes it and the operator reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
from modelapp_contract.termination import (
    TERMINATION_MESSAGE_MAX_BYTES,
    Refusal,
    RefusalKind,
    parse_refusal,
)
from modelapp_serving.state import report_refusal

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kind", RefusalKind.ALL)
def test_every_refusal_kind_round_trips(kind: str) -> None:
    refusal = Refusal(kind, "sha256 of x is 1111,\n expected 2222: refusing it")
    assert parse_refusal(refusal.message()) == Refusal(kind, "sha256 of x is 1111, expected 2222: refusing it")


@pytest.mark.parametrize(
    "message",
    [
        "boom",
        "Traceback (most recent call last):\n  File ...",
        "model refused (SomethingElse): not a kind we know",
        "the model refused (ModelCannotLoad): quoted in the middle of an image's own log",
        "",
    ],
)
def test_anything_else_is_not_a_refusal(message: str) -> None:
    """An image's own crash output (FallbackToLogsOnError) is never taken for a model refusal."""
    assert parse_refusal(message) is None


def test_a_long_reason_fits_the_kubelets_limit() -> None:
    message = Refusal(RefusalKind.CANNOT_LOAD, "é" * 5000).message()
    assert len(message.encode()) <= TERMINATION_MESSAGE_MAX_BYTES
    assert parse_refusal(message) is not None


def test_the_app_writes_its_refusal_where_the_kubelet_reads_it(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    log.write_text("")
    report_refusal(Refusal(RefusalKind.CHECKSUM_MISMATCH, "sha256 mismatch"), exit_container=False, termination_log=log)
    assert parse_refusal(log.read_text()) == Refusal(RefusalKind.CHECKSUM_MISMATCH, "sha256 mismatch")
    absent = tmp_path / "absent"
    report_refusal(Refusal(RefusalKind.CHECKSUM_MISMATCH, "x"), exit_container=False, termination_log=absent)
    assert not absent.exists()  # never created outside a pod
