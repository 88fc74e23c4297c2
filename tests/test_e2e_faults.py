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
from typing import Any

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


def test_sigkill_executor_mid_step_reclaims_and_completes(ledger_system: System,
                                                        reliability: Any) -> None:
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
    reliability.record("kill -9 executor replica before the effect", "effect exactly once, "
                       "job completes", jobs_lost=0, duplicate_effects=0,
                       recovery_s=round(time.monotonic() - started, 1))


def test_kill_after_effect_before_ack_does_not_duplicate_effect(ledger_system: System,
                                                                reliability: Any) -> None:
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
    reliability.record("kill -9 executor after the effect, before the ack",
                       "effect not duplicated (verify-before-retry), job completes",
                       jobs_lost=0, duplicate_effects=0,
                       recovery_s=round(time.monotonic() - started, 1))


def test_sigkill_shard_with_50_conversations_running_20_step_graphs(
        ledger_system: System, reliability: Any) -> None:
    import ray

    system = ledger_system
    key = f"{system.prefix}:ledger:shard"
    jobs: list[str] = []
    convs = [f"shard-kill-{i}" for i in range(50)]
    with system.client() as c:
        for conv in convs:
            todos = [{"action": "sleep", "params": {"ms": 10, "ledger": key}}]
            todos += [{"action": "sleep", "params": {"ms": 10, "ledger": key},
                       "depends_on": [i - 1]} for i in range(1, 20)]
            r = c.post("/schedule/batch", json={"jobs": [{"todos": todos,
                                                          "conversation_id": conv}]})
            jobs.append(r.json()["jobs"][0]["job_id"])
    victim = shard_for("acme", convs[0], 2)
    actor = ray.get_actor(f"{system.prefix}-shard-{victim}", namespace=system.namespace)
    pid = ray.get(actor.pid.remote(), timeout=30)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    print(f"\n[fault] killed ConversationShard {victim} pid {pid} with 50 conversations running")
    killed_wall = time.time()
    done = [system.wait_job(job_id, within_s=180) for job_id in jobs]
    recovery = max(job["updated_at"] for job in done) - killed_wall
    assert ray.get(actor.pid.remote(), timeout=30) != pid  # Ray restarted it
    entries = ledger(system, "shard")
    per_step = Counter(":".join(e.split(":")[:2]) for e in entries)
    assert len(per_step) == 50 * 20
    reruns = sum(n - 1 for n in per_step.values())
    assert reruns == 0, [k for k, n in per_step.items() if n > 1]
    assert all(s["attempts"] == 1 for job in done for s in job["steps"])
    reliability.record("kill -9 a ConversationShard, 50 conversations x 20-step graphs",
                       "all finish, completed steps not re-run", jobs_finished=f"{len(done)}/50",
                       steps_rerun=reruns, last_job_done_after_kill_s=round(recovery, 1))


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


def redis_kill_during_submissions(ray_session: str, reliability: Any, total: int,
                                  batch: int) -> None:
    """kill -9 Redis (AOF, appendfsync always) after a quarter of ``total`` job submissions
    were acknowledged, restart it 2 s later: every job that got a 2xx completes; clients see
    only 202/200 and 503 + Retry-After; the system reconnects by itself. 16 clients; with
    ``batch`` > 1 half of them submit through POST /schedule/batch, ``batch`` jobs a time."""
    import asyncio
    import threading

    import aiohttp

    from actors.keys import Keys

    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="cpa-redis-"))
    proc = _start_redis(port, data)
    url = f"redis://127.0.0.1:{port}/0"
    system = start_system(ray_session, redis_url=url)
    todos = [{"action": "noop"}, {"action": "noop", "depends_on": [0]}]
    accepted: list[str] = []
    statuses: Counter[int] = Counter()
    restart_wall: list[float] = []
    kill_after = total // 4

    async def submit() -> None:
        remaining = total
        async with aiohttp.ClientSession(headers=ACME) as session:
            async def client(size: int) -> None:
                nonlocal remaining
                while remaining > 0:
                    n = min(size, remaining)
                    remaining -= n
                    if size == 1:
                        req = session.post(f"{system.url}/schedule", json={"todos": todos})
                    else:
                        req = session.post(f"{system.url}/schedule/batch", json={
                            "jobs": [{"todos": todos} for _ in range(n)]})
                    try:
                        async with req as r:
                            statuses[r.status] += 1
                            if r.status == 202:
                                body = await r.json()
                                accepted.extend([body["job_id"]] if size == 1 else
                                                [j["job_id"] for j in body["jobs"]])
                            elif r.status == 503:
                                assert r.headers["Retry-After"].isdigit()
                                await asyncio.sleep(min(2.0, float(r.headers["Retry-After"])))
                    except aiohttp.ClientError:
                        statuses[0] += 1
            sizes = [1] * 8 + [batch] * 8 if batch > 1 else [1] * 16
            await asyncio.gather(*(client(size) for size in sizes))

    def chaos() -> None:
        nonlocal proc
        while len(accepted) < kill_after:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        print(f"\n[fault] redis-server killed after {len(accepted)} acknowledged jobs")
        time.sleep(2.0)
        proc = _start_redis(port, data)
        restart_wall.append(time.time())

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        started = time.monotonic()
        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        asyncio.run(submit())
        thread.join(timeout=60)
        submitted_s = time.monotonic() - started
        assert restart_wall, "Redis was never killed"
        # Every acknowledged job must reach succeeded (read from its status index).
        succeeded_key = Keys(system.prefix).jobs_by_status("acme", "succeeded")
        waiting = set(accepted)
        deadline = time.monotonic() + 120 + total / 100
        while waiting and time.monotonic() < deadline:
            waiting -= set(client.zrange(succeeded_key, 0, -1))
            time.sleep(0.5)
        lost = sorted(waiting)
        pipe = client.pipeline(transaction=False)
        for job_id in accepted:
            pipe.hget(Keys(system.prefix).job("acme", job_id), "updated_at")
        finished_at = max(float(v or 0) for v in pipe.execute())
        print(f"[fault] {dict(statuses)}; acknowledged {len(accepted)}, lost {len(lost)}; "
              f"submitted in {submitted_s:.1f} s")
        assert lost == [], lost[:10]
        assert set(statuses) <= {200, 202, 503}, statuses
        assert statuses[503] > 0  # the outage was seen, and answered properly
        reliability.record(
            f"kill -9 Redis (AOF always) during {total:,} submissions, restart after 2 s",
            "acknowledged jobs lost: 0; reconnects by itself",
            submissions=total, requests=sum(statuses.values()),
            acknowledged=len(accepted), lost=len(lost),
            answered_503=statuses[503],
            last_job_done_after_restart_s=round(finished_at - restart_wall[0], 1))
    finally:
        client.close()
        try:
            stop_system(system)
        finally:
            proc.kill()
            proc.wait(timeout=10)


def test_redis_kill_and_restart_during_submissions_loses_no_acknowledged_job(
        ray_session: str, reliability: Any) -> None:
    redis_kill_during_submissions(ray_session, reliability, total=800, batch=1)


@pytest.mark.slow
def test_redis_kill_and_restart_during_10000_submissions_loses_no_acknowledged_job(
        ray_session: str, reliability: Any) -> None:
    redis_kill_during_submissions(ray_session, reliability, total=10_000, batch=25)


def test_poison_step_dead_lettered_after_k_deliveries(ray_session: str,
                                                      reliability: Any) -> None:
    """A step that crashes its executor every time: after exactly K deliveries it is
    dead-lettered with the reason, its job fails, other jobs are unaffected."""
    pool = {**LEDGER_POOL, "workers": 4}
    system = start_system(ray_session, pools=(pool,),
                          queue={"poison_max_deliveries": 3, "visibility_timeout_s": 2.0})
    key = f"{system.prefix}:ledger:poison"
    try:
        with system.client() as c:
            poison = c.post("/schedule", json={"todos": [{"action": "noop", "params": {
                "ledger": key, "crash_always": True}}]}).json()["job_id"]
            healthy = c.post("/schedule", json={"todos": [{"action": "noop"}]}).json()["job_id"]
        t0 = time.monotonic()
        assert system.wait_job(healthy, within_s=60)["status"] == "succeeded"
        job = system.wait_job(poison, ("failed",), within_s=120)
        assert "poison: delivered" in job["error"], job
        with system.client() as c:
            dead = [d for d in c.get("/dlq").json()["entries"] if d["job_id"] == poison]
        assert len(dead) == 1 and dead[0]["deliveries"] == 3, dead
        attempts = len(ledger(system, "poison"))
        assert attempts == 3, attempts  # delivered (and crashed) exactly K times
        reliability.record("poison step (crashes its executor every time)",
                           "DLQ after exactly K deliveries, other jobs unaffected",
                           K=3, deliveries=attempts, dead_letters=len(dead),
                           failed_after_s=round(time.monotonic() - t0, 1))
    finally:
        stop_system(system)


def test_step_longer_than_visibility_timeout_runs_once(ledger_system: System,
                                                       reliability: Any) -> None:
    system = ledger_system
    key = f"{system.prefix}:ledger:long"
    todos = [{"action": "sleep", "params": {"ms": 7000, "ledger": key}, "timeout": 30}]
    with system.client() as c:
        job_id = c.post("/schedule", json={"todos": todos}).json()["job_id"]
    job = system.wait_job(job_id, within_s=60)
    runs = ledger(system, "long")
    assert len(runs) == 1, runs
    assert job["steps"][0]["attempts"] == 1
    reliability.record("step of 7 s with a 3 s visibility timeout (heartbeats renew it)",
                       "never executed twice at once", executions=len(runs))


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
        ray_session: str, reliability: Any) -> None:
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
        reliability.record("overload: 400 requests in 1 s against ~20 steps/s of capacity",
                           "excess gets 503 + Retry-After, admitted jobs finish",
                           admitted=statuses[202], shed_503=statuses[503],
                           other_5xx=0, admitted_finished=len(accepted))
    finally:
        stop_system(system)


def test_tenant_rate_limit_is_429_with_retry_after(ray_session: str, reliability: Any) -> None:
    system = start_system(ray_session, http={"tenant_rate_per_s": 2.0, "tenant_burst": 3})
    try:
        todos = [{"action": "noop"}]
        with system.client() as c:
            codes = [c.post("/schedule", json={"todos": todos}) for _ in range(8)]
        with system.client({"X-API-Key": "globex-dev-key"}) as g:
            other = g.post("/schedule", json={"todos": todos})
        statuses = Counter(r.status_code for r in codes)
        assert statuses[202] >= 3 and statuses[429] >= 1, statuses
        limited = next(r for r in codes if r.status_code == 429)
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"] == "rate_limited"
        assert other.status_code == 202  # another tenant is not affected
        reliability.record("one tenant over its rate (2/s, burst 3)", "429 + Retry-After for "
                           "that tenant only", admitted=statuses[202], limited=statuses[429])
    finally:
        stop_system(system)
