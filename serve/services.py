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

    async def close(self) -> None:
        await self.redis.aclose()
