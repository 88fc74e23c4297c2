"""What the ingress needs per process: settings, Redis, the job store, the router.

Created once per replica (lazily, on the first request), never at import time.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from actors.errors import DependencyUnavailable
from actors.graph import default_registry
from actors.jobstore import JobStore
from actors.keys import Keys
from actors.queue import TaskQueue
from actors.redisconn import connect, redis_errors
from actors.router import IntentRouter
from actors.settings import Settings, load_settings

APPEND_LAM_LUA = """
-- A LAM message joins its conversation: dedup marker + shard inbox entry, atomically.
-- KEYS: 1 dedup marker (by message id), 2 shard inbox
-- ARGV: 1 token of this call, 2 marker ttl s, 3 inbox maxlen, 4.. entry field/value pairs
-- Returns 1 appended (or this very call already did: a retry after a lost reply), 0 a
-- repeat of a message that was appended before. The marker is written after the XADD, so
-- a failed append leaves no marker and a repeat appends.
local seen = redis.call('GET', KEYS[1])
if seen then
  if seen == ARGV[1] then return 1 end
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
APPEND_LAM_SHA = hashlib.sha1(APPEND_LAM_LUA.encode()).hexdigest()


class RedisBudget:
    """The Redis time budget of one request (``http.redis_budget_s``): ``async with`` it
    around each part of a handler that talks to Redis; the parts share the budget. Running
    out cancels the Redis call (the client drops that connection) and raises
    :class:`DependencyUnavailable` (503 + Retry-After) — a hung Redis answers in the budget,
    not after socket timeouts."""

    __slots__ = ("_t0", "_timeout", "left", "total")

    def __init__(self, seconds: float) -> None:
        self.total = seconds
        self.left = seconds
        self._t0 = 0.0
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        self._timeout = asyncio.timeout_at(self._t0 + max(self.left, 0.0))
        await self._timeout.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        self.left -= asyncio.get_running_loop().time() - self._t0
        assert self._timeout is not None
        try:
            await self._timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError as err:
            raise DependencyUnavailable(
                "redis", f"no answer within the request's Redis budget "
                f"(http.redis_budget_s = {self.total:g} s)", retry_after_s=1.0) from err
        return None


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

    def budget(self) -> RedisBudget:
        """A fresh Redis time budget for one request."""
        return RedisBudget(self.settings.http.redis_budget_s)

    def lam_append_command(self, tenant: str, conv: str, message_id: str, data: str,
                           refuse: str | None = None, token: str | None = None
                           ) -> tuple[Any, ...]:
        """The EVALSHA of one LAM message's append to its shard inbox (deduplicated by
        message id, atomically with the append); run it with :meth:`run_scripts`."""
        from actors.jobstore import shard_for

        shard = shard_for(tenant, conv, self.settings.runtime.shard_count())
        args: list[Any] = [token or uuid.uuid4().hex, self.settings.queue.idempotency_ttl_s,
                           self.store.inbox_maxlen, "k", "lam", "t", tenant, "c", conv, "d",
                           data]
        if refuse:
            args += ["refuse", refuse]
        return ("EVALSHA", APPEND_LAM_SHA, 2,
                self.keys.idempotency(tenant, f"lam-{message_id}"),
                self.keys.shard_inbox(shard), *args)

    async def run_scripts(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run EVALSHA commands (intakes, LAM appends) in one pipelined round trip, without
        redis-py's SCRIPT EXISTS round trip per pipeline; a Redis that lost the scripts
        (restart) gets them loaded and the commands that hit NOSCRIPT run again. A reply is
        the script's, or the exception of that command."""
        if not commands:
            return []
        with redis_errors("script batch"):
            if len(commands) == 1:
                try:
                    return [await self.redis.evalsha(*commands[0][1:])]
                except NoScriptError:
                    await self._load_scripts()
                    return [await self.redis.evalsha(*commands[0][1:])]
            replies = await self._pipeline(commands)
            again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if again:
                await self._load_scripts()
                for i, reply in zip(again, await self._pipeline([commands[i] for i in again]),
                                    strict=True):
                    replies[i] = reply
        return replies

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def _load_scripts(self) -> None:
        await self.redis.script_load(self.store.intake_script[1])
        await self.redis.script_load(APPEND_LAM_LUA)

    def cached_backlog(self) -> int | None:
        """The backlog reading while it is fresh (no I/O), else None."""
        now = asyncio.get_running_loop().time()
        if now - self._backlog_at < self.settings.http.backlog_refresh_s:
            return self._backlog
        return None

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
