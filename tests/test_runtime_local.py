"""The durable runtime without Ray: JobStore intake → ConversationShard → PoolWorker →
result → next steps, on the real Redis, all in one event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from actors.errors import IdempotencyMismatch, InternalError
from actors.executors.noop import NoopExecutor
from actors.executors.testing import LedgerExecutor, SessionProbe
from actors.jobs import JobMeta
from actors.jobstore import JobStore, body_hash, new_job_id
from actors.keys import Keys
from actors.settings import RedisSettings, Settings
from actors.shard import ShardRuntime
from actors.worker import PoolWorker
from tests.redis_fixtures import REDIS_URL

pytest_plugins = ("tests.redis_fixtures",)

DIAMOND = [
    {"action": "noop", "name": "A"},
    {"action": "noop", "name": "B", "depends_on": [0]},
    {"action": "noop", "name": "C", "depends_on": [0]},
    {"action": "noop", "name": "D", "depends_on": [1, 2]},
]


def make_settings(redis_settings: RedisSettings, inform: str = "steps", **queue: Any
                  ) -> Settings:
    q = {"visibility_timeout_s": 2.0, "heartbeat_interval_s": 0.3, "reclaim_interval_s": 0.2,
         "backoff_base_s": 0.05, "backoff_max_s": 0.2, **queue}
    return Settings(redis=redis_settings.model_dump(), queue=q,
                    runtime={"shards": 2, "inform": inform})


class Runtime:
    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.redis.key_prefix)
        self.store = JobStore(redis, self.keys, shards=2)
        self.tasks: list[asyncio.Task[None]] = []
        self.shards: list[ShardRuntime] = []
        self.workers: list[PoolWorker] = []

    def start_shards(self, clock: Callable[[], float] = time.time) -> None:
        for i in range(2):
            shard = ShardRuntime(i, self.settings, redis=self.redis, clock=clock)
            self.shards.append(shard)
            self.tasks.append(asyncio.create_task(shard.run()))

    def start_worker(self, capability: str, executor: Any, replica: str,
                     workers: int = 4) -> PoolWorker:
        worker = PoolWorker(capability, executor, self.settings, replica_id=replica,
                            workers=workers, redis=self.redis)
        self.workers.append(worker)
        self.tasks.append(asyncio.create_task(worker.run()))
        return worker

    async def submit(self, todos: list[dict[str, Any]], *, tenant: str = "acme",
                     conv: str | None = None, key: str | None = None) -> str:
        meta = JobMeta(job_id=new_job_id(), tenant=tenant,
                       conversation_id=conv or f"c-{new_job_id()[:8]}", shard=0, todos=todos)
        acc = await self.store.submit(meta, idempotency_key=key, body_digest=body_hash(todos))
        return acc.job_id

    async def wait(self, job_id: str, statuses: tuple[str, ...] = ("succeeded",),
                   tenant: str = "acme", within_s: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            job = await self.store.load(tenant, job_id)
            if job.status.value in statuses:
                return job.public()
            await asyncio.sleep(0.02)
        job = await self.store.load(tenant, job_id)
        raise AssertionError(f"job {job_id} still {job.status.value}: {job.public()}")

    async def stop(self) -> None:
        for shard in self.shards:
            shard.stop()
        for worker in self.workers:
            await worker.shutdown(grace_s=0.5)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def runtime(redis_settings: RedisSettings, redis_client: aioredis.Redis
                  ) -> AsyncIterator[Runtime]:
    rt = Runtime(make_settings(redis_settings), redis_client)
    yield rt
    await rt.stop()


async def test_diamond_runs_in_dependency_order(runtime: Runtime) -> None:
    runtime.start_shards()
    runtime.start_worker("noop", NoopExecutor(), "noop-1")
    job_id = await runtime.submit(DIAMOND)
    job = await runtime.wait(job_id)
    steps = job["steps"]
    assert [s["status"] for s in steps] == ["succeeded"] * 4
    assert steps[0]["finished_at"] <= steps[1]["started_at"]
    assert steps[0]["finished_at"] <= steps[2]["started_at"]
    assert max(steps[1]["finished_at"], steps[2]["finished_at"]) <= steps[3]["started_at"]
    assert all(s["attempts"] == 1 for s in steps)


async def test_replies_follow_the_protocol(runtime: Runtime) -> None:
    runtime.start_shards()
    runtime.start_worker("noop", NoopExecutor(), "noop-1")
    from actors import lam
    req = lam.Request(sender="agent://channel/chat", to=("agent://scheduler/cpa",),
                      task="diamond", context=lam.Context(tenant="acme"),
                      correlation=lam.Correlation(conversation_id="conv-r"))
    meta = JobMeta(job_id=new_job_id(), tenant="acme", conversation_id="conv-r", shard=0,
                   todos=DIAMOND, request=req.wire())
    await runtime.store.submit(meta, idempotency_key=None, body_digest="x")
    await runtime.wait(meta.job_id)
    entries = await runtime.redis.xrange(runtime.keys.outbox("acme", "conv-r"))
    msgs = [lam.decode(e[1]["m"]) for e in entries]
    assert [m.type for m in msgs] == ["agree", "inform", "inform", "inform", "inform", "done"]
    assert all(m.correlation.in_reply_to == req.id for m in msgs)
    assert all(m.payload["job_id"] == meta.job_id for m in msgs)
    # The conversation's keys expire `conversation_retention_s` after its last event.
    keep = runtime.settings.queue.conversation_retention_s
    from actors.shard import journal_key
    for key in (runtime.keys.outbox("acme", "conv-r"), runtime.keys.conversation("acme", "conv-r"),
                journal_key(runtime.keys, "acme", "conv-r")):
        assert 0 < await runtime.redis.ttl(key) <= keep, key


async def test_idempotent_intake(runtime: Runtime) -> None:
    first = await runtime.submit(DIAMOND, key="k1", conv="c1")
    again = await runtime.submit(DIAMOND, key="k1", conv="c1")
    assert first == again
    with pytest.raises(IdempotencyMismatch):
        await runtime.submit(DIAMOND[:1], key="k1", conv="c1")
    page, total = await runtime.store.list("acme", status=None, offset=0, limit=10)
    assert total == 1 and page[0]["job_id"] == first


async def test_retry_with_backoff_then_failure_skips_dependents(runtime: Runtime) -> None:
    runtime.start_shards()
    runtime.start_worker("noop", NoopExecutor(), "noop-1")
    todos = [{"action": "noop", "params": {"fail": "boom"}, "max_attempts": 3},
             {"action": "noop", "depends_on": [0]}]
    job_id = await runtime.submit(todos)
    job = await runtime.wait(job_id, ("failed",))
    assert job["steps"][0]["status"] == "failed"
    assert job["steps"][0]["attempts"] == 3
    assert job["steps"][1]["status"] == "skipped"
    assert "boom" in job["error"]


async def test_non_retryable_fails_at_once(runtime: Runtime) -> None:
    runtime.start_shards()
    runtime.start_worker("noop", NoopExecutor(), "noop-1")
    job_id = await runtime.submit([{"action": "noop", "params": {
        "fail": "bad selector", "fail_kind": "non_retryable"}}])
    job = await runtime.wait(job_id, ("failed",))
    assert job["steps"][0]["attempts"] == 1


async def test_cancel_and_retry(runtime: Runtime) -> None:
    runtime.start_shards()
    runtime.start_worker("noop", NoopExecutor(), "noop-1")
    todos = [{"action": "sleep", "params": {"ms": 3000}, "timeout": 10},
             {"action": "noop", "depends_on": [0]}]
    job_id = await runtime.submit(todos)
    await asyncio.sleep(0.5)
    await runtime.store.send_control("acme", job_id, "cancel")
    job = await runtime.wait(job_id, ("cancelled",), within_s=5)
    assert {s["status"] for s in job["steps"]} == {"cancelled"}
    await runtime.store.send_control("acme", job_id, "retry")
    job = await runtime.wait(job_id, ("succeeded",), within_s=15)
    assert job["steps"][1]["status"] == "succeeded"


async def test_session_affinity_across_replicas(runtime: Runtime) -> None:
    runtime.start_shards()
    for r in ("b-1", "b-2", "b-3"):
        runtime.start_worker("browser", SessionProbe(), r, workers=2)
    jobs = []
    for _ in range(6):
        todos = [{"action": "playwright", "params": {"first": True, "ms": 20}},
                 {"action": "click", "selector": "#a", "depends_on": [0], "params": {"ms": 20}},
                 {"action": "type", "selector": "#b", "text": "x", "depends_on": [1]},
                 {"action": "click", "selector": "#c", "depends_on": [2]}]
        jobs.append(await runtime.submit(todos))
    for job_id in jobs:
        job = await runtime.wait(job_id)
        replicas = {s["replica"] for s in job["steps"]}
        assert len(replicas) == 1, job


async def test_lost_lease_is_reclaimed(runtime: Runtime, redis_settings: RedisSettings) -> None:
    """A consumer that leased a step and died never completes; another one reclaims it."""
    runtime.start_shards()
    job_id = await runtime.submit([{"action": "noop"}])
    # A dead consumer: lease the entry and never heartbeat or complete.
    dead = PoolWorker("noop", NoopExecutor(), runtime.settings, replica_id="dead",
                      redis=runtime.redis)
    leases: list[Any] = []
    for _ in range(50):
        leases = await dead.queue.read("noop", "dead", count=1, block_ms=100)
        if leases:
            break
    assert leases
    runtime.start_worker("noop", NoopExecutor(), "alive")
    job = await runtime.wait(job_id, within_s=15)
    assert job["steps"][0]["replica"] == "alive"


async def wait_for(pred: Callable[[], Awaitable[bool]], within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_shard_restart_resumes(runtime: Runtime) -> None:
    """Stop a shard mid-job, start a fresh one: the job completes, no step ran twice."""
    runtime.start_worker("noop", NoopExecutor(), "noop-1")
    todos = [{"action": "sleep", "params": {"ms": 50}}]
    for i in range(1, 10):
        todos.append({"action": "sleep", "params": {"ms": 50}, "depends_on": [i - 1]})
    runtime.start_shards()
    job_id = await runtime.submit(todos, conv="resume-me")
    await asyncio.sleep(0.3)
    for shard in runtime.shards:
        shard.stop()
    for task in runtime.tasks[1:]:
        task.cancel()
    await asyncio.sleep(0.3)
    runtime.shards.clear()
    runtime.start_shards()
    job = await runtime.wait(job_id, within_s=20)
    assert all(s["attempts"] == 1 for s in job["steps"]), job["steps"]


async def test_exhausted_step_is_dead_lettered_and_replayable(runtime: Runtime) -> None:
    runtime.start_shards()
    runtime.start_worker("noop", NoopExecutor(), "noop-1")
    job_id = await runtime.submit([{"action": "noop", "params": {"fail": "boom"},
                                    "max_attempts": 2}])
    await runtime.wait(job_id, ("failed",))
    dead = await runtime.shards[0].queue.list_dead(tenant="acme", count=10)
    mine = [d for d in dead if d.fields.get("job") == job_id]
    assert len(mine) == 1
    assert "after 2 attempt(s)" in mine[0].reason and "boom" in mine[0].reason
    assert mine[0].stream == runtime.keys.task_stream("noop", "normal")


async def test_lost_session_replica_restarts_session_elsewhere(runtime: Runtime) -> None:
    """D8: the replica owning a session dies → the session re-runs from its first step on
    another replica, and every step of the job ends up on that one replica."""
    runtime.start_shards()
    first = runtime.start_worker("browser", SessionProbe(), "b-doomed", workers=2)
    todos = [{"action": "playwright", "params": {"first": True}},
             {"action": "click", "selector": "#a", "depends_on": [0], "params": {"ms": 4000}},
             {"action": "click", "selector": "#b", "depends_on": [1]}]
    job_id = await runtime.submit(todos)

    async def step1_running() -> bool:
        job = await runtime.store.load("acme", job_id)
        return job.steps[0].status.value == "succeeded" and bool(first.running)

    await wait_for(step1_running)
    # Crash the owner: no graceful shutdown, its liveness key expires (TTL) by itself.
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
    assert job["steps"][0]["attempts"] == 2  # the session's first step ran again


class ShiftedClock:
    """Wall-clock time plus an offset the test moves forward (the injected clock)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_delayed_retry_of_10_minutes_runs_exactly_once(
        redis_settings: RedisSettings, redis_client: aioredis.Redis, reliability: Any) -> None:
    """A step fails retryably once; the policy (600 s, no jitter) parks its retry in the
    shard's delayed set. Nothing runs while real seconds pass; once the injected clock
    (shared by shard, queue and orchestrator) moves 600 s on, the retry runs exactly once,
    though two timer loops per shard (the shard's and a zombie twin's) race to move it."""
    settings = make_settings(redis_settings, backoff_base_s=600.0, backoff_max_s=600.0,
                             backoff_jitter=0.0, max_attempts=3)
    rt = Runtime(settings, redis_client)
    clock = ShiftedClock()
    ledger_key = f"{rt.keys.prefix}:ledger:delayed"
    twins = [ShardRuntime(i, settings, redis=redis_client, clock=clock) for i in range(2)]
    twin_timers = [asyncio.create_task(twin._timers()) for twin in twins]
    executor = LedgerExecutor(REDIS_URL)
    try:
        rt.start_shards(clock)
        rt.start_worker("noop", executor, "ledger-1")
        job_id = await rt.submit([{"action": "noop", "params": {"ledger": ledger_key,
                                                                "fail_attempts": 1}}])
        shard = (await rt.store.load("acme", job_id)).meta.shard
        delayed = rt.keys.shard_delayed(shard)

        async def parked() -> bool:
            return await redis_client.zcard(delayed) == 1

        await wait_for(parked)
        due = (await redis_client.zrange(delayed, 0, -1, withscores=True))[0][1]
        assert 599.0 <= due - clock() <= 600.5, due - clock()
        await asyncio.sleep(3.0)  # real time passes; the injected clock is still 600 s short
        runs = await redis_client.lrange(ledger_key, 0, -1)
        assert runs == [f"{job_id}:0:1:failed"], runs
        job = await rt.wait(job_id, ("running",))
        parked_step = job["steps"][0]
        assert parked_step["status"] == "queued", parked_step  # waiting for its due time
        assert parked_step["error"] == "injected failure of attempt 1", parked_step
        assert await redis_client.zcard(delayed) == 1

        clock.offset += 600.0
        advanced = time.monotonic()
        job = await rt.wait(job_id, within_s=10)
        ran_after_s = time.monotonic() - advanced
        await asyncio.sleep(2.0)  # time for a duplicate to show up, were there one
        runs = await redis_client.lrange(ledger_key, 0, -1)
        assert len(runs) == 2 and runs[0] == f"{job_id}:0:1:failed", runs
        assert runs[1].startswith(f"{job_id}:0:2:ledger-1:"), runs
        assert job["steps"][0]["attempts"] == 2
        assert await redis_client.zcard(delayed) == 0
        reliability.record("delayed retry of 10 min (injected clock), two timer movers per "
                           "shard", "not run early; runs exactly once when due",
                           retry_delay_s=600, runs_before_due=0,
                           retry_runs=len(runs) - 1, ran_after_clock_advance_s=round(
                               ran_after_s, 2))
    finally:
        for twin in twins:
            twin.stop()
        await asyncio.gather(*twin_timers, return_exceptions=True)
        await rt.stop()


async def test_retried_intake_of_the_same_call_is_accepted(runtime: Runtime) -> None:
    """The client re-sends an intake whose reply was lost (it ran once already): the job is
    accepted, not a 500 "already exists"; another job under the same id still is refused."""
    meta = JobMeta(job_id=new_job_id(), tenant="acme", conversation_id="c-retried", shard=0,
                   todos=[{"action": "noop"}])
    first = await runtime.store.submit(meta, idempotency_key=None, body_digest="x")
    again = await runtime.store.submit(meta, idempotency_key=None, body_digest="x")
    assert first.created and again.created and again.job_id == first.job_id
    assert len(await runtime.redis.xrange(runtime.keys.shard_inbox(meta.shard))) == 1
    other = JobMeta(job_id=meta.job_id, tenant="acme", conversation_id="c-other", shard=0,
                    todos=[{"action": "noop"}], created_at=meta.created_at + 1)
    with pytest.raises(InternalError):
        await runtime.store.submit(other, idempotency_key=None, body_digest="x")
    assert len(await runtime.store.submit_many([meta])) == 1


async def test_cancel_reaches_a_step_whose_worker_missed_the_signal(runtime: Runtime) -> None:
    """The pub/sub cancel is lossy (a worker cut off from Redis misses it): the lease
    heartbeat also reads the job's status, so the step stops within a heartbeat interval."""
    runtime.start_shards()
    worker = PoolWorker("noop", NoopExecutor(), runtime.settings, replica_id="deaf-1",
                        workers=2, redis=runtime.redis)

    async def deaf() -> None:  # never hears a cancel signal
        await asyncio.Event().wait()

    worker._cancel_listener = deaf  # type: ignore[method-assign]
    runtime.workers.append(worker)
    runtime.tasks.append(asyncio.create_task(worker.run()))
    job_id = await runtime.submit([{"action": "sleep", "params": {"ms": 20_000},
                                    "timeout": 60}])
    deadline = time.monotonic() + 5
    while not worker.running and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    assert worker.running, "the step started"
    await runtime.store.send_control("acme", job_id, "cancel")
    await runtime.wait(job_id, ("cancelled",), within_s=5)
    t0 = time.monotonic()
    while worker.running and time.monotonic() - t0 < 5:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    stopped_after = time.monotonic() - t0
    assert not worker.running, "the 20 s step was stopped by the heartbeat's status check"
    assert stopped_after < 3 * runtime.settings.queue.heartbeat_interval_s + 1
