"""A steady stream of /predict requests through a Service, recording every answer.

Runs in a thread of the test process; the host reaches Services through the real node's network
(node.py), as a client on the cluster network would.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SAMPLE_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5], [5.9, 3.0, 4.2, 1.5]]


@dataclass
class Answer:
    at: float
    status: int
    predictions: Any = None
    error: str | None = None
    pair: str | None = None  # the ModelApp-Pair header: "<image digest>/<model version>" of the pod that answered


@dataclass
class ServiceLoad:
    """POST /predict to `host:port` at `rate` requests per second until stopped."""

    host: str
    port: int
    rate: float = 25.0
    timeout: float = 5.0
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ServiceLoad:
        self._thread = threading.Thread(target=self._run, name="service-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)
        return self.answers

    def _run(self) -> None:
        body = json.dumps({"instances": SAMPLE_ROWS}).encode()
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.answers.append(self._one(body))
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _one(self, body: bytes) -> Answer:
        # A new connection per request: each request is balanced by kube-proxy on its own.
        started = time.monotonic()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                return Answer(started, response.status, error=payload[:200].decode(errors="replace"))
            return Answer(started, 200, json.loads(payload)["predictions"], pair=response.getheader("ModelApp-Pair"))
        except (OSError, http.client.HTTPException, ValueError) as error:
            return Answer(started, 0, error=f"{type(error).__name__}: {error}")
        finally:
            connection.close()

    def summary(self) -> dict[str, Any]:
        answers = list(self.answers)
        duration = (answers[-1].at - answers[0].at) if len(answers) > 1 else 0.0
        return {
            "requests": len(answers),
            "failed": sum(1 for answer in answers if answer.status != 200),
            "seconds": round(duration, 1),
            "rate": round(len(answers) / duration, 1) if duration else 0.0,
            "answers": Counter(json.dumps(answer.predictions) for answer in answers if answer.status == 200),
            "errors": Counter(answer.error for answer in answers if answer.error),
        }
