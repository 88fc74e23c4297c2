"""SIGSTOP an executor longer than its lease: the step is reclaimed by another executor and
the stopped one's late result is fenced off. Executors run as thin agent processes
(`cpa agent`, the Windows-host deployment), shards in-process, on the real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from actors.jobs import JobMeta
from actors.jobstore import JobStore, body_hash, new_job_id
from actors.keys import Keys
from actors.settings import RedisSettings, Settings
from actors.shard import ShardRuntime

pytest_plugins = ("tests.redis_fixtures",)

QUEUE = {"visibility_timeout_s": 1.5, "heartbeat_interval_s": 0.3, "reclaim_interval_s": 0.2}


def agent(replica: str, redis_settings: RedisSettings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CPA_REDIS__URL": redis_settings.url,
           "CPA_REDIS__KEY_PREFIX": redis_settings.key_prefix,
           **{f"CPA_QUEUE__{k.upper()}": str(v) for k, v in QUEUE.items()}}
    return subprocess.Popen(
        [sys.executable, "-m", "actors.cli", "agent", "--capability", "noop",
         "--executor", "actors.executors.testing:LedgerExecutor", "--workers", "2",
         "--replica", replica], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
async def shards(redis_settings: RedisSettings, redis_client: aioredis.Redis
                 ) -> AsyncIterator[Settings]:
    settings = Settings(redis=redis_settings.model_dump(), queue=QUEUE, runtime={"shards": 1})
    shard = ShardRuntime(0, settings, redis=redis_client)
    task = asyncio.create_task(shard.run())
    yield settings
    shard.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_sigstop_longer_than_lease_is_reclaimed_and_fenced(
        shards: Settings, redis_client: aioredis.Redis, redis_settings: RedisSettings,
        reliability: Any) -> None:
    keys = Keys(redis_settings.key_prefix)
    store = JobStore(redis_client, keys, shards=1)
    ledger = f"{redis_settings.key_prefix}:ledger"
    agents = {name: agent(name, redis_settings) for name in ("agent-a", "agent-b")}
    try:
        for name, proc in agents.items():  # both are up (their liveness keys exist)
            deadline = time.monotonic() + 30
            while not await redis_client.exists(keys.replica_alive("noop", name)):
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
                await asyncio.sleep(0.1)
        todos: list[dict[str, Any]] = [{"action": "sleep", "params": {"ms": 1200,
                                                                      "ledger": ledger}}]
        meta = JobMeta(job_id=new_job_id(), tenant="acme", conversation_id="stop", shard=0,
                       todos=todos)
        await store.submit(meta, idempotency_key=None, body_digest=body_hash(todos))
        # Who leased it? The stream's pending list names the consumer.
        stream = keys.task_stream("noop", "normal")
        holder = ""
        deadline = time.monotonic() + 10
        while not holder and time.monotonic() < deadline:
            pending: Any = await redis_client.xpending_range(stream, "cpa", "-", "+", 1)
            holder = pending[0]["consumer"] if pending else ""
            await asyncio.sleep(0.02)
        assert holder in agents
        stopped = agents[holder]
        other = next(n for n in agents if n != holder)
        stopped.send_signal(signal.SIGSTOP)
        print(f"\n[fault] SIGSTOP {holder} (pid {stopped.pid}) holding the step")
        t0 = time.monotonic()
        deadline = t0 + 20
        while True:
            job = await store.load("acme", meta.job_id)
            if job.status.value == "succeeded":
                break
            assert time.monotonic() < deadline, job.public()
            await asyncio.sleep(0.05)
        recovered = time.monotonic() - t0
        assert job.steps[0].replica == other
        stopped.send_signal(signal.SIGCONT)
        await asyncio.sleep(2.0)  # the late one wakes up and tries to commit
        job = await store.load("acme", meta.job_id)
        assert job.steps[0].replica == other and job.steps[0].attempts == 1
        journal = await redis_client.xrange(keys.conversation("acme", "stop") + ":journal")
        ignored = sum('"result_ignored"' in e[1]["e"] for e in journal)
        print(f"[fault] reclaimed by {other} after {recovered:.1f} s; late result fenced "
              f"(results ignored by the orchestrator: {ignored})")
        reliability.record("SIGSTOP an executor longer than its lease (1.5 s)",
                           "step reclaimed, late result fenced by lease epoch",
                           reclaimed_after_s=round(recovered, 1), late_results_accepted=0,
                           attempts=job.steps[0].attempts)
    finally:
        for proc in agents.values():
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        for proc in agents.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
