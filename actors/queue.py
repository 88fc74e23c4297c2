"""The durable task queue: Redis Streams with consumer groups, fenced leases, delayed
retries in a sorted set and a replayable dead-letter stream (D2, D5, D8).

Delivery is at least once. A consumer *leases* an entry by reading it through the group
``cpa``; the lease's epoch is the entry's delivery count. Every write that depends on still
holding the lease (renewing it, committing a result, giving it back, dead-lettering it) runs
in one Lua script that first checks — with ``XPENDING stream cpa id id 1`` — that the entry
is still pending for the same consumer with the same delivery count. A consumer whose entry
was reclaimed by another (``XAUTOCLAIM`` bumps the count) is therefore *fenced*: its late
result is dropped, not committed twice.

Acknowledged entries are deleted (``XACK`` + ``XDEL``), so a stream's length is its backlog
plus what is in flight. ``MAXLEN ~ stream_maxlen`` on every ``XADD`` is a last-resort cap
against unbounded memory, not a retention policy: reaching it would trim the oldest waiting
entries, so ops alert on :meth:`TaskQueue.depth` long before.

Atomicity across hash tags: :meth:`~TaskQueue.complete` (task stream → shard inbox),
:meth:`~TaskQueue.reclaim` (→ DLQ), :meth:`~TaskQueue.move_due` and
:meth:`~TaskQueue.replay_dead` touch keys of two hash tags in one script. That is atomic on
one Redis server (our deployment, D4); on a Redis Cluster they would have to become
"write the target first, then the fenced ack", with consumers deduplicating by id.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT, FieldT

from actors.errors import InternalError, NotFound, ValidationFailed
from actors.keys import Keys
from actors.redisconn import redis_errors, socket_timeout_s
from actors.settings import QueueSettings

GROUP: Final = "cpa"
"""The consumer group every stream is read through."""

DEFAULT_WEIGHTS: Final = (6, 3, 1)
"""Shares of high, normal and low among the slots handed out under full load."""

_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_BLOCK_MARGIN_MS: Final = 250

# ------------------------------------------------------------------------- Lua scripts

# Shared fence: is `id` still pending for `consumer` with exactly `deliveries` deliveries?
# redis.pcall: a stream or group that vanished (purged, Redis lost it) means "not ours".
_OWNED = """
local function owned(stream, group, id, consumer, deliveries)
  local p = redis.pcall('XPENDING', stream, group, id, id, 1)
  if type(p) ~= 'table' or p.err or #p == 0 then return false end
  return p[1][1] == id and p[1][2] == consumer and p[1][4] == tonumber(deliveries)
end
"""

# Reads up to ARGV[3] new entries: the replica's own stream (KEYS[5]) first, then the
# priority streams KEYS[2..4] by the weighted pattern ARGV[4] (digits 1/2/3 = high/normal/
# low) starting at the shared cursor KEYS[1]. Every priority first gets the slots the
# pattern gives it; slots a stream could not fill go to high, then normal, then low. The
# cursor advances by the slots actually filled, so consecutive reads (by any consumer)
# walk the pattern without gaps. Returns {1, {{stream, entries}...}}, or when nothing was
# there {0, {last id of each stream}} for the blocking wake-up read.
_READ = """
local group, consumer, want, pattern = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out = {}
local function take(key, n)
  if n <= 0 then return 0 end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', key, '>')
  if not r or #r[1][2] == 0 then return 0 end
  out[#out + 1] = {key, r[1][2]}
  return #r[1][2]
end
local got = 0
if #KEYS == 5 then got = take(KEYS[5], want) end
local left = want - got
if left > 0 then
  local plen = string.len(pattern)
  local cur = tonumber(redis.call('GET', KEYS[1]) or '0') % plen
  local share = {0, 0, 0}
  for i = 0, left - 1 do
    local p = tonumber(string.sub(pattern, (cur + i) % plen + 1, (cur + i) % plen + 1))
    share[p] = share[p] + 1
  end
  local taken = 0
  for p = 1, 3 do taken = taken + take(KEYS[p + 1], share[p]) end
  for p = 1, 3 do
    if taken >= left then break end
    taken = taken + take(KEYS[p + 1], left - taken)
  end
  if taken > 0 then redis.call('SET', KEYS[1], (cur + taken) % plen) end
  got = got + taken
end
if got > 0 then return {1, out} end
local last = {}
for i = 2, #KEYS do
  local e = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  if #e > 0 then last[#last + 1] = e[1][1] else last[#last + 1] = '0-0' end
end
return {0, last}
"""

# Fenced renewal. XCLAIM to the same consumer with min-idle 0 resets the idle time; JUSTID
# keeps the delivery count (the lease epoch) unchanged.
_HEARTBEAT = _OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
if #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID') == 0 then
  return 0
end
if KEYS[2] then
  local status = redis.call('HGET', KEYS[2], 'status')
  if status == 'cancelled' or status == 'failed' or status == 'succeeded' then return 2 end
end
return 1
"""

RENEWED, JOB_OVER = 1, 2
"""Answers of :meth:`TaskQueue.renew` besides 0 (the lease was lost)."""

# Fenced move: if the lease is still ours, XADD ARGV[6..] to KEYS[2], then XACK + XDEL the
# leased entry — all or nothing. Used to commit a result, to give an entry back and to
# dead-letter a leased entry. Returns the new entry id, or false when the lease was lost.
_MOVE = _OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return false end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*'}
for i = 6, #ARGV do args[#args + 1] = ARGV[i] end
local new_id = redis.call(unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]); redis.call('XDEL', KEYS[1], ARGV[2])
return new_id
"""

# Many fenced moves (``_MOVE`` each) in one call. ARGV[1]: JSON list of items
# [stream, target, group, id, consumer, deliveries, maxlen, field, value, ...]; ARGV[2]: JSON
# list of [channel, message] to PUBLISH after them. Returns per item the new id or false.
_COMPLETE_MANY = _OWNED + """
local items = cjson.decode(ARGV[1])
local out = {}
for i = 1, #items do
  local it = items[i]
  if owned(it[1], it[3], it[4], it[5], it[6]) then
    local args = {'XADD', it[2], 'MAXLEN', '~', it[7], '*'}
    for j = 8, #it do args[#args + 1] = it[j] end
    out[i] = redis.call(unpack(args))
    redis.call('XACK', it[1], it[3], it[4]); redis.call('XDEL', it[1], it[4])
  else
    out[i] = false
  end
end
local pubs = cjson.decode(ARGV[2])
for i = 1, #pubs do redis.call('PUBLISH', pubs[i][1], pubs[i][2]) end
return out
"""

# XAUTOCLAIM entries idle >= ARGV[3] ms; one whose delivery count now exceeds ARGV[6] goes
# to the DLQ KEYS[2] (with its stream, id, reason, fields as JSON) and is acked + deleted
# in the same step. Ids of entries deleted while pending (trimmed, purged) are acked —
# Redis >= 7 already drops them from the PEL; 6.2 reports them as nil entries.
_RECLAIM = """
local group, consumer, limit = ARGV[1], ARGV[2], tonumber(ARGV[6])
local r = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local leases, dead = {}, {}
for _, entry in ipairs(r[2]) do
  local id, kv = entry[1], entry[2]
  if not kv then redis.call('XACK', KEYS[1], group, id)
  else
    local n = redis.call('XPENDING', KEYS[1], group, id, id, 1)[1][4]
    if n > limit then
      local f = {}
      for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
      local reason = 'poison: delivered ' .. (n - 1) .. ' times'
      local did = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*',
        'stream', KEYS[1], 'id', id, 'reason', reason, 'ts', ARGV[7],
        'deliveries', n - 1, 'tenant', f['tenant'] or '', 'f', cjson.encode(f))
      redis.call('XACK', KEYS[1], group, id); redis.call('XDEL', KEYS[1], id)
      dead[#dead + 1] = {did, id, kv, n - 1, reason}
    else
      leases[#leases + 1] = {id, kv, n}
    end
  end
end
for _, id in ipairs(r[3] or {}) do redis.call('XACK', KEYS[1], group, id) end
return {r[1], leases, dead}
"""

# Move due members of the sorted set KEYS[1] (scored by due time) to their streams
# KEYS[i] (member ARGV[i], JSON {"u", "s", "f"}). ZREM decides who moves a member: of
# several movers racing, exactly one sees ZREM return 1 and XADDs it.
_MOVE_DUE = """
local now, moved = tonumber(ARGV[2]), 0
for i = 3, #ARGV do
  local member = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], member)
  if score and tonumber(score) <= now and redis.call('ZREM', KEYS[1], member) == 1 then
    local args = {'XADD', KEYS[i - 1], 'MAXLEN', '~', ARGV[1], '*'}
    for k, v in pairs(cjson.decode(member)['f']) do args[#args + 1] = k; args[#args + 1] = v end
    redis.call(unpack(args))
    moved = moved + 1
  end
end
return moved
"""

# Replay a dead letter KEYS[1]/ARGV[1] to its stream KEYS[2]: XADD its fields, XDEL it.
_REPLAY = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local kv, f = e[1][2], {}
for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
if f['stream'] ~= KEYS[2] then return false end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*'}
for k, v in pairs(cjson.decode(f['f'])) do args[#args + 1] = k; args[#args + 1] = v end
local new_id = redis.call(unpack(args))
redis.call('XDEL', KEYS[1], ARGV[1])
return new_id
"""

# ------------------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class Lease:
    """One entry handed to one consumer: ``fields`` holds the JSON payload in ``d`` plus
    routing fields (``job``, ``step``, …); ``deliveries`` is the delivery count and lease
    epoch (1 on the first delivery, +1 per reclaim). The lease holds while ``(consumer,
    deliveries)`` still match the entry's pending record — :meth:`TaskQueue.heartbeat`."""

    stream: str
    entry_id: str
    fields: dict[str, str]
    consumer: str
    deliveries: int

    def payload(self) -> Any:
        """The decoded JSON payload of field ``d``."""
        try:
            return json.loads(self.fields["d"])
        except (KeyError, ValueError) as exc:
            raise ValidationFailed(
                f"{self.stream}/{self.entry_id}.d", self.fields.get("d"),
                "must hold the entry's JSON payload",
            ) from exc


@dataclass(frozen=True, slots=True)
class DeadEntry:
    """One dead letter: its DLQ ``entry_id`` (what replay/purge take), the ``stream`` it
    came from and goes back to on replay, its ``original_id`` there ('' when dead-lettered
    without one), the original ``fields``, the ``reason``, when (``ts``, epoch s, the
    queue's clock), how often it had been delivered and its ``tenant`` field if any."""

    entry_id: str
    stream: str
    original_id: str
    fields: dict[str, str]
    reason: str
    ts: float
    deliveries: int
    tenant: str | None


def task_fields(payload: Any, **routing: str | int) -> dict[str, str]:
    """Entry fields for ``payload`` (JSON in ``d``) plus routing fields as strings."""
    fields = {"d": json.dumps(payload, separators=(",", ":"), ensure_ascii=False)}
    fields.update({name: str(value) for name, value in routing.items()})
    return fields


def delayed_member(stream: str, fields: Mapping[str, str]) -> str:
    """The sorted-set member :meth:`TaskQueue.schedule` writes and :meth:`~TaskQueue.move_due`
    moves (unique per call); for callers that ZADD it inside their own transaction."""
    entry = dict(_check_fields(fields))
    return json.dumps({"u": uuid.uuid4().hex, "s": stream, "f": entry},
                      separators=(",", ":"), ensure_ascii=False)


def dead_letter_fields(stream: str, entry_id: str, fields: Mapping[str, str], reason: str,
                       deliveries: int, ts: float) -> dict[str, str]:
    """The DLQ entry for ``fields`` of ``stream`` (for callers that XADD it inside their own
    transaction, like the shard dead-lettering a step whose retries are exhausted)."""
    return {
        "stream": stream, "id": entry_id, "reason": reason, "ts": repr(ts),
        "deliveries": str(deliveries), "tenant": fields.get("tenant", ""),
        "f": json.dumps(dict(fields), separators=(",", ":"), ensure_ascii=False),
    }


# ------------------------------------------------------------------------- the queue


class TaskQueue:
    """Streams, leases, delayed retries and the DLQ on one Redis (see the module docs).

    ``redis`` must decode replies to ``str`` (:func:`actors.redisconn.connect` does).
    ``clock`` gives epoch seconds for due times and DLQ timestamps; tests inject one.
    ``weights`` are the high/normal/low shares of :meth:`read` under full load.
    """

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, settings: QueueSettings,
        clock: Callable[[], float] = time.time, *,
        weights: tuple[int, int, int] = DEFAULT_WEIGHTS,
    ) -> None:
        if not redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise InternalError("TaskQueue needs a client with decode_responses=True")
        self._r = redis
        self._keys = keys
        self._settings = settings
        self._clock = clock
        self._pattern = weighted_pattern(weights)
        self._ensured: set[str] = set()
        self._cursors: dict[str, str] = {}
        script = redis.register_script
        self._read_script, self._heartbeat_script, self._move_script = (
            script(_READ), script(_HEARTBEAT), script(_MOVE))
        self._reclaim_script, self._move_due_script, self._replay_script = (
            script(_RECLAIM), script(_MOVE_DUE), script(_REPLAY))
        self._complete_many_script = script(_COMPLETE_MANY)

    @property
    def redis(self) -> aioredis.Redis:
        """The client this queue uses."""
        return self._r

    @property
    def keys(self) -> Keys:
        """The key names this queue uses."""
        return self._keys

    # ------------------------------------------------------------------ groups, enqueue

    async def ensure_group(self, stream: str) -> None:
        """Create group ``cpa`` on ``stream`` (and the stream) unless it exists."""
        with redis_errors("ensure_group"):
            await self._ensure_groups([stream])

    async def _ensure_groups(self, streams: Iterable[str]) -> None:
        missing = [s for s in dict.fromkeys(streams) if s not in self._ensured]
        if not missing:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for stream in missing:
                # id 0: entries added before the group existed are delivered too.
                pipe.xgroup_create(stream, GROUP, id="0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        for stream, result in zip(missing, results, strict=True):
            if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                raise result
            self._ensured.add(stream)

    async def enqueue(self, stream: str, fields: Mapping[str, str]) -> str:
        """Append one entry; returns its id. Durable once this returns (with AOF)."""
        entry = _check_fields(fields)
        with redis_errors("enqueue"):
            entry_id = await self._r.xadd(
                stream, _xfields(entry), maxlen=self._settings.stream_maxlen, approximate=True
            )
        return str(entry_id)

    async def enqueue_many(self, items: Sequence[tuple[str, Mapping[str, str]]]) -> list[str]:
        """Append many entries in one MULTI/EXEC round trip: all of them or none."""
        entries = [(stream, _check_fields(fields)) for stream, fields in items]
        if not entries:
            return []
        with redis_errors("enqueue_many"):
            async with self._r.pipeline(transaction=True) as pipe:
                for stream, fields in entries:
                    pipe.xadd(stream, _xfields(fields), maxlen=self._settings.stream_maxlen,
                              approximate=True)
                ids = await pipe.execute()
        return [str(i) for i in ids]

    # ---------------------------------------------------------------------------- read

    async def read(
        self, capability: str, consumer: str, *, own_stream: str | None = None,
        count: int = 10, block_ms: int = 0,
    ) -> list[Lease]:
        """Lease up to ``count`` new entries for ``consumer``, sorted by stream priority.

        The replica's ``own_stream`` comes first (session-affine steps, D8), then the
        capability's priority streams by a weighted pattern (``weights``, default 6:3:1)
        shared by all consumers of the capability. Guarantee: while low has waiting
        entries, at least one of every ``sum(weights)`` consecutive slots filled from the
        priority streams goes to low (normal gets its 3 likewise), so an always-full high
        cannot starve it; slots a stream cannot fill go to the most urgent one that can.

        One round trip when entries are waiting. When none are, it waits up to
        ``block_ms`` on all the streams at once with ``XREAD BLOCK`` — which leases
        nothing, so a cancelled wait loses no entry — and reads again.
        """
        if count < 1 or count > 10_000:
            raise ValidationFailed("count", count, "must be between 1 and 10000")
        if block_ms < 0:
            raise ValidationFailed("block_ms", block_ms, "must be >= 0 (0 = do not wait)")
        streams = [*self._keys.task_streams(capability)]
        if own_stream is not None:
            streams.append(own_stream)
        script_keys = [self._keys.read_cursor(capability), *streams]
        args = [GROUP, consumer, count, self._pattern]
        deadline = time.monotonic() + block_ms / 1000
        with redis_errors("read"):
            while True:
                reply = await self._grouped(self._read_script, script_keys, args, streams)
                if reply[0] == 1:
                    return [
                        Lease(stream, entry_id, _pairs(kv), consumer, 1)
                        for stream, entries in reply[1]
                        for entry_id, kv in entries
                    ]
                wait_ms = int((deadline - time.monotonic()) * 1000)
                if wait_ms < 1:
                    return []
                await self._r.xread(
                    dict(zip(streams, reply[1], strict=True)),
                    count=1,
                    block=min(wait_ms, self._max_block_ms()),
                )

    async def _grouped(self, script: AsyncScript, keys: list[str], args: list[Any],
                       streams: list[str]) -> Any:
        """Run a script that reads ``streams`` through the group, creating the groups."""
        await self._ensure_groups(streams)
        try:
            return await script(keys=keys, args=args)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # A stream or its group vanished since we created it (deleted, Redis restarted
            # without data): forget the cache and create them again, once.
            self._ensured.difference_update(streams)
            await self._ensure_groups(streams)
            return await script(keys=keys, args=args)

    def _max_block_ms(self) -> int:
        # A blocking read must return before the socket timeout would cut it off.
        timeout = socket_timeout_s(self._r)
        if timeout is None:
            return 60_000
        return max(1, int(timeout * 1000) - _BLOCK_MARGIN_MS)

    # ------------------------------------------------------------------- fenced writes

    async def heartbeat(self, lease: Lease) -> bool:
        """Renew ``lease`` (reset its idle time). False: the lease was lost — another
        consumer reclaimed the entry, or it is gone — and its result must be abandoned."""
        return await self.renew(lease) > 0

    async def renew(self, lease: Lease, job_key: str | None = None) -> int:
        """Renew ``lease``: 0 when it was lost, :data:`RENEWED`, or :data:`JOB_OVER` when
        ``job_key``'s job has already ended (cancelled, failed): the step should stop. The
        last is what makes cancelling reliable — the pub/sub cancel signal is lossy (a
        worker that was disconnected misses it), the job's status in Redis is not."""
        with redis_errors("heartbeat"):
            renewed = await self._heartbeat_script(
                keys=[lease.stream, job_key] if job_key else [lease.stream],
                args=[GROUP, lease.entry_id, lease.consumer, lease.deliveries],
            )
        return int(renewed)

    async def complete(
        self, lease: Lease, result_stream: str, result_fields: Mapping[str, str]
    ) -> bool:
        """Commit: append the result to ``result_stream`` and ack + delete the task entry,
        atomically, if the lease is still ours. False (and nothing written) otherwise.

        Shielded from cancellation, so a shutdown cannot cut it between send and reply.
        """
        fields = _check_fields(result_fields)
        new_id = await asyncio.shield(self._move(lease, result_stream, fields, "complete"))
        return new_id is not None

    async def release(self, lease: Lease, *, to_stream: str | None = None) -> bool:
        """Give a leased entry back at once (graceful shutdown): atomically re-append its
        fields to ``to_stream`` (default: its own stream) and ack + delete the original.

        Chosen over "XCLAIM to a parking consumer" because the entry is readable by any
        consumer immediately, without waiting for a reclaim pass. It goes to the back of
        its stream with a new id and a fresh delivery count (giving back is not a failed
        delivery, so it does not count towards poison). False when the lease was lost.
        """
        target = to_stream or lease.stream
        new_id = await asyncio.shield(self._move(lease, target, lease.fields, "release"))
        return new_id is not None

    async def dead_letter_lease(self, lease: Lease, reason: str) -> bool:
        """Move a leased entry to the DLQ with ``reason`` (e.g. it cannot be decoded), ack
        and delete it — atomically, if the lease is still ours."""
        fields = self._dead_fields(lease.stream, lease.entry_id, lease.fields, reason,
                                   lease.deliveries)
        new_id = await asyncio.shield(self._move(lease, self._keys.dlq(), fields, "dead_letter"))
        return new_id is not None

    async def complete_many(
        self, items: Sequence[tuple[Lease, str, Mapping[str, str]]],
        *, publish: Sequence[tuple[str, str]] = (),
    ) -> list[bool]:
        """Several :meth:`complete` (lease, result stream, result fields) in one pipelined
        round trip; each is fenced and atomic on its own. Shielded like ``complete``.
        ``publish`` (channel, message) pairs ride along in the same round trip."""
        checked = [(lease, target, _check_fields(f)) for lease, target, f in items]
        if not checked and not publish:
            return []
        # One script call for the whole batch: its arguments are two JSON strings (encoded
        # in C), not hundreds of separately packed ones; each item is fenced and atomic.
        maxlen = str(self._settings.stream_maxlen)
        batch = []
        for lease, target, fields in checked:
            item = [lease.stream, target, GROUP, lease.entry_id, lease.consumer,
                    str(lease.deliveries), maxlen]
            for name, value in fields.items():
                item += (name, value)
            batch.append(item)
        args = (json.dumps(batch, separators=(",", ":")),
                json.dumps([list(p) for p in publish], separators=(",", ":")))

        async def run() -> list[Any]:
            for attempt in (1, 2):
                try:
                    return list(await self._complete_many_script.registered_client.evalsha(
                        self._complete_many_script.sha, 0, *args))
                except NoScriptError:
                    if attempt == 2:
                        raise
                    await self._r.script_load(_COMPLETE_MANY)  # Redis restarted without it
            raise InternalError("unreachable")

        with redis_errors("complete_many"):
            replies = await asyncio.shield(run())
        return [new_id is not None for new_id in replies]

    def _move_args(self, lease: Lease, fields: Mapping[str, str]) -> list[Any]:
        args: list[Any] = [GROUP, lease.entry_id, lease.consumer, lease.deliveries,
                           self._settings.stream_maxlen]
        for name, value in fields.items():
            args += [name, value]
        return args

    async def _move(
        self, lease: Lease, target: str, fields: Mapping[str, str], operation: str
    ) -> str | None:
        with redis_errors(operation):
            new_id: str | None = await self._move_script(
                keys=[lease.stream, target], args=self._move_args(lease, fields)
            )
        return new_id

    # ------------------------------------------------------------------------- reclaim

    async def reclaim(
        self, stream: str, consumer: str, *, min_idle_s: float | None = None, count: int = 100
    ) -> tuple[list[Lease], list[DeadEntry]]:
        """Take over entries idle at least ``min_idle_s`` (default: the visibility timeout).

        Returns the new leases (delivery count incremented) and the entries that were
        dead-lettered instead because they would have been delivered more than
        ``poison_max_deliveries`` times. Each call continues the scan of the pending list
        where the previous one on this stream stopped.
        """
        idle_s = self._settings.visibility_timeout_s if min_idle_s is None else min_idle_s
        start = self._cursors.get(stream, "0-0")
        now = self._clock()
        args = [GROUP, consumer, max(0, int(idle_s * 1000)), start, count,
                self._settings.poison_max_deliveries, repr(now), self._settings.stream_maxlen]
        with redis_errors("reclaim"):
            reply = await self._grouped(
                self._reclaim_script, [stream, self._keys.dlq()], args, [stream]
            )
        next_start, claimed, dead = reply
        self._cursors[stream] = next_start
        leases = [Lease(stream, entry_id, _pairs(kv), consumer, int(n))
                  for entry_id, kv, n in claimed]
        dead_entries = []
        for did, entry_id, kv, n, reason in dead:
            fields = _pairs(kv)
            dead_entries.append(DeadEntry(did, stream, entry_id, fields, reason, now, int(n),
                                          fields.get("tenant") or None))
        return leases, dead_entries

    # ----------------------------------------------------------------- delayed retries

    async def schedule(
        self, due_ts: float, stream: str, fields: Mapping[str, str], *, zset_key: str
    ) -> None:
        """Park an entry for ``stream`` in the sorted set ``zset_key`` until ``due_ts``
        (epoch seconds, the queue's clock); :meth:`move_due` appends it when due."""
        member = delayed_member(stream, fields)
        with redis_errors("schedule"):
            await self._r.zadd(zset_key, {member: due_ts})

    async def move_due(self, zset_key: str, limit: int = 100) -> int:
        """Append up to ``limit`` due entries of ``zset_key`` to their streams; returns how
        many this call moved. Each entry is moved exactly once, however many movers race:
        the script re-checks, removes and appends each member in one step, and only the
        caller whose ZREM removed it appends it. A caller that lost a race peeks again,
        so 0 means "nothing was due any more", not "someone else was faster"."""
        now = self._clock()
        moved = 0
        with redis_errors("move_due"):
            while moved < limit:
                members = [str(m) for m in await self._r.zrangebyscore(
                    zset_key, "-inf", repr(now), start=0, num=limit - moved
                )]
                if not members:
                    break
                streams = [json.loads(m)["s"] for m in members]
                # Each pass removes every peeked member (here or by a rival), so the loop
                # ends; the shield lets a started move finish even if we are cancelled.
                moved += int(await asyncio.shield(self._move_due_script(
                    keys=[zset_key, *streams],
                    args=[self._settings.stream_maxlen, repr(now), *members],
                )))
        return moved

    async def scheduled_count(self, zset_key: str) -> int:
        """Entries waiting in a delayed-retry set (for metrics)."""
        with redis_errors("scheduled_count"):
            return int(await self._r.zcard(zset_key))

    # ----------------------------------------------------------------------------- DLQ

    def _dead_fields(self, stream: str, entry_id: str, fields: Mapping[str, str], reason: str,
                     deliveries: int) -> dict[str, str]:
        return dead_letter_fields(stream, entry_id, fields, reason, deliveries, self._clock())

    async def dead_letter(self, stream: str, fields: Mapping[str, str], reason: str) -> str:
        """Put an entry that belongs to ``stream`` into the DLQ (e.g. a step whose retries
        are exhausted); returns its DLQ id. Replay sends it back to ``stream``."""
        dead = self._dead_fields(stream, "", _check_fields(fields), reason, 0)
        with redis_errors("dead_letter"):
            entry_id = await self._r.xadd(
                self._keys.dlq(), _xfields(dead), maxlen=self._settings.stream_maxlen,
                approximate=True,
            )
        return str(entry_id)

    async def list_dead(self, *, tenant: str | None = None, count: int = 100,
                        after_id: str | None = None) -> list[DeadEntry]:
        """Up to ``count`` dead letters, oldest first, after ``after_id`` (exclusive; page
        with the last id returned), optionally only those of ``tenant``."""
        start = "-" if after_id is None else "(" + _check_id(after_id)
        found: list[DeadEntry] = []
        with redis_errors("list_dead"):
            while len(found) < count:
                batch = await self._xrange(self._keys.dlq(), start, "+", max(count, 100))
                for entry_id, raw in batch:
                    entry = _dead_entry(entry_id, raw)
                    if tenant is None or entry.tenant == tenant:
                        found.append(entry)
                        if len(found) == count:
                            break
                if len(batch) < max(count, 100):
                    break
                start = "(" + batch[-1][0]
        return found

    async def replay_dead(self, entry_id: str) -> str:
        """Send a dead letter back to its stream and remove it from the DLQ, atomically;
        returns the new entry id. Raises :class:`NotFound` for an unknown id."""
        dlq = self._keys.dlq()
        with redis_errors("replay_dead"):
            found = await self._xrange(dlq, _check_id(entry_id), entry_id, 1)
            if not found:
                raise NotFound(f"dead letter {entry_id!r} does not exist (already replayed "
                               "or purged?); list them with list_dead()")
            stream = found[0][1]["stream"]
            new_id: str | None = await asyncio.shield(self._replay_script(
                keys=[dlq, stream], args=[entry_id, self._settings.stream_maxlen]
            ))
        if new_id is None:
            raise NotFound(f"dead letter {entry_id!r} was replayed or purged meanwhile")
        return new_id

    async def purge_dead(self, entry_id: str) -> bool:
        """Delete a dead letter for good; False when there was none with that id."""
        with redis_errors("purge_dead"):
            return bool(await self._r.xdel(self._keys.dlq(), _check_id(entry_id)))

    async def _xrange(self, stream: str, start: str, end: str,
                      count: int) -> list[tuple[str, dict[str, str]]]:
        return cast(list[tuple[str, dict[str, str]]],
                    await self._r.xrange(stream, min=start, max=end, count=count) or [])

    # ------------------------------------------------------------------------- metrics

    async def depth(self, stream: str) -> int:
        """Entries in ``stream``: waiting plus in flight (acked ones are deleted)."""
        with redis_errors("depth"):
            return int(await self._r.xlen(stream))

    async def pending_count(self, stream: str) -> int:
        """Entries of ``stream`` leased and not yet acked (0 when it has no group yet)."""
        with redis_errors("pending_count"):
            try:
                summary = await self._r.xpending(stream, GROUP)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    return 0
                raise
        return int(summary["pending"])


# ------------------------------------------------------------------------- helpers


def weighted_pattern(weights: tuple[int, int, int]) -> str:
    """The slot pattern for ``weights`` (digits 1/2/3 = high/normal/low), spread out by
    smooth weighted round robin so short reads mix priorities too: (6, 3, 1) →
    ``1213121121``-like, each digit as often as its weight."""
    if len(weights) != 3 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                                for w in weights) or sum(weights) > 100:
        raise ValidationFailed(
            "weights", weights, "must be three integers >= 1 (high, normal, low) summing "
            "to at most 100; a zero weight would let that priority starve",
        )
    total, current, out = sum(weights), [0, 0, 0], []
    for _ in range(total):
        for i, weight in enumerate(weights):
            current[i] += weight
        pick = max(range(3), key=lambda i: (current[i], -i))
        current[pick] -= total
        out.append(str(pick + 1))
    return "".join(out)


def _check_fields(fields: Mapping[str, str]) -> Mapping[str, str]:
    if not fields:
        raise ValidationFailed("fields", fields, "an entry needs at least one field")
    for name, value in fields.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValidationFailed(
                f"fields[{name!r}]", value, "entry field names and values must be str",
                hint="put structured data as JSON into field 'd' (see task_fields)",
            )
    return fields


def _xfields(fields: Mapping[str, str]) -> dict[FieldT, EncodableT]:
    return {name: value for name, value in fields.items()}


def _check_id(entry_id: str) -> str:
    if not isinstance(entry_id, str) or not _ENTRY_ID.match(entry_id):
        raise ValidationFailed("entry_id", entry_id, "must be a stream id like 1700000000000-0")
    return entry_id


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _dead_entry(entry_id: str, raw: Mapping[str, str]) -> DeadEntry:
    return DeadEntry(entry_id, raw.get("stream", ""), raw.get("id", ""),
                     json.loads(raw.get("f", "{}")), raw.get("reason", ""),
                     float(raw.get("ts", "0")), int(raw.get("deliveries", "0")),
                     raw.get("tenant") or None)
