"""Many Redis write commands applied by ONE script call (the shard's group commit).

A MULTI/EXEC of N commands costs the client N packed commands and N+1 parsed replies (each
read under its own asyncio timeout); profiling the shard showed that bookkeeping, not Redis,
was most of its CPU. Here the commands travel as one flat argument list to a tiny Lua script
that replays them: one request, one integer reply, and the same all-or-nothing visibility
(a script runs atomically; with effects replication its writes reach the AOF and replicas as
one transaction).

The script touches keys it does not declare, which standalone Redis allows (the intake and
commit paths already span several hash tags; a Redis Cluster deployment needs them split).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from actors.errors import InternalError

# ARGV[1]: a JSON array of commands, each an array of strings ["XADD", "key", ...]. One
# JSON argument instead of thousands: json.dumps runs in C, while redis-py packs each argument
# in Python (that packing was the shard's biggest cost). Every value is sent as a string, so
# no number passes through Lua's float formatting. Returns the number of commands run.
APPLY_LUA = """
local cmds = cjson.decode(ARGV[1])
for i = 1, #cmds do
  redis.call(unpack(cmds[i]))
end
return #cmds
"""

# Lua's unpack() is bounded by the C stack (LUAI_MAXCSTACK = 8000 in Redis): big hashes are
# written in chunks of this many field/value pairs.
HSET_CHUNK = 1000


class WriteBatch:
    """Collects write commands (redis-py pipeline call shapes) for :meth:`execute`."""

    __slots__ = ("commands",)

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    @property
    def count(self) -> int:
        return len(self.commands)

    def _add(self, *parts: Any) -> None:
        self.commands.append([p if isinstance(p, str) else _text(p) for p in parts])

    def hset(self, key: str, mapping: Mapping[str, Any]) -> None:
        items = list(mapping.items())
        for start in range(0, len(items), HSET_CHUNK):
            flat: list[Any] = ["HSET", key]
            for field, value in items[start:start + HSET_CHUNK]:
                flat += (field, value)
            self._add(*flat)

    def xadd(self, stream: str, fields: Mapping[str, Any], *, maxlen: int | None = None,
             approximate: bool = True) -> None:
        flat: list[Any] = ["XADD", stream]
        if maxlen is not None:
            flat += ("MAXLEN", "~" if approximate else "=", maxlen)
        flat.append("*")
        for field, value in fields.items():
            flat += (field, value)
        self._add(*flat)

    def xack(self, stream: str, group: str, *ids: str) -> None:
        self._add("XACK", stream, group, *ids)

    def xdel(self, stream: str, *ids: str) -> None:
        self._add("XDEL", stream, *ids)

    def zadd(self, key: str, mapping: Mapping[str, float]) -> None:
        flat: list[Any] = ["ZADD", key]
        for member, score in mapping.items():
            flat += (score, member)
        self._add(*flat)

    def zrem(self, key: str, *members: str) -> None:
        self._add("ZREM", key, *members)

    def sadd(self, key: str, *members: str) -> None:
        self._add("SADD", key, *members)

    def srem(self, key: str, *members: str) -> None:
        self._add("SREM", key, *members)

    def expire(self, key: str, seconds: int | float) -> None:
        self._add("EXPIRE", key, int(seconds))

    def persist(self, key: str) -> None:
        self._add("PERSIST", key)

    def publish(self, channel: str, message: str) -> None:
        self._add("PUBLISH", channel, message)

    async def execute(self, redis: aioredis.Redis, sha: str) -> int:
        """Apply every collected command in one script call; returns how many ran.
        ``sha`` is the SHA1 of :data:`APPLY_LUA` (loaded again if Redis lost it)."""
        if not self.count:
            return 0
        for attempt in (1, 2):
            try:
                return int(await redis.evalsha(
                    sha, 0, json.dumps(self.commands, separators=(",", ":"))))
            except NoScriptError:
                if attempt == 2:
                    raise
                await redis.script_load(APPLY_LUA)  # a restarted Redis forgot it
        raise InternalError("unreachable")


def _text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # exact round trip (str() of a float is the same in 3.x)
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def apply_sha(redis: aioredis.Redis) -> str:
    """The SHA1 of the apply script (computed locally, nothing is sent)."""
    return str(redis.register_script(APPLY_LUA).sha)
