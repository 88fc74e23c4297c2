"""Fault injection on the real system (local Ray + Serve + Redis): kill -9 an executor replica
mid-step, kill -9 a ConversationShard mid-job, kill -9 and restart Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from actors.jobstore import shard_for
from tests.ray_fixtures import ACME, System, free_port, start_system, stop_system
from tests.redis_fixtures import REDIS_URL

pytest_plugins = ("tests.redis_fixtures", "tests.ray_fixtures")
pytestmark = pytest.mark.ray

LEDGER_POOL = {"capability": "noop", "executor": "actors.executors.testing:LedgerExecutor",
               "workers": 8, "executor_args": {"redis_url": REDIS_URL}}


@pytest.fixture(scope="module")
def ledger_system(ray_session: str) -> Iterator[System]:
    sys_ = start_system(ray_session, pools=(LEDGER_POOL,))
    try:
        yield sys_
    finally:
        stop_system(sys_)


def ledger(system: System, name: str) -> list[str]:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        return list(client.lrange(f"{system.prefix}:ledger:{name}", 0, -1))
    finally:
        client.close()


def pool_pid(system: System) -> int:
    from ray import serve as ray_serve

    handle = ray_serve.get_app_handle(f"pool-noop-{system.prefix}")
    return int(handle.status.remote().result(timeout_s=30)["pid"])


def test_sigkill_executor_mid_step_reclaims_and_completes(ledger_system: System) -> None:
    system = ledger_system
    key = f"{system.prefix}:ledger:exec"
    todos = [{"action": "sleep", "params": {"ms": 2500, "ledger": key}, "timeout": 30},
             {"action": "noop", "depends_on": [0], "params": {"ledger": key}}]
    pid = pool_pid(system)
    with system.client() as c:
        job_id = c.post("/schedule", json={"todos": todos}).json()["job_id"]
    time.sleep(1.0)  # step 0 is running (2.5 s) in the replica
    os.kill(pid, signal.SIGKILL)
    print(f"\n[fault] killed executor replica pid {pid} mid-step")
    started = time.monotonic()
    job = system.wait_job(job_id, within_s=90)
    print(f"[fault] job completed {time.monotonic() - started:.1f} s after the kill")
    entries = ledger(system, "exec")
    per_step = Counter(e.split(":")[1] for e in entries)
    # The killed attempt never produced its effect; the reclaimed one did, exactly once.
    assert per_step == {"0": 1, "1": 1}, entries
    assert job["steps"][0]["status"] == "succeeded"
    assert pool_pid(system) != pid


def test_kill_after_effect_before_ack_does_not_duplicate_effect(ledger_system: System) -> None:
    """The executor performs a side effect and dies (kill -9 semantics: os._exit) before it
    acknowledges. The step is reclaimed; verify-before-retry finds the effect in the ledger,
    so the effect happens exactly once and the job completes."""
    system = ledger_system
    key = f"{system.prefix}:ledger:effect"
    todos = [{"action": "write_file", "capability": "noop",
              "params": {"ledger": key, "crash_after_effect": True}},
             {"action": "noop", "depends_on": [0], "params": {"ledger": key}}]
    pid = pool_pid(system)
    with system.client() as c:
        job_id = c.post("/schedule", json={"todos": todos}).json()["job_id"]
    started = time.monotonic()
    job = system.wait_job(job_id, within_s=90)
    print(f"\n[fault] executor pid {pid} died after the effect, before the ack; job completed "
          f"in {time.monotonic() - started:.1f} s")
    entries = ledger(system, "effect")
    per_step = Counter(e.split(":")[1] for e in entries)
    assert per_step == {"0": 1, "1": 1}, entries  # the effect happened exactly once
    assert job["steps"][0]["result"] == {"verified": True}
    assert pool_pid(system) != pid


def test_sigkill_shard_mid_job_resumes_without_rerunning_steps(ledger_system: System) -> None:
    import ray

    system = ledger_system
    key = f"{system.prefix}:ledger:shard"
    conv = "shard-kill-conv"
    todos = [{"action": "sleep", "params": {"ms": 150, "ledger": key}}]
    for i in range(1, 12):
        todos.append({"action": "sleep", "params": {"ms": 150, "ledger": key},
                      "depends_on": [i - 1]})
    shard = shard_for("acme", conv, 2)
    actor = ray.get_actor(f"{system.prefix}-shard-{shard}", namespace=system.namespace)
    pid = ray.get(actor.pid.remote(), timeout=30)
    with system.client() as c:
        job_id = c.post("/schedule", json={"todos": todos, "conversation_id": conv}
                        ).json()["job_id"]
    time.sleep(0.8)
    os.kill(pid, signal.SIGKILL)
    print(f"\n[fault] killed ConversationShard {shard} pid {pid} mid-job")
    job = system.wait_job(job_id, within_s=90)
    assert ray.get(actor.pid.remote(), timeout=30) != pid  # Ray restarted it
    entries = ledger(system, "shard")
    per_step = Counter(e.split(":")[1] for e in entries)
    assert sorted(per_step) == sorted(str(i) for i in range(12))
    assert max(per_step.values()) == 1, per_step  # no step ran twice
    assert all(s["attempts"] == 1 for s in job["steps"])


def _start_redis(port: int, data: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if client.ping():
                client.close()
                return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("redis-server did not start")


def test_redis_restart_accepted_jobs_complete(ray_session: str) -> None:
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="cpa-redis-"))
    proc = _start_redis(port, data)
    system = start_system(ray_session, redis_url=f"redis://127.0.0.1:{port}/0")
    accepted: list[str] = []
    try:
        todos = [{"action": "sleep", "params": {"ms": 300}},
                 {"action": "noop", "depends_on": [0]}]
        with system.client() as c:
            for _ in range(20):
                r = c.post("/schedule", json={"todos": todos})
                assert r.status_code == 202
                accepted.append(r.json()["job_id"])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        print(f"\n[fault] redis-server killed with {len(accepted)} jobs accepted")
        with system.client() as c:
            r = c.post("/schedule", json={"todos": todos})
        assert r.status_code == 503, r.text
        assert "Retry-After" in r.headers
        time.sleep(2)
        proc = _start_redis(port, data)
        restarted = time.monotonic()
        for job_id in accepted:
            system.wait_job(job_id, within_s=120)
        print(f"[fault] all {len(accepted)} accepted jobs completed "
              f"{time.monotonic() - restarted:.1f} s after the restart; lost: 0")
        with system.client() as c:
            assert c.post("/schedule", json={"todos": todos}).status_code == 202
    finally:
        try:
            stop_system(system)
        finally:
            proc.kill()
            proc.wait(timeout=10)


def test_health_is_503_free_when_pool_missing(ray_session: str) -> None:
    """No pool consumes a capability → health says so (stalled), it does not hang."""
    system = start_system(ray_session, pools=({"capability": "noop", "workers": 2},))
    try:
        with system.client() as c:
            r = c.post("/schedule", json={"todos": [{"action": "read_file",
                                                     "params": {"path": "x"}}]})
            assert r.status_code == 202
            deadline = time.monotonic() + 10
            state = ""
            while time.monotonic() < deadline:
                health = c.get("/health").json()
                state = health["pools"]["file"]["state"]
                if state == "stalled":
                    break
                time.sleep(0.2)
        assert state == "stalled"
        assert any("file" in p for p in health["problems"])
        assert httpx.get(f"{system.url}/health", timeout=5).status_code == 200
    finally:
        stop_system(system)


_ = ACME


def test_overload_sheds_excess_with_retry_after_and_admitted_jobs_finish(
        ray_session: str) -> None:
    """10x more work than the pool can take: the excess gets 503 + Retry-After (never a 5xx
    of another kind), everything admitted completes."""
    import asyncio

    import aiohttp

    system = start_system(ray_session, pools=({"capability": "noop", "workers": 2},),
                          http={"max_backlog": 20, "backlog_refresh_s": 0.05})
    todos = [{"action": "sleep", "params": {"ms": 100}}]
    statuses: Counter[int] = Counter()
    accepted: list[str] = []
    retry_after: list[str] = []

    async def fire() -> None:
        async with aiohttp.ClientSession(headers=ACME) as session:
            async def one() -> None:
                async with session.post(f"{system.url}/schedule", json={"todos": todos}) as r:
                    statuses[r.status] += 1
                    if r.status == 202:
                        accepted.append((await r.json())["job_id"])
                    elif r.status == 503:
                        retry_after.append(r.headers.get("Retry-After", ""))
            for _ in range(10):  # 10 waves of 40 against a capacity of ~20 steps/s
                await asyncio.gather(*(one() for _ in range(40)))
                await asyncio.sleep(0.1)

    try:
        asyncio.run(fire())
        print(f"\n[fault] overload: {dict(statuses)}")
        assert set(statuses) <= {202, 503}, statuses
        assert statuses[503] > 0 and statuses[202] > 0
        assert all(v.isdigit() and int(v) >= 1 for v in retry_after)
        for job_id in accepted:
            system.wait_job(job_id, within_s=120)
    finally:
        stop_system(system)
