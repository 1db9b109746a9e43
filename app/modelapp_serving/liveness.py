"""The liveness endpoint, served by a thread of the gunicorn master on a port of its own.

Kubernetes' guidance: liveness answers "is the process alive", never "is it fast". Answered by the
request workers, a burst of /predict or a starved CPU delayed /healthz past the probe's time-out and
the kubelet killed healthy pods (issue 19). The master forks, reaps and restarts the workers and kills
one that stops heart-beating (gunicorn's `timeout`), so a live master is a live server. One request at
a time with a short socket time-out: whoever else reaches the port cannot make it hold many threads.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import threading
from typing import Any

from modelapp_contract.probes import HEALTH_PATH, LIVENESS_PATH

log = logging.getLogger(__name__)

_LIVE_BODY = b'{"live":true}'
_NOT_FOUND_BODY = b'{"error":"not found","status":404}'
REQUEST_TIMEOUT_SECONDS = 2.0


class _LivenessHandler(http.server.BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT_SECONDS
    server_version = "modelapp-liveness"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        found = path in (LIVENESS_PATH, HEALTH_PATH)
        body = _LIVE_BODY if found else _NOT_FOUND_BODY
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a probe every few seconds is not worth a log line


class LivenessServer:
    """GET /livez (and /healthz) → 200 {"live": true}, from a daemon thread of the process that starts it."""

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - the kubelet probes the pod IP
        self._server = http.server.HTTPServer((host, port), _LivenessHandler, bind_and_activate=False)
        self._server.allow_reuse_address = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._server.server_bind()
        self._server.server_activate()
        self._thread = threading.Thread(target=self._server.serve_forever, name="modelapp-liveness", daemon=True)
        self._thread.start()
        log.info("liveness on port %d (%s)", self.port, LIVENESS_PATH)

    def close_inherited_socket(self) -> None:
        """In a forked worker: drop the copy of the listening socket (the thread that serves it stayed in
        the master), so only the master ever holds the port."""
        with contextlib.suppress(OSError):
            self._server.socket.close()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
