"""Where the kubelet asks a serving container how it is: paths and ports both sides must agree on."""

from __future__ import annotations

from typing import Final

# Readiness and the startup probe: 200 once the pinned model is verified and loaded, 503 before
# (answered by the request workers, so a busy pod also leaves the Service for a moment).
READINESS_PATH: Final = "/readyz"
# Liveness: answered by a thread of the gunicorn master on its own port, apart from the request
# workers, so a burst of /predict or a starved CPU never fails it; it asks only "is the process alive".
LIVENESS_PATH: Final = "/livez"
# The workers' own /healthz stays for teams' tools; it says the same as /livez, through a worker.
HEALTH_PATH: Final = "/healthz"


def default_liveness_port(serving_port: int) -> int:
    """The liveness port when MODELAPP_LIVENESS_PORT is unset: the one after the serving port (before it at
    the top)."""
    return serving_port + 1 if serving_port < 65535 else serving_port - 1
