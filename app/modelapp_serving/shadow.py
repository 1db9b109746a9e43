"""Shadow traffic for the release gate (issue 20): a stable pod also sends a share of its /predict requests to
the candidate pair and counts how often the two answers agree. Users only ever get the stable pod's answer.

Where it runs: on the ASGI worker's event loop (web.py's AsgiPredictApp), after the user's answer has been
sent, as a task of its own. So a shadowed request is never slower for its user, and a slow, failing or absent
candidate can only cost a task slot:
  - at most `max_in_flight` comparisons per worker are under way; an offer past that is dropped (counted as
    `overloaded`), never queued, so a candidate that hangs cannot grow memory or delay anything;
  - each comparison has its own total timeout; the candidate's answer is read up to ANSWER_MAX_BYTES only.

What it records (Prometheus, aggregated over the workers by the app's /metrics; the operator reads the stable
pods' /metrics directly, so the gate needs no Prometheus installed, and one that is installed sees the same
figures):
  modelapp_shadow_comparisons_total{candidate, outcome}  outcome: agreed, disagreed, error, timeout
  modelapp_shadow_latency_seconds{candidate}             the candidate's answer time (histogram)
  modelapp_shadow_dropped_total{reason}                  overloaded (no slot), unreachable (no candidate)
`candidate` is the pair the candidate's answer names in its ModelApp-Pair header ("<image digest>/<model
version>"), so figures of a replaced candidate never count for the next one; a timeout is counted for the last
pair this worker heard from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from modelapp_contract import container
from modelapp_contract.agreement import Prediction, answers_agree

from modelapp_serving.config import ShadowConfig
from modelapp_serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

ANSWER_MAX_BYTES = 4 << 20  # a candidate's answer past this is an error, not read further


class Shadow:
    """One worker's shadowing: `offer()` from the event loop, `close()` at shutdown."""

    def __init__(
        self, config: ShadowConfig, metrics: ServingMetrics, *, draw: Callable[[], float] = random.random
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._draw = draw
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._candidate = ""  # the pair the candidate last named

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def offer(self, request_body: bytes, stable_answer: bytes) -> None:
        """A /predict request the stable pod answered (200): maybe also ask the candidate. Never blocks."""
        if self.config.percent <= 0 or self._draw() * 100.0 >= self.config.percent:
            return
        if len(self._tasks) >= self.config.max_in_flight:
            self._metrics.shadow_dropped.labels("overloaded").inc()
            return
        task = asyncio.get_running_loop().create_task(self._compare(request_body, stable_answer))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("shadow comparison failed: %s", task.exception())

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # The candidate is a Service of the same cluster: never through an HTTP proxy of the environment.
                trust_env=False,
                connector=aiohttp.TCPConnector(limit=self.config.max_in_flight),
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
            )
        return self._session

    async def _compare(self, request_body: bytes, stable_answer: bytes) -> None:
        started = time.perf_counter()
        try:
            async with self._client().post(
                self.config.predict_url, data=request_body, headers={"Content-Type": "application/json"}
            ) as response:
                # A timeout or an unreadable answer is counted for the pair this worker last heard from.
                self._candidate = response.headers.get(container.PAIR_HEADER, "") or self._candidate
                status = response.status
                answer = await _read_capped(response, ANSWER_MAX_BYTES)
        except TimeoutError:
            self._count(self._candidate, "timeout", time.perf_counter() - started)
            return
        except (aiohttp.ClientConnectionError, OSError):
            # Nothing listens (no candidate now, or it is starting): not the candidate's fault, nothing to judge.
            self._metrics.shadow_dropped.labels("unreachable").inc()
            return
        except _TooLarge:
            self._count(self._candidate, "error", time.perf_counter() - started)
            return
        elapsed = time.perf_counter() - started
        if status != 200:
            self._count(self._candidate, "error", elapsed)
            return
        stable, theirs = _predictions(stable_answer), _predictions(answer)
        if theirs is None:
            self._count(self._candidate, "error", elapsed)
            return
        agreed = stable is not None and answers_agree(stable, theirs, self.config.tolerance)
        self._count(self._candidate, "agreed" if agreed else "disagreed", elapsed)

    def _count(self, candidate: str, outcome: str, seconds: float) -> None:
        self._metrics.shadow_comparisons.labels(candidate, outcome).inc()
        self._metrics.shadow_latency.labels(candidate).observe(seconds)

    async def drain(self) -> None:
        """Until the comparisons under way are done (each is bounded by its timeout)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Let the comparisons under way finish, then close the connections."""
        await self.drain()
        if self._session is not None:
            await self._session.close()


class _TooLarge(Exception):
    pass


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    body = bytearray()
    while chunk := await response.content.read(65536):
        body += chunk
        if len(body) > limit:
            response.close()
            raise _TooLarge
    return bytes(body)


def _predictions(answer: bytes) -> Prediction | None:
    """The `predictions` of a /predict answer; None when the answer is not one."""
    try:
        payload: Any = json.loads(answer)
    except (ValueError, RecursionError):
        return None
    if not isinstance(payload, dict) or "predictions" not in payload:
        return None
    predictions: Prediction = payload["predictions"]
    return predictions
