"""What the ingress needs per process: settings, Redis, the job store, the router.

Created once per replica (lazily, on the first request), never at import time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from actors.graph import default_registry
from actors.jobstore import JobStore
from actors.keys import Keys
from actors.queue import TaskQueue
from actors.redisconn import connect
from actors.router import IntentRouter
from actors.settings import Settings, load_settings


@dataclass
class Services:
    """Collaborators of the HTTP handlers."""

    settings: Settings
    redis: aioredis.Redis
    keys: Keys
    store: JobStore
    queue: TaskQueue
    router: IntentRouter
    capabilities: tuple[str, ...]
    started: float = 0.0
    ws_clients: int = 0
    _backlog: int = 0
    _backlog_at: float = -1e9
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def create(cls, settings: Settings | None = None) -> Services:
        settings = settings or load_settings()
        client = connect(settings.redis, retries=1)
        keys = Keys(settings.redis.key_prefix)
        store = JobStore(client, keys, shards=settings.runtime.shard_count(),
                         idempotency_ttl_s=settings.queue.idempotency_ttl_s,
                         graph_limits=settings.graph)
        caps = tuple(sorted(default_registry().capabilities()))
        return cls(settings=settings, redis=client, keys=keys, store=store,
                   queue=TaskQueue(client, keys, settings.queue),
                   router=IntentRouter.from_settings(settings), capabilities=caps,
                   started=asyncio.get_running_loop().time())

    def take_token(self, tenant: str) -> float:
        """Per-tenant token bucket (this replica): 0 when the request may pass, else the
        seconds until a token is free."""
        rate = self.settings.http.tenant_rate_per_s
        if rate <= 0:
            return 0.0
        burst = float(self.settings.http.tenant_burst)
        now = asyncio.get_running_loop().time()
        tokens, at = self._buckets.get(tenant, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[tenant] = (tokens, now)
            return (1.0 - tokens) / rate
        self._buckets[tenant] = (tokens - 1.0, now)
        return 0.0

    async def backlog(self) -> int:
        """Work waiting in the system: undelivered + unacknowledged entries of the shard
        inboxes and of every task stream. Cached for ``http.backlog_refresh_s`` so admission
        control costs no round trip per request."""
        now = asyncio.get_running_loop().time()
        if now - self._backlog_at < self.settings.http.backlog_refresh_s:
            return self._backlog
        self._backlog_at = now
        pipe = self.redis.pipeline(transaction=False)
        for shard in range(self.settings.runtime.shard_count()):
            pipe.xinfo_groups(self.keys.shard_inbox(shard))
        for capability in self.capabilities:
            for stream in self.keys.task_streams(capability):
                pipe.xinfo_groups(stream)
        total = 0
        for groups in await pipe.execute(raise_on_error=False):
            if isinstance(groups, Exception):
                continue
            for group in groups:
                total += int(group.get("lag") or 0) + int(group.get("pending") or 0)
        self._backlog = total
        return total

    async def close(self) -> None:
        await self.redis.aclose()
