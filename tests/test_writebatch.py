"""WriteBatch: many writes applied by one script call, on the real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from actors.redisconn import connect
from actors.settings import RedisSettings
from actors.writebatch import HSET_CHUNK, WriteBatch, apply_sha
from tests.redis_fixtures import PrivateRedis

pytest_plugins = ("tests.redis_fixtures",)


async def test_every_command_shape_lands_exactly(redis_client: aioredis.Redis,
                                                 key_prefix: str) -> None:
    p = key_prefix
    await redis_client.xgroup_create(f"{p}:in", "g", id="0", mkstream=True)
    await redis_client.xadd(f"{p}:in", {"x": "1"})
    entries = await redis_client.xreadgroup("g", "c", {f"{p}:in": ">"})
    entry_id = entries[0][1][0][0]
    await redis_client.set(f"{p}:gone", "1", ex=100)
    await redis_client.sadd(f"{p}:s2", "old")
    batch = WriteBatch()
    big = {f"f{i}": str(i) for i in range(HSET_CHUNK * 2 + 7)}  # chunked under Lua's stack
    batch.hset(f"{p}:h", mapping=big)
    batch.hset(f"{p}:h2", mapping={"ü": "grüße \"quoted\" \\ \n", "n": 3})
    score = 1796004834.123456789
    batch.zadd(f"{p}:z", {"a": score, "b": 2})
    batch.zrem(f"{p}:z", "b")
    batch.sadd(f"{p}:s", "m1", "m2")
    batch.srem(f"{p}:s2", "old")
    batch.expire(f"{p}:h2", 120)
    batch.persist(f"{p}:gone")
    for i in range(5):
        batch.xadd(f"{p}:x", {"d": f"{{\"i\":{i}}}", "k": "v"}, maxlen=3, approximate=False)
    batch.publish(f"{p}:chan", "hello")
    batch.xack(f"{p}:in", "g", entry_id)
    batch.xdel(f"{p}:in", entry_id)
    ran = await batch.execute(redis_client, apply_sha(redis_client))
    assert ran == batch.count == 3 + 1 + 1 + 2 + 1 + 1 + 1 + 5 + 1 + 1 + 1
    assert await redis_client.hgetall(f"{p}:h") == big
    assert await redis_client.hgetall(f"{p}:h2") == {"ü": "grüße \"quoted\" \\ \n", "n": "3"}
    assert await redis_client.zrange(f"{p}:z", 0, -1, withscores=True) == [("a", score)]
    assert await redis_client.smembers(f"{p}:s") == {"m1", "m2"}
    assert await redis_client.exists(f"{p}:s2") == 0
    assert 0 < await redis_client.ttl(f"{p}:h2") <= 120
    assert await redis_client.ttl(f"{p}:gone") == -1
    stream = await redis_client.xrange(f"{p}:x")
    assert [f["d"] for _, f in stream] == ['{"i":2}', '{"i":3}', '{"i":4}']
    assert (await redis_client.xpending(f"{p}:in", "g"))["pending"] == 0
    assert await redis_client.xlen(f"{p}:in") == 0


async def test_empty_batch_sends_nothing(redis_client: aioredis.Redis) -> None:
    assert await WriteBatch().execute(redis_client, "0" * 40) == 0


async def test_reloads_the_script_when_redis_forgot_it(private_redis: PrivateRedis) -> None:
    await private_redis.start()
    client = connect(RedisSettings(url=private_redis.url), retries=0)
    try:
        await client.script_flush()  # a private server: nobody else's scripts
        batch = WriteBatch()
        batch.sadd("k", "v")
        assert await batch.execute(client, apply_sha(client)) == 1
        assert await client.smembers("k") == {"v"}
    finally:
        await client.aclose()
