"""The `modelapp` command line (console script `modelapp = modelapp_operator.cli:main`)."""

from modelapp_operator.cli.main import main

__all__ = ["main"]
