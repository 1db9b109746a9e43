"""Remove credentials from text before it reaches status, events or logs.

The rules are the contract's (modelapp_contract.redact), which the pods' termination messages go through too
before they enter status (plan/pods.py); every message the operator publishes goes through `redact` first,
and `RedactingFilter` cleans every log record.
"""

from __future__ import annotations

import logging

from modelapp_contract.redact import REDACTED, redact

__all__ = ["REDACTED", "RedactingFilter", "redact"]


class RedactingFilter(logging.Filter):
    """Logging filter that redacts the formatted message of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True
