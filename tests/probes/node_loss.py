"""A browser-labelled node lost mid-run (own three-node Ray cluster on one machine, run as a
separate process by ``tests/test_node_loss.py``).

Head (shards, Serve controller) + two worker nodes labelled ``cpa-browser=true`` with one
``browser`` resource each, so the browser pool's two replicas land one per labelled node and
a lost replica cannot be re-placed on the survivor. Steps run ``LedgerExecutor`` (sleeps,
then records its effect in a Redis list), so the probe sees which replica ran what.

Phase 1: 30 jobs of three browser steps (half chained: one session, so steps after the first
come from the replica's own stream; half independent: every step from the shared stream) run
on both replicas; one labelled node is lost while steps run on it (:func:`lose_machine`:
its replica process SIGKILLed and ``cluster.remove_node(allow_graceful=False)``). Measures:
do all jobs end, are the steps lost with the node re-run on the surviving replica, does any
step take effect twice, how long recovery takes.

Phase 2: the last labelled node is removed too while steps run and wait. Measures, for a
bound, what happens to those jobs (do they end: failed/dead-lettered; or wait for ever) and
what ``/health`` (``serve.health.health_report``) says about the pool. With no consumer
left, each attempt is given up as lost after ``queue.dispatch_deadline_s`` (DEADLINE_S, long
enough for phase 1's backlog) + the step's timeout + the lease; phase 2's steps have two
attempts, so their jobs fail (and the steps are dead-lettered) after about twice that.

Prints one ``RESULT {json}`` line; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from typing import Any

TENANT = "acme"
PHASE1_JOBS = 30
PHASE1_STEP_MS = 1000
PHASE1_BOUND_S = 60.0
PHASE2_JOBS = 8
PHASE2_STEP_MS = 1500
PHASE2_STEP_TIMEOUT_S = 3
PHASE2_MAX_ATTEMPTS = 2
PHASE2_BOUND_S = 90.0
PHASE2_HEALTH_S = 20.0
VISIBILITY_S = 2.5
DEADLINE_S = 30.0


def plan(ledger: str, ms: int, steps: int, *, chained: bool, timeout_s: float = 15,
         max_attempts: int | None = None) -> list[dict[str, Any]]:
    """``steps`` browser steps. Chained: one session (D8), so the steps after the first go to
    the replica that ran the first one (its own stream). Not chained: independent steps, each
    its own session, all taken from the shared stream."""
    actions = ("click", "type", "wait_for")
    return [{"action": actions[i % 3], "selector": f"#s{i}", "timeout": timeout_s,
             "params": {"ms": ms, "ledger": ledger},
             **({"max_attempts": max_attempts} if max_attempts else {}),
             **({"depends_on": [i - 1]} if i and chained else {})} for i in range(steps)]


def lose_machine(cluster: Any, replica: dict[str, Any]) -> None:
    """Everything on the node dies at once, like a machine that is switched off: the replica's
    worker process (SIGKILL by its pid: a worker left alone notices its raylet's death only
    about a second later and meanwhile finishes steps) and the node's raylet and the rest
    (``remove_node``, no graceful shutdown)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(replica["pid"]), signal.SIGKILL)
    cluster.remove_node(replica["node"], allow_graceful=False)


class Probe:
    def __init__(self, prefix: str, redis_url: str, namespace: str) -> None:
        import redis.asyncio as aioredis

        from actors.jobstore import JobStore
        from actors.keys import Keys

        self.prefix = prefix
        self.redis_url = redis_url
        self.keys = Keys(prefix)
        self.redis = aioredis.from_url(redis_url, decode_responses=True)
        self.store = JobStore(self.redis, self.keys, shards=2)
        self.ledger = f"{prefix}:ledger"
        self.namespace = namespace

    async def submit(self, n: int, ms: int, steps: int, tag: str, **kw: Any) -> list[str]:
        from actors.jobs import JobMeta
        from actors.jobstore import body_hash, new_job_id

        ids = []
        for i in range(n):
            todos = plan(self.ledger, ms, steps, chained=i % 2 == 1, **kw)
            meta = JobMeta(job_id=new_job_id(), tenant=TENANT, conversation_id=f"{tag}-{i}",
                           shard=0, todos=todos)
            await self.store.submit(meta, idempotency_key=None, body_digest=body_hash(todos))
            ids.append(meta.job_id)
        return ids

    def streams(self, replicas: list[str]) -> list[str]:
        return [*self.keys.task_streams("browser"),
                *(self.keys.replica_stream("browser", r) for r in replicas)]

    async def pending_by_consumer(self, replicas: list[str]) -> Counter[str]:
        out: Counter[str] = Counter()
        for stream in self.streams(replicas):
            if not await self.redis.exists(stream):
                continue
            for p in await self.redis.xpending_range(stream, "cpa", "-", "+", 1000):
                out[str(p["consumer"])] += 1
        return out

    async def held_by(self, replica: str, replicas: list[str]
                      ) -> dict[tuple[str, int, int], str]:
        """(job, step, attempt) -> "own"/"shared" of every entry the replica leased and has
        not finished, plus everything waiting in its own (session-affine) stream."""
        found: dict[tuple[str, int, int], str] = {}
        own = self.keys.replica_stream("browser", replica)
        for stream in self.streams(replicas):
            if not await self.redis.exists(stream):
                continue
            if stream == own:
                entries = await self.redis.xrange(stream)
            else:
                ids = [p["message_id"] for p in await self.redis.xpending_range(
                    stream, "cpa", "-", "+", 1000, consumername=replica)]
                entries = [e for i in ids for e in await self.redis.xrange(stream, i, i)]
            for _, fields in entries:
                d = json.loads(fields["d"])
                found[(str(d["job"]), int(d["step"]), int(d["attempt"]))] = (
                    "own" if stream == own else "shared")
        return found

    async def statuses(self, job_ids: list[str]) -> list[str]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(TENANT, job_id), "status")
        return [str(s) for s in await pipe.execute()]

    async def ledger_entries(self) -> list[tuple[str, int, int, str]]:
        out = []
        for raw in await self.redis.lrange(self.ledger, 0, -1):
            job, step, attempt, replica, *_ = str(raw).split(":")
            out.append((job, int(step), int(attempt), replica))
        return out

    async def wait_terminal(self, job_ids: list[str], bound_s: float, since: float
                            ) -> tuple[float | None, list[str]]:
        """Seconds after ``since`` (monotonic) at which every job was terminal, or None."""
        deadline = since + bound_s
        statuses: list[str] = []
        while time.monotonic() < deadline:
            statuses = await self.statuses(job_ids)
            if all(s in ("succeeded", "failed", "cancelled") for s in statuses):
                return time.monotonic() - since, statuses
            await asyncio.sleep(0.2)
        return None, statuses


async def phase1(probe: Probe, cluster: Any, replicas: dict[str, Any], out: dict[str, Any]
                 ) -> str:
    """Returns the surviving replica id."""
    names = sorted(replicas)
    jobs = await probe.submit(PHASE1_JOBS, PHASE1_STEP_MS, 3, "nl1")
    t_submit = time.monotonic()
    # Wait until both replicas are busy and sessions are bound (some steps done); prefer a
    # moment when one replica holds both kinds of work, shared-stream leases (recovered by
    # reclaim) and session-affine ones (recovered by a session restart), and lose that one.
    pending: Counter[str] = Counter()
    held: dict[str, dict[tuple[str, int, int], str]] = {}
    victim = ""
    while time.monotonic() < t_submit + 45:
        pending = await probe.pending_by_consumer(names)
        done = await probe.redis.llen(probe.ledger)
        if all(pending[r] >= 2 for r in names) and done >= 12:
            held = {r: await probe.held_by(r, names) for r in names}
            mixed = [r for r in names if len(held[r]) >= 3
                     and set(held[r].values()) == {"own", "shared"}]
            if mixed or time.monotonic() > t_submit + 10:
                victim = (mixed or [max(names, key=lambda r: len(held[r]))])[0]
                break
        await asyncio.sleep(0.02)
    if not victim:
        raise RuntimeError(f"steps never ran on both replicas: pending {dict(pending)}")
    survivor = next(r for r in names if r != victim)
    held_before = await probe.held_by(victim, names)  # fresh, right before the loss
    t_remove, wall_remove = time.monotonic(), time.time()
    lose_machine(cluster, replicas[victim])
    out["remove_node_s"] = round(time.monotonic() - t_remove, 2)
    out["victim"], out["survivor"] = victim, survivor
    out["removed_after_s"] = round(t_remove - t_submit, 2)
    recovered_s, statuses = await probe.wait_terminal(jobs, PHASE1_BOUND_S, t_remove)
    out["phase1_bound_s"] = PHASE1_BOUND_S
    out["phase1_all_terminal_after_s"] = None if recovered_s is None else round(recovered_s, 2)
    out["phase1_statuses"] = dict(Counter(statuses))

    effects = await probe.ledger_entries()
    by_victim = {(j, s, a) for j, s, a, r in effects if r == victim}
    # Held by the victim and not executed by it: lost with the node.
    lost = [h for h in held_before if h not in by_victim]
    out["held_by_victim"] = len(held_before)
    out["lost_with_node"] = len(lost)
    out["lost_from_shared_stream"] = sum(1 for h in lost if held_before[h] == "shared")
    out["lost_from_own_stream"] = sum(1 for h in lost if held_before[h] == "own")
    final = {j: await probe.store.load(TENANT, j) for j in jobs}
    rerun_ok, rerun_bad = 0, []
    for job_id, step, attempt in lost:
        state = final[job_id].steps[step]
        ran_on_survivor = any(j == job_id and s == step and r == survivor and a >= attempt
                              for j, s, a, r in effects)
        if state.status.value == "succeeded" and state.replica == survivor and ran_on_survivor:
            rerun_ok += 1
        else:
            rerun_bad.append({"job": job_id, "step": step, "attempt": attempt,
                              "status": state.status.value, "replica": state.replica})
    out["rerun_on_survivor"] = rerun_ok
    # Recovery: from the removal until the last lost step had succeeded again.
    finished = [final[j].steps[s].finished_at for j, s, _ in lost]
    out["recovery_s"] = (round(max(f for f in finished if f) - wall_remove, 2)
                         if lost and all(finished) else None)
    started = [final[j].steps[s].started_at for j, s, _ in lost]
    out["first_rerun_started_s"] = (round(min(t for t in started if t) - wall_remove, 2)
                                    if any(started) else None)
    out["rerun_problems"] = rerun_bad[:10]
    # Reclaim latency: a lost shared-stream lease is reclaimable after the visibility timeout;
    # count the steps that started after that moment but before the lost step re-ran
    # (work that overtook the reclaimed step).
    shared_lost = {(j, s) for (j, s, a) in lost if held_before[(j, s, a)] == "shared"}
    rerun_starts = [final[j].steps[s].started_at for j, s in shared_lost]
    if shared_lost and all(rerun_starts):
        first = min(t for t in rerun_starts if t)
        reclaimable = wall_remove + VISIBILITY_S + 0.5
        out["reclaimed_rerun_started_s"] = round(first - wall_remove, 2)
        out["steps_started_ahead_of_reclaimed"] = sum(
            1 for j, job in final.items() for i, st in enumerate(job.steps)
            if (j, i) not in shared_lost and st.started_at is not None
            and reclaimable < st.started_at < first)
    restarts = {j: sum(job.session_restarts.values()) for j, job in final.items()}
    out["session_restarts"] = sum(restarts.values())
    per_attempt = Counter((j, s, a) for j, s, a, _ in effects if j in final)
    per_step = Counter((j, s) for j, s, _, _ in effects if j in final)
    out["effects"] = sum(per_step.values())
    # At least once: a step the victim ran (effect recorded) but had not acknowledged when it
    # died runs again (browser actions have no verify-before-retry). Legitimate, but only for
    # an attempt the victim held at the loss; any other attempt that ran twice is a bug.
    twice = {k for k, n in per_attempt.items() if n > 1}
    before_ack = {k for k in twice if k in held_before and k in by_victim}
    out["rerun_effect_before_ack"] = len(before_ack)
    out["same_attempt_twice"] = sorted(f"{j}:{s}:{a}" for j, s, a in twice - before_ack)
    # A session restart re-runs the session's steps from its first one (D8, by design);
    # anything beyond one run per restart (and per effect-before-ack rerun) is a duplicate.
    allowed = Counter((j, s) for j, s, _ in before_ack)
    out["session_reruns"] = sum(min(n - 1 - allowed[(j, s)], restarts[j])
                                for (j, s), n in per_step.items() if n - 1 > allowed[(j, s)])
    out["duplicates"] = sorted(f"{j}:{s}x{n}" for (j, s), n in per_step.items()
                               if n - 1 > restarts[j] + allowed[(j, s)])
    out["steps_not_run"] = sum(1 for j, job in final.items() for i, st in enumerate(job.steps)
                               if st.status.value == "succeeded" and (j, i) not in per_step)
    # Entries left in the dead replica's own stream: nobody will ever read them.
    out["orphaned_in_dead_replica_stream"] = await probe.redis.xlen(
        probe.keys.replica_stream("browser", victim))
    out["dlq_after_phase1"] = await probe.redis.xlen(probe.keys.dlq())
    return survivor


async def phase2(probe: Probe, cluster: Any, replicas: dict[str, Any], survivor: str,
                 out: dict[str, Any]) -> None:
    from ray import serve as ray_serve

    from actors.settings import load_settings
    from serve.health import health_report
    from serve.services import Services

    names = sorted(replicas)
    st = ray_serve.status().applications["pool-browser"]
    dep = next(iter(st.deployments.values()))
    out["serve_after_phase1"] = {"app": str(st.status.value),
                                 "replica_states": dict(dep.replica_states)}
    jobs = await probe.submit(PHASE2_JOBS, PHASE2_STEP_MS, 2, "nl2",
                              timeout_s=PHASE2_STEP_TIMEOUT_S,
                              max_attempts=PHASE2_MAX_ATTEMPTS)
    t0 = time.monotonic()
    pending: Counter[str] = Counter()
    while time.monotonic() < t0 + 30:
        pending = await probe.pending_by_consumer(names)
        if pending[survivor] >= 2:
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"phase 2 steps never ran: pending {dict(pending)}")
    t_remove = time.monotonic()
    lose_machine(cluster, replicas[survivor])
    out["phase2_running_at_removal"] = pending[survivor]
    svc = Services.create(load_settings(
        redis={"url": probe.redis_url, "key_prefix": probe.prefix},
        runtime={"shards": 2, "ray_namespace": probe.namespace}))
    try:
        health: dict[str, Any] = {}
        ended_s, statuses = None, []
        # Watch for the whole bound unless every job ended; a health reading each second
        # during the first PHASE2_HEALTH_S (what an operator sees right after the loss).
        while time.monotonic() < t_remove + PHASE2_BOUND_S:
            if not health or time.monotonic() < t_remove + PHASE2_HEALTH_S:
                health = await health_report(svc)
            statuses = await probe.statuses(jobs)
            if all(s in ("succeeded", "failed", "cancelled") for s in statuses):
                ended_s = time.monotonic() - t_remove
                break
            await asyncio.sleep(1.0)
    finally:
        await svc.close()
    out["phase2_bound_s"] = PHASE2_BOUND_S
    out["phase2_all_terminal_after_s"] = None if ended_s is None else round(ended_s, 2)
    out["phase2_statuses"] = dict(Counter(statuses))
    waiting = 0
    for stream in probe.keys.task_streams("browser"):
        waiting += await probe.redis.xlen(stream)
    out["phase2_entries_in_shared_streams"] = waiting
    out["phase2_dlq"] = await probe.redis.xlen(probe.keys.dlq())
    loaded = [await probe.store.load(TENANT, j) for j in jobs]
    out["phase2_step_statuses"] = dict(Counter(st.status.value for job in loaded
                                               for st in job.steps))
    out["phase2_step_errors"] = dict(Counter(st.error_kind for job in loaded
                                             for st in job.steps if st.error_kind))
    out["phase2_dispatch_deadline_s"] = DEADLINE_S
    pool = health.get("pools", {}).get("browser", {})
    out["health_status"] = health.get("status")
    out["health_pool"] = {k: pool.get(k) for k in ("state", "replicas", "queued")}
    out["health_pool_serve"] = pool.get("serve")
    out["health_problems"] = [p for p in health.get("problems", []) if "browser" in p]


def main() -> int:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve as ray_serve
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.cluster import SHARD_NAME, ShardActor
    from actors.pools import ExecutorPool
    from tests.redis_fixtures import delete_prefixed

    prefix, redis_url = sys.argv[1], sys.argv[2]
    namespace = f"cpa-nl-{uuid.uuid4().hex[:6]}"
    overrides = {
        "redis": {"url": redis_url, "key_prefix": prefix},
        "runtime": {"shards": 2, "ray_namespace": namespace},
        "queue": {"visibility_timeout_s": VISIBILITY_S, "heartbeat_interval_s": 0.5,
                  "reclaim_interval_s": 0.5, "backoff_base_s": 0.05, "backoff_max_s": 0.5,
                  "dispatch_deadline_s": DEADLINE_S},
    }
    out: dict[str, Any] = {}
    t_start = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources={"browser": 1},
                              labels={"cpa-browser": "true"}) for _ in range(2)]
    try:
        ray.init(address=cluster.address, namespace=namespace, log_to_driver=False)
        head = cluster.head_node.node_id
        # Shards on the head: the node loss must hit executors only, not the orchestrators.
        shards = [ShardActor.options(
            name=SHARD_NAME.format(prefix=prefix, index=i), namespace=namespace,
            lifetime="detached",
            scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
        ).remote(i, overrides) for i in range(2)]
        ray.get([s.ping.remote() for s in shards], timeout=60)
        ray_serve.start(proxy_location="Disabled")
        pool = ExecutorPool.options(  # type: ignore[attr-defined]
            num_replicas=2,
            ray_actor_options={"num_cpus": 0, "resources": {"browser": 1},
                               "label_selector": {"cpa-browser": "true"}},
        ).bind(capability="browser", executor="actors.executors.testing:LedgerExecutor",
               executor_args={"redis_url": redis_url}, workers=4, settings=overrides,
               grace_s=1.0)
        handle = ray_serve.run(pool, name="pool-browser", route_prefix=None)
        by_node = {n.node_id: n for n in nodes}
        replicas: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while len(replicas) < 2 and time.monotonic() < deadline:
            status = handle.status.remote().result(timeout_s=30)
            replicas[status["replica"]] = {"node": by_node[status["node_id"]],
                                           "node_id": status["node_id"], "pid": status["pid"]}
        if {r["node_id"] for r in replicas.values()} != set(by_node):
            raise RuntimeError(f"replicas not one per labelled node: {replicas}")
        out["setup_s"] = round(time.monotonic() - t_start, 1)
        probe = Probe(prefix, redis_url, namespace)

        async def run() -> None:
            try:
                survivor = await phase1(probe, cluster, replicas, out)
                if "--phase1-only" not in sys.argv:
                    await phase2(probe, cluster, replicas, survivor, out)
            except Exception as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                await delete_prefixed(probe.redis, prefix)
                await probe.redis.aclose()

        asyncio.run(run())
    finally:
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()
            out["total_s"] = round(time.monotonic() - t_start, 1)
            print("RESULT " + json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
