"""TaskQueue on the real Redis: leases, fencing, priorities, reclaim, poison, DLQ, delayed
retries, connection loss and a Redis restart. Every test works under its own key prefix."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import redis.asyncio as aioredis

from actors.errors import DependencyUnavailable, InternalError, NotFound, ValidationFailed
from actors.keys import PRIORITIES, Keys
from actors.queue import GROUP, Lease, TaskQueue, task_fields, weighted_pattern
from actors.redisconn import connect, ping
from actors.settings import QueueSettings, RedisSettings
from tests.redis_fixtures import PrivateRedis, free_port

pytest_plugins = ("tests.redis_fixtures",)  # the fixtures: keys, redis_client, …

CAP = "browser"


class FakeClock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(redis_client: aioredis.Redis, keys: Keys, clock: FakeClock) -> TaskQueue:
    settings = QueueSettings(
        visibility_timeout_s=0.3, heartbeat_interval_s=0.1, poison_max_deliveries=3
    )
    return TaskQueue(redis_client, keys, settings, clock)


def entry(n: int, **routing: str | int) -> dict[str, str]:
    return task_fields({"n": n}, job="j1", step=str(n), **routing)


async def stream_fields(queue: TaskQueue, stream: str) -> list[dict[str, str]]:
    """The fields of every entry in ``stream``, oldest first."""
    raw = await queue.redis.xrange(stream)
    return [cast(dict[str, str], fields) for _, fields in raw or []]


async def poll(condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 5.0) -> None:
    """Fail unless ``condition()`` comes true before the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- keys


def test_keys_carry_hash_tags_and_validate(keys: Keys) -> None:
    p = keys.prefix
    assert keys.shard_inbox(3) == f"{p}:{{shard3}}:inbox"
    assert keys.shard_delayed(3) == f"{p}:{{shard3}}:delayed"
    assert keys.task_stream("mail", "low") == f"{p}:{{cap:mail}}:tasks:low"
    assert keys.replica_stream("mail", "r1") == f"{p}:{{cap:mail}}:replica:r1"
    assert keys.dlq() == f"{p}:{{dlq}}:dead"
    assert keys.job("acme", "j1") == f"{p}:{{t:acme}}:job:j1"
    tenant_keys = [keys.jobs_index("acme"), keys.jobs_by_status("acme", "running"),
                   keys.idempotency("acme", "k"), keys.conversation("acme", "c"),
                   keys.outbox("acme", "c"), keys.events_channel("acme", "j")]
    assert all("{t:acme}" in k for k in tenant_keys)
    assert len(set(tenant_keys)) == len(tenant_keys)
    for bad in ("a{b", "a b", "", "x}"):
        with pytest.raises(ValidationFailed):
            keys.job(bad, "j")
    with pytest.raises(ValidationFailed, match="must be one of high, normal, low"):
        keys.task_stream("mail", "urgent")
    with pytest.raises(ValidationFailed):
        keys.shard_inbox(-1)
    assert PRIORITIES == ("high", "normal", "low")


def test_weighted_pattern_spreads_shares() -> None:
    pattern = weighted_pattern((6, 3, 1))
    assert sorted(pattern) == sorted("1" * 6 + "2" * 3 + "3")
    assert pattern[0] == "1"
    with pytest.raises(ValidationFailed, match="starve"):
        weighted_pattern((1, 1, 0))


# ------------------------------------------------------------------ enqueue / read


async def test_round_trip_enqueue_read_complete(queue: TaskQueue, keys: Keys) -> None:
    high = keys.task_stream(CAP, "high")
    inbox = keys.shard_inbox(0)
    entry_id = await queue.enqueue(high, entry(1, tenant="acme"))
    leases = await queue.read(CAP, "c1", count=10)
    assert [(le.stream, le.entry_id, le.deliveries) for le in leases] == [(high, entry_id, 1)]
    assert leases[0].payload() == {"n": 1}
    assert await queue.pending_count(high) == 1
    assert await queue.complete(leases[0], inbox, {"d": '{"ok":true}', "step": "1"})
    assert await queue.depth(high) == 0
    assert await queue.pending_count(high) == 0
    assert await stream_fields(queue, inbox) == [{"d": '{"ok":true}', "step": "1"}]
    assert await queue.read(CAP, "c1", count=10) == []


async def test_enqueue_many_is_one_batch_and_validates(queue: TaskQueue, keys: Keys) -> None:
    streams = keys.task_streams(CAP)
    items = [(streams[i % 3], entry(i)) for i in range(9)]
    ids = await queue.enqueue_many(items)
    assert len(set(zip([s for s, _ in items], ids, strict=True))) == 9
    assert [await queue.depth(s) for s in streams] == [3, 3, 3]
    with pytest.raises(ValidationFailed, match="must be str"):
        await queue.enqueue(streams[0], {"d": 1})  # type: ignore[dict-item]
    with pytest.raises(ValidationFailed, match="at least one field"):
        await queue.enqueue_many([(streams[0], {})])


async def test_priorities_come_high_then_normal_then_low(queue: TaskQueue, keys: Keys) -> None:
    high, normal, low = keys.task_streams(CAP)
    await queue.enqueue_many([(s, entry(i)) for i, s in enumerate([low, normal, high] * 3)])
    leases = await queue.read(CAP, "c1", count=9)
    assert [le.stream for le in leases] == [high] * 3 + [normal] * 3 + [low] * 3


async def test_full_streams_share_slots_by_weight(queue: TaskQueue, keys: Keys) -> None:
    high, normal, low = keys.task_streams(CAP)
    await queue.enqueue_many([(s, entry(i)) for i in range(30) for s in (high, normal, low)])
    leases = await queue.read(CAP, "c1", count=10)
    assert [sum(le.stream == s for le in leases) for s in (high, normal, low)] == [6, 3, 1]


async def test_low_is_not_starved_by_an_always_full_high(queue: TaskQueue, keys: Keys) -> None:
    high, _normal, low = keys.task_streams(CAP)
    inbox = keys.shard_inbox(0)
    await queue.enqueue_many([(low, entry(i)) for i in range(4)])
    served: list[str] = []
    for i in range(60):
        # Keep high full: there is always more high work than one read can take.
        await queue.enqueue_many([(high, entry(1000 + i * 10 + k)) for k in range(3)])
        consumer = f"c{i % 3}"  # several consumers share the cursor
        leases = await queue.read(CAP, consumer, count=1 + i % 2)
        assert leases
        for lease in leases:
            served.append(lease.stream)
            assert await queue.complete(lease, inbox, {"d": "{}"})
    lows = [i for i, s in enumerate(served) if s == low]
    assert len(lows) == 4, "every low entry was served although high never ran dry"
    # One low per 10 slots of the pattern while low had entries; within one read the
    # leases come sorted by priority, so a low may sit at the end of its read (count <= 2).
    assert lows[0] < 10 + 1
    assert all(b - a <= 10 + 1 for a, b in itertools.pairwise(lows))


async def test_own_stream_is_served_first(queue: TaskQueue, keys: Keys) -> None:
    high = keys.task_stream(CAP, "high")
    own = keys.replica_stream(CAP, "r1")
    await queue.enqueue_many([(high, entry(1)), (high, entry(2)), (own, entry(3)),
                              (own, entry(4))])
    leases = await queue.read(CAP, "r1-w0", own_stream=own, count=3)
    assert [le.stream for le in leases] == [own, own, high]
    # Another replica without that own stream never sees the affine steps.
    rest = await queue.read(CAP, "r2-w0", count=10)
    assert [le.stream for le in rest] == [high]


async def test_blocking_read_wakes_up_on_a_new_entry(queue: TaskQueue, keys: Keys) -> None:
    started = time.monotonic()
    assert await queue.read(CAP, "c1", count=5, block_ms=150) == []
    assert time.monotonic() - started >= 0.14

    async def late_enqueue() -> None:
        await asyncio.sleep(0.1)
        await queue.enqueue(keys.task_stream(CAP, "low"), entry(1))

    started = time.monotonic()
    task = asyncio.create_task(late_enqueue())
    leases = await queue.read(CAP, "c1", count=5, block_ms=3000)
    await task
    assert len(leases) == 1
    assert time.monotonic() - started < 1.5


async def test_read_recreates_a_vanished_group(queue: TaskQueue, keys: Keys) -> None:
    high = keys.task_stream(CAP, "high")
    assert await queue.read(CAP, "c1", count=1) == []
    await queue.redis.delete(high)  # the cache still says "ensured"
    await queue.enqueue(high, entry(1))
    assert len(await queue.read(CAP, "c1", count=1)) == 1


# ------------------------------------------------------------ leases and fencing


async def test_heartbeat_keeps_a_lease_that_an_idle_consumer_loses(
    queue: TaskQueue, keys: Keys
) -> None:
    high = keys.task_stream(CAP, "high")
    await queue.enqueue_many([(high, entry(1)), (high, entry(2))])
    [alive] = await queue.read(CAP, "alive", count=1)
    [silent] = await queue.read(CAP, "silent", count=1)
    started = time.monotonic()
    reclaimed: list[Lease] = []

    async def silent_entry_reclaimed() -> bool:
        assert await queue.heartbeat(alive), "a renewed lease must stay ours"
        leases, dead = await queue.reclaim(high, "rescuer")
        assert dead == []
        reclaimed.extend(leases)
        return bool(reclaimed)

    await poll(silent_entry_reclaimed)
    assert time.monotonic() - started >= 0.3 * 0.9
    assert [le.entry_id for le in reclaimed] == [silent.entry_id]
    assert reclaimed[0].deliveries == 2
    assert not await queue.heartbeat(silent)
    assert await queue.complete(reclaimed[0], keys.shard_inbox(0), {"d": "{}"})
    # Keep heartbeating past another visibility timeout: the live lease is never taken.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert await queue.heartbeat(alive)
        assert (await queue.reclaim(high, "rescuer")) == ([], [])
        await asyncio.sleep(0.05)


async def test_complete_is_fenced_by_the_lease_epoch(queue: TaskQueue, keys: Keys) -> None:
    high = keys.task_stream(CAP, "high")
    inbox = keys.shard_inbox(1)
    await queue.enqueue(high, entry(1))
    [lease_a] = await queue.read(CAP, "A", count=1)
    [lease_b], _ = await queue.reclaim(high, "B", min_idle_s=0)
    assert (lease_b.consumer, lease_b.deliveries) == ("B", 2)
    assert not await queue.complete(lease_a, inbox, {"d": '"late A"'})
    assert not await queue.heartbeat(lease_a)
    assert not await queue.release(lease_a)
    assert await queue.depth(inbox) == 0, "a fenced-off result must not be written"
    assert await queue.complete(lease_b, inbox, {"d": '"B"'})
    assert not await queue.complete(lease_b, inbox, {"d": '"B again"'})
    assert [f["d"] for f in await stream_fields(queue, inbox)] == ['"B"']
    assert await queue.depth(high) == 0


async def test_complete_many_fences_each_lease(queue: TaskQueue, keys: Keys) -> None:
    high, inbox = keys.task_stream(CAP, "high"), keys.shard_inbox(0)
    await queue.enqueue_many([(high, entry(i)) for i in range(3)])
    leases = await queue.read(CAP, "A", count=3)
    [stolen], _ = await queue.reclaim(high, "B", min_idle_s=0, count=1)
    results = await queue.complete_many([(le, inbox, {"d": le.fields["step"]}) for le in leases])
    assert results == [le.entry_id != stolen.entry_id for le in leases]
    assert sorted(f["d"] for f in await stream_fields(queue, inbox)) == sorted(
        le.fields["step"] for le in leases if le.entry_id != stolen.entry_id)
    assert await queue.depth(high) == 1 and await queue.complete_many([]) == []


async def test_same_consumer_old_epoch_is_fenced(queue: TaskQueue, keys: Keys) -> None:
    high = keys.task_stream(CAP, "high")
    await queue.enqueue(high, entry(1))
    [first] = await queue.read(CAP, "A", count=1)
    [second], _ = await queue.reclaim(high, "A", min_idle_s=0)
    assert not await queue.complete(first, keys.shard_inbox(0), {"d": "1"})
    assert await queue.complete(second, keys.shard_inbox(0), {"d": "2"})


async def test_release_gives_the_entry_back_at_once(queue: TaskQueue, keys: Keys) -> None:
    normal = keys.task_stream(CAP, "normal")
    await queue.enqueue(normal, entry(7))
    [lease] = await queue.read(CAP, "leaving", count=1)
    assert await queue.release(lease)
    [again] = await queue.read(CAP, "other", count=1)
    assert (again.fields, again.deliveries, again.stream) == (lease.fields, 1, normal)
    assert again.entry_id != lease.entry_id
    assert not await queue.complete(lease, keys.shard_inbox(0), {"d": "x"})
    assert await queue.pending_count(normal) == 1


async def test_reclaim_skips_entries_deleted_while_pending(
    queue: TaskQueue, keys: Keys
) -> None:
    high = keys.task_stream(CAP, "high")
    entry_id = await queue.enqueue(high, entry(1))
    await queue.read(CAP, "A", count=1)
    await queue.redis.xdel(high, entry_id)
    assert await queue.reclaim(high, "B", min_idle_s=0) == ([], [])
    assert await queue.pending_count(high) == 0


# --------------------------------------------------------------------- poison, DLQ


async def test_poison_entry_goes_to_dlq_after_k_deliveries_and_replays(
    queue: TaskQueue, keys: Keys, clock: FakeClock
) -> None:
    low = keys.task_stream(CAP, "low")
    fields = entry(9, tenant="acme")
    original_id = await queue.enqueue(low, fields)
    await queue.enqueue(low, entry(10, tenant="globex"))
    deliveries = [le.deliveries for le in await queue.read(CAP, "w", count=1)]
    for _ in range(2):
        leases, dead = await queue.reclaim(low, "w", min_idle_s=0, count=1)
        assert dead == []
        deliveries += [le.deliveries for le in leases if le.entry_id == original_id]
    assert deliveries == [1, 2, 3]  # K = poison_max_deliveries = 3
    clock.now = 4242.0
    leases, dead = await queue.reclaim(low, "w", min_idle_s=0)
    assert leases == []
    [letter] = dead
    assert (letter.stream, letter.original_id, letter.fields) == (low, original_id, fields)
    assert (letter.reason, letter.deliveries, letter.tenant) == ("poison: delivered 3 times", 3,
                                                                 "acme")
    assert await queue.depth(low) == 1 and await queue.pending_count(low) == 0

    [listed] = await queue.list_dead(tenant="acme")
    assert listed == letter
    assert listed.ts == 4242.0
    assert await queue.list_dead(tenant="globex") == []
    new_id = await queue.replay_dead(letter.entry_id)
    assert await queue.list_dead() == []
    replayed = [le for le in await queue.read(CAP, "w2", count=5) if le.entry_id == new_id]
    assert [(le.fields, le.deliveries) for le in replayed] == [(fields, 1)]
    with pytest.raises(NotFound):
        await queue.replay_dead(letter.entry_id)
    with pytest.raises(ValidationFailed):
        await queue.replay_dead("not-an-id")


async def test_dead_letter_list_pages_and_purge(queue: TaskQueue, keys: Keys) -> None:
    high = keys.task_stream(CAP, "high")
    ids = [await queue.dead_letter(high, entry(i, tenant="acme"), f"exhausted {i}")
           for i in range(5)]
    page1 = await queue.list_dead(count=2)
    page2 = await queue.list_dead(count=10, after_id=page1[-1].entry_id)
    assert [d.entry_id for d in page1 + page2] == ids
    assert page2[0].reason == "exhausted 2"
    assert await queue.purge_dead(ids[0])
    assert not await queue.purge_dead(ids[0])
    await queue.enqueue(high, entry(99))
    [lease] = await queue.read(CAP, "w", count=1)
    assert await queue.dead_letter_lease(lease, "cannot decode")
    assert await queue.depth(high) == 0
    letters = await queue.list_dead()
    assert (letters[-1].reason, letters[-1].original_id) == ("cannot decode", lease.entry_id)


# ----------------------------------------------------------------- delayed retries


async def test_delayed_retry_moves_exactly_once_when_due(
    queue: TaskQueue, keys: Keys, clock: FakeClock
) -> None:
    delayed = keys.shard_delayed(2)
    stream = keys.task_stream(CAP, "normal")
    for i in range(40):
        await queue.schedule(1_100.0 + (i % 2), stream, entry(i), zset_key=delayed)
    await queue.schedule(5_000.0, stream, entry(999), zset_key=delayed)
    assert await queue.move_due(delayed) == 0  # clock at 1000: nothing due yet
    clock.now = 1_100.0
    assert await queue.move_due(delayed) == 20
    clock.now = 1_101.0
    settings = QueueSettings(visibility_timeout_s=0.3, heartbeat_interval_s=0.1)
    movers = [TaskQueue(queue.redis, keys, settings, clock) for _ in range(8)]
    moved = await asyncio.gather(*(m.move_due(delayed, limit=7) for m in movers for _ in "ab"))
    assert sum(moved) == 20
    assert await queue.move_due(delayed) == 0
    steps = sorted(int(f["step"]) for f in await stream_fields(queue, stream))
    assert steps == list(range(40)), "each due retry appended exactly once"
    assert await queue.scheduled_count(delayed) == 1


# --------------------------------------------------------------- Redis unavailable


async def test_unreachable_redis_is_dependency_unavailable(keys: Keys) -> None:
    client = connect(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0",
                                   connect_timeout_s=0.5), retries=0)
    try:
        queue = TaskQueue(client, keys, QueueSettings())
        assert not await ping(client)
        with pytest.raises(DependencyUnavailable, match="redis is unavailable: enqueue"):
            await queue.enqueue(keys.task_stream(CAP, "high"), entry(1))
        with pytest.raises(DependencyUnavailable):
            await queue.read(CAP, "c", count=1)
    finally:
        await client.aclose()


async def test_client_reconnects_after_redis_restart_and_acked_data_survives(
    private_redis: PrivateRedis, keys: Keys
) -> None:
    await private_redis.start()
    client = connect(RedisSettings(url=private_redis.url, connect_timeout_s=0.5))
    try:
        queue = TaskQueue(client, keys, QueueSettings(poison_max_deliveries=5))
        high, inbox = keys.task_stream(CAP, "high"), keys.shard_inbox(0)
        await queue.enqueue_many([(high, entry(1)), (high, entry(2))])
        done, open_lease = await queue.read(CAP, "w", count=2)
        assert await queue.complete(done, inbox, {"d": '"result 1"'})

        private_redis.kill9()  # no shutdown: only what AOF (fsync always) holds survives
        # The next command fails, retries with backoff, and succeeds once Redis is back.
        pending = asyncio.create_task(queue.enqueue(high, entry(3)))
        await asyncio.sleep(0.2)
        assert not pending.done()
        await private_redis.start()
        await asyncio.wait_for(pending, timeout=8)

        assert [f["d"] for f in await stream_fields(queue, inbox)] == ['"result 1"']
        assert await queue.pending_count(high) == 1, "the unacked lease survived"
        [again], _ = await queue.reclaim(high, "w2", min_idle_s=0)
        assert (again.entry_id, again.deliveries) == (open_lease.entry_id, 2)
        assert await queue.depth(high) == 2
    finally:
        await client.aclose()


async def test_queue_requires_decoded_replies(keys: Keys) -> None:
    client = connect(RedisSettings(), decode_responses=False)
    with pytest.raises(InternalError, match="decode_responses"):
        TaskQueue(client, keys, QueueSettings())
    await client.aclose()
    assert GROUP == "cpa"
