"""Callback delivery: POST each LAM reply to the job's ``callback_url``, retried with
backoff, never blocking the orchestrator (a bounded in-process queue drained by a task)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import httpx

log = logging.getLogger("cpa.callbacks")


class CallbackSender:
    """Fire-and-retry HTTP POSTs of LAM JSON. Order per URL is kept by one sender task."""

    def __init__(self, *, max_queued: int = 10_000, max_attempts: int = 6,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0,
                 timeout_s: float = 5.0) -> None:
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(max_queued)
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self.delivered = 0
        self.dropped = 0

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout_s)
        self._task = asyncio.create_task(self._run(), name="callbacks")

    def post(self, url: str, body: dict[str, Any]) -> None:
        """Queue a POST; drops (and counts) when the queue is full rather than blocking."""
        try:
            self._queue.put_nowait((url, body))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("callback queue full; dropped a reply for %s", url)

    async def _run(self) -> None:
        while True:
            url, body = await self._queue.get()
            await self._deliver(url, body)

    async def _deliver(self, url: str, body: dict[str, Any]) -> None:
        assert self._client is not None
        for attempt in range(1, self.max_attempts + 1):
            try:
                resp = await self._client.post(url, json=body,
                                               headers={"Content-Type": "application/json"})
                if resp.status_code < 500 and resp.status_code != 429:
                    self.delivered += 1
                    return
            except httpx.HTTPError as exc:
                log.debug("callback %s attempt %d failed: %s", url, attempt, exc)
            delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        self.dropped += 1
        log.warning("callback to %s failed %d times; giving up", url, self.max_attempts)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()
