"""The Ray side of the runtime: ConversationShard actors (named, detached, restartable).

``ray.remote`` is applied here and nowhere else; the logic lives in :mod:`actors.shard`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from actors.gctune import tune_gc
from actors.settings import Settings, load_settings
from actors.shard import ShardRuntime

SHARD_NAME = "{prefix}-shard-{index}"
"""Actor name of a shard; the Redis key prefix keeps deployments sharing a cluster apart."""


class ConversationShard:
    """Hosts one :class:`ShardRuntime`; starts consuming in its constructor, so a shard that
    Ray restarts after a crash resumes its conversations without being asked."""

    def __init__(self, index: int, overrides: dict[str, Any] | None = None) -> None:
        settings = load_settings(**(overrides or {}))
        tune_gc()
        self.runtime = ShardRuntime(index, settings)
        self.started = time.time()
        self.task = asyncio.get_running_loop().create_task(self.runtime.run())

    async def ping(self) -> dict[str, Any]:
        if self.task.done():
            exc = self.task.exception()
            raise RuntimeError(f"shard loop stopped: {exc!r}")
        return {**self.runtime.stats(), "uptime_s": round(time.time() - self.started, 1)}

    async def pid(self) -> int:
        import os

        return os.getpid()

    async def stop(self) -> None:
        self.runtime.stop()
        await asyncio.wait([self.task], timeout=5)


_SHARD_OPTIONS: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1,
                                  "max_concurrency": 1000}
ShardActor: Any = ray.remote(**_SHARD_OPTIONS)(ConversationShard)


def ensure_shards(settings: Settings, overrides: dict[str, Any] | None = None,
                  *, timeout_s: float = 60.0) -> list[Any]:
    """Create (or find) every shard actor and wait until each answers. Idempotent."""
    namespace = settings.runtime.ray_namespace
    handles = [
        ShardActor.options(
            name=SHARD_NAME.format(prefix=settings.redis.key_prefix, index=i),
            namespace=namespace, lifetime="detached",
            get_if_exists=True,
        ).remote(i, overrides or {})
        for i in range(settings.runtime.shard_count())
    ]
    ray.get([h.ping.remote() for h in handles], timeout=timeout_s)
    return handles


def stop_shards(settings: Settings) -> int:
    """Kill every shard actor (they are detached: nothing else stops them)."""
    stopped = 0
    for i in range(settings.runtime.shard_count()):
        try:
            handle = ray.get_actor(SHARD_NAME.format(prefix=settings.redis.key_prefix, index=i),
                                   namespace=settings.runtime.ray_namespace)
        except ValueError:
            continue
        ray.kill(handle, no_restart=True)
        stopped += 1
    return stopped
