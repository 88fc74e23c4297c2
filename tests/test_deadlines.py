"""Nothing waits for ever: per-attempt dispatch deadlines, reclaim before the backlog, dead
replicas' own streams, poison inbox entries. In-process ShardRuntime + PoolWorker on the real
Redis (like ``tests/test_runtime_local.py``), with short deadlines so each test takes
seconds."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis

from actors.executors.noop import NoopExecutor
from actors.executors.testing import LedgerExecutor, SessionProbe
from actors.jobs import JobMeta
from actors.jobstore import new_job_id
from actors.queue import GROUP
from actors.settings import RedisSettings
from actors.shard import Deadlines, journal_key
from actors.worker import PoolWorker
from tests.redis_fixtures import REDIS_URL
from tests.test_runtime_local import Runtime, make_settings, wait_for

pytest_plugins = ("tests.redis_fixtures",)


def test_deadline_buckets_pop_due_attempts_once_and_never_early() -> None:
    d = Deadlines()
    d.arm(10.2, "t", "c", "j1", 0, 1)
    d.arm(10.9, "t", "c", "j1", 1, 1)
    d.arm(12.0, "t", "c", "j2", 0, 1)
    d.arm(11.5, "t", "c", "j1", 0, 2)  # a retry replaces attempt 1 of j1/0
    d.disarm("j2", 0)  # finished
    assert len(d) == 2
    assert d.due(10.5) == []  # 10.9 is not due before its second (11) has come
    assert d.due(11.0) == [("t", "c", "j1", 1, 1)]
    assert d.due(11.9) == []
    assert d.due(12.0) == [("t", "c", "j1", 0, 2)]
    assert d.due(99.0) == [] and len(d) == 0


async def _lease_with_dead_consumer(worker: PoolWorker, capability: str) -> list[Any]:
    """Lease entries as a consumer that then dies (never heartbeats nor completes)."""
    for _ in range(100):
        leases = await worker.queue.read(capability, "dead", count=10, block_ms=100)
        if leases:
            return leases
    raise AssertionError("nothing to lease")


async def test_steps_with_no_executor_end_lost_then_dead_lettered(
        redis_settings: RedisSettings, redis_client: aioredis.Redis, reliability: Any) -> None:
    """No consumer is left for a capability: one step is leased by a consumer that died
    (nobody can reclaim it), the other is never read. Each attempt is given up as lost
    after start_by + timeout + lease; the retry fares the same; the job fails and the step
    is dead-lettered instead of the job running for ever."""
    deadline_s, timeout_s, visibility_s = 1.0, 0.5, 1.0
    settings = make_settings(redis_settings, dispatch_deadline_s=deadline_s,
                             visibility_timeout_s=visibility_s, max_attempts=2)
    rt = Runtime(settings, redis_client)
    try:
        rt.start_shards()
        t0 = time.monotonic()
        job_id = await rt.submit([{"action": "click", "selector": "#a", "timeout": timeout_s},
                                  {"action": "click", "selector": "#b", "timeout": timeout_s}])
        dead = PoolWorker("browser", NoopExecutor(), settings, replica_id="dead",
                          redis=redis_client)
        leased = await _lease_with_dead_consumer(dead, "browser")
        job = await rt.wait(job_id, ("failed",), within_s=30)
        ended_s = time.monotonic() - t0
        lost = [s for s in job["steps"] if s["status"] == "failed"]
        assert lost, job
        for step in lost:
            assert step["error_kind"] == "lost", step
            assert step["attempts"] == 2, step
            assert "no executor started step" in step["error"], step
        assert "failed after 2 attempt(s)" in job["error"], job["error"]
        # Not early: two attempts, each waited its deadline, timeout and lease.
        per_attempt = deadline_s + timeout_s + visibility_s
        assert ended_s >= 2 * per_attempt, ended_s
        dead_letters = await rt.shards[0].queue.list_dead(tenant="acme", count=10)
        mine = [d for d in dead_letters if d.fields.get("job") == job_id]
        assert len(mine) == 1 and "(lost)" in mine[0].reason, [d.reason for d in mine]
        reliability.record(
            "no executor for a capability (a step leased by a dead consumer, one never read)",
            "each attempt given up as lost after dispatch deadline + timeout + lease; "
            "retried; then the job fails and the step is dead-lettered",
            dispatch_deadline_s=deadline_s, step_timeout_s=timeout_s,
            visibility_timeout_s=visibility_s, max_attempts=2, leased_by_dead=len(leased),
            job_failed_after_s=round(ended_s, 2), dead_lettered=len(mine))
    finally:
        await rt.stop()


async def test_worker_does_not_start_a_step_past_its_start_by(
        redis_settings: RedisSettings, redis_client: aioredis.Redis) -> None:
    """A consumer comes back after the step's dispatch deadline (but before the shard gives
    the attempt up): it does not run the stale attempt, reports it expired, and runs the
    retry the policy dispatches; the effect happens once, by attempt 2."""
    settings = make_settings(redis_settings, dispatch_deadline_s=0.5)
    rt = Runtime(settings, redis_client)
    ledger = f"{rt.keys.prefix}:ledger"
    try:
        rt.start_shards()
        job_id = await rt.submit([{"action": "noop", "params": {"ledger": ledger},
                                   "timeout": 5}])
        await asyncio.sleep(1.2)
        rt.start_worker("noop", LedgerExecutor(REDIS_URL), "late")
        job = await rt.wait(job_id, within_s=10)
        step = job["steps"][0]
        assert step["attempts"] == 2, step
        runs = await redis_client.lrange(ledger, 0, -1)
        assert len(runs) == 1 and runs[0].startswith(f"{job_id}:0:2:late"), runs
        journal = await redis_client.xrange(journal_key(rt.keys, "acme",
                                                        job["conversation_id"]))
        retries = [e for _, f in journal for e in json.loads(f["e"]) if e["event"] == "retry"]
        assert len(retries) == 1 and "dispatch deadline" in retries[0]["error"], retries
    finally:
        await rt.stop()


async def test_reclaimed_step_runs_before_the_backlog(
        redis_settings: RedisSettings, redis_client: aioredis.Redis) -> None:
    """A step lost with a dead consumer is reclaimed as soon as its lease expired, with the
    next free slot, not after the whole backlog that keeps every slot busy."""
    visibility_s = 1.0
    settings = make_settings(redis_settings, visibility_timeout_s=visibility_s)
    rt = Runtime(settings, redis_client)
    try:
        rt.start_shards()
        lost_job = await rt.submit([{"action": "sleep", "params": {"ms": 50}}])
        dead = PoolWorker("noop", NoopExecutor(), settings, replica_id="dead",
                          redis=redis_client)
        leased = await _lease_with_dead_consumer(dead, "noop")
        assert len(leased) == 1 and leased[0].fields["job"] == lost_job
        lost_at = time.time()
        backlog = [await rt.submit([{"action": "sleep", "params": {"ms": 100}}])
                   for _ in range(50)]  # 50 x 100 ms on 2 slots: 2.5 s of work
        rt.start_worker("noop", NoopExecutor(), "alive", workers=2)
        lost = await rt.wait(lost_job, within_s=20)
        for job_id in backlog:
            await rt.wait(job_id, within_s=20)
        started = lost["steps"][0]["started_at"]
        reclaimable = lost_at + visibility_s + settings.queue.reclaim_interval_s
        starts = []
        for job_id in backlog:
            other = (await rt.store.load("acme", job_id)).steps[0].started_at
            assert other is not None
            starts.append(other)
        ahead = [t for t in starts if reclaimable < t < started]
        assert lost["steps"][0]["replica"] == "alive"
        # At most a slot or two's worth of steps may start between the moment the lease
        # could be reclaimed and the reclaimed step (a tick of slack), not the backlog.
        assert len(ahead) <= 4, (len(ahead), started - reclaimable)
        assert started < max(starts) - 0.5, (started, max(starts))
    finally:
        await rt.stop()


async def test_dead_replica_own_stream_is_deleted(
        redis_settings: RedisSettings, redis_client: aioredis.Redis) -> None:
    """The replica owning a session dies: its session restarts elsewhere and its own stream
    (session steps nobody will read) is deleted."""
    runtime = Runtime(make_settings(redis_settings), redis_client)
    try:
        await _dead_replica_scenario(runtime)
    finally:
        await runtime.stop()


async def _dead_replica_scenario(runtime: Runtime) -> None:
    runtime.start_shards()
    first = runtime.start_worker("browser", SessionProbe(), "b-doomed", workers=2)
    todos = [{"action": "playwright", "params": {"first": True}},
             {"action": "click", "selector": "#a", "depends_on": [0], "params": {"ms": 4000}},
             {"action": "click", "selector": "#b", "depends_on": [1]}]
    job_id = await runtime.submit(todos)
    own = runtime.keys.replica_stream("browser", "b-doomed")

    async def step1_running() -> bool:
        job = await runtime.store.load("acme", job_id)
        return job.steps[0].status.value == "succeeded" and bool(first.running)

    await wait_for(step1_running)
    # An orphan: a session step waiting in the doomed replica's own stream.
    await runtime.redis.xadd(own, {"d": "{}", "job": "x", "step": "0", "tenant": "acme"})
    for task in runtime.tasks:
        if not task.done() and getattr(task.get_coro(), "__self__", None) is first:
            task.cancel()
    first._stopping.set()
    for _, task in list(first.running.values()):
        task.cancel()
    for bg in first._background:
        bg.cancel()
    await runtime.redis.delete(runtime.keys.replica_alive("browser", "b-doomed"))
    runtime.start_worker("browser", SessionProbe(), "b-survivor", workers=2)
    job = await runtime.wait(job_id, within_s=30)
    assert {s["replica"] for s in job["steps"]} == {"b-survivor"}
    assert not await runtime.redis.exists(own)


async def test_poison_inbox_entry_is_dead_lettered_and_its_job_failed(
        redis_settings: RedisSettings, redis_client: aioredis.Redis) -> None:
    """A job record whose LAM request is invalid makes processing its submit raise every
    time: after poison_max_deliveries failures the entry is acknowledged, dead-lettered
    with the reason and the job marked failed, instead of being redelivered for ever."""
    settings = make_settings(redis_settings, poison_max_deliveries=2)
    rt = Runtime(settings, redis_client)
    try:
        rt.start_shards()
        rt.start_worker("noop", NoopExecutor(), "noop-1")
        meta = JobMeta(job_id=new_job_id(), tenant="acme", conversation_id="c-poison",
                       shard=0, todos=[{"action": "noop"}], request={"type": "bogus"})
        await rt.store.submit(meta, idempotency_key=None, body_digest="x")
        job = await rt.wait(meta.job_id, ("failed",), within_s=20)
        assert "failed 2 times" in job["error"] and "submit" in job["error"], job["error"]
        inbox = rt.keys.shard_inbox(meta.shard)
        dead = await rt.shards[0].queue.list_dead(tenant="acme", count=10)
        mine = [d for d in dead if d.stream == inbox]
        assert len(mine) == 1 and mine[0].fields.get("j") == meta.job_id, dead
        assert "failed 2 times" in mine[0].reason
        assert (await redis_client.xpending(inbox, GROUP))["pending"] == 0
        # Healthy work on the same shard goes on.
        ok = await rt.submit([{"action": "noop"}], conv="c-poison")
        await rt.wait(ok)
    finally:
        await rt.stop()
