"""``GET /health`` and the queue part of ``GET /metrics``.

A pool is reported per capability: replicas heartbeating in Redis, steps waiting, and — when
running under Ray Serve — the deployment's replica states, so a pool whose label or resource
matches no node shows up as ``unschedulable`` instead of hanging silently.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from actors.redisconn import ping
from actors.shard import active_key
from serve.services import Services

PENDING_STATES = ("PENDING_ALLOCATION", "STARTING", "PENDING_MIGRATION")


async def _alive_replicas(svc: Services, capability: str) -> list[str]:
    pattern = svc.keys.replica_alive(capability, "x")[:-1] + "*"
    found = []
    async for key in svc.redis.scan_iter(match=pattern, count=200):
        found.append(str(key).rsplit(":", 1)[-1])
    return found


async def _depth(svc: Services, capability: str) -> int:
    pipe = svc.redis.pipeline(transaction=False)
    for stream in svc.keys.task_streams(capability):
        pipe.xlen(stream)
    return int(sum(await pipe.execute()))


def _serve_pools() -> dict[str, dict[str, Any]]:
    """Serve's view of the pool applications (empty when not running under Serve)."""
    try:
        import ray
        from ray import serve as ray_serve

        if not ray.is_initialized():
            return {}
        status = ray_serve.status()
    except Exception:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for app_name, app in status.applications.items():
        for dep_name, dep in app.deployments.items():
            out[app_name] = {"deployment": dep_name, "status": str(dep.status.value),
                             "replica_states": dict(dep.replica_states),
                             "message": dep.message}
    return out


def _shards_alive(namespace: str, prefix: str, count: int) -> dict[str, Any] | None:
    try:
        import ray

        if not ray.is_initialized():
            return None
        alive = 0
        for i in range(count):
            try:
                ray.get_actor(f"{prefix}-shard-{i}", namespace=namespace)
                alive += 1
            except ValueError:
                pass
        return {"expected": count, "alive": alive}
    except Exception as exc:
        return {"error": str(exc)}


async def health_report(svc: Services) -> dict[str, Any]:
    """Ray, Redis and each pool. ``status``: ok | degraded | down."""
    t0 = time.perf_counter()
    redis_ok = await ping(svc.redis)
    report: dict[str, Any] = {
        "redis": {"ok": redis_ok, "latency_ms": round((time.perf_counter() - t0) * 1000, 2)},
    }
    problems: list[str] = []
    if not redis_ok:
        report["status"] = "down"
        report["problems"] = ["redis is unreachable"]
        return report
    shards = await asyncio.to_thread(_shards_alive, svc.settings.runtime.ray_namespace,
                                     svc.settings.redis.key_prefix,
                                     svc.settings.runtime.shard_count())
    report["ray"] = {"connected": shards is not None, "shards": shards}
    if shards is not None and shards.get("alive") != shards.get("expected"):
        problems.append(f"conversation shards alive {shards.get('alive')}/"
                        f"{shards.get('expected')}")
    serve_pools = await asyncio.to_thread(_serve_pools)
    pools: dict[str, Any] = {}
    for cap in svc.capabilities:
        replicas = await _alive_replicas(svc, cap)
        depth = await _depth(svc, cap)
        pool: dict[str, Any] = {"replicas": len(replicas), "queued": depth}
        serve_view = serve_pools.get(f"pool-{cap}")
        if serve_view is not None:
            pool["serve"] = serve_view
            pending = sum(n for state, n in serve_view["replica_states"].items()
                          if state in PENDING_STATES)
            if pending and not replicas:
                pool["state"] = "pending"
                problems.append(
                    f"pool {cap}: {pending} replica(s) not placed and none running; if this "
                    "persists, no node matches its label_selector/resources (configs/serve.yaml)")
        if "state" not in pool:
            if replicas:
                pool["state"] = "ok"
            elif depth:
                pool["state"] = "stalled"
                problems.append(f"pool {cap}: {depth} step(s) waiting and no replica consuming")
            else:
                pool["state"] = "absent"
        pools[cap] = pool
    report["pools"] = pools
    report["status"] = "degraded" if problems else "ok"
    report["problems"] = problems
    return report


async def queue_metrics(svc: Services) -> bytes:
    """Prometheus text for queue depths, DLQ size and active jobs (read live from Redis)."""
    lines = ["# HELP cpa_queue_depth Steps waiting per capability and priority",
             "# TYPE cpa_queue_depth gauge"]
    try:
        pipe = svc.redis.pipeline(transaction=False)
        labels = []
        for cap in svc.capabilities:
            for prio, stream in zip(("high", "normal", "low"), svc.keys.task_streams(cap),
                                    strict=True):
                pipe.xlen(stream)
                labels.append((cap, prio))
        pipe.xlen(svc.keys.dlq())
        for i in range(svc.settings.runtime.shard_count()):
            pipe.scard(active_key(svc.keys, i))
        values = await pipe.execute()
    except Exception:
        return b""
    for (cap, prio), n in zip(labels, values, strict=False):
        lines.append(f'cpa_queue_depth{{capability="{cap}",priority="{prio}"}} {n}')
    lines += ["# HELP cpa_dlq_entries Entries in the dead-letter queue",
              "# TYPE cpa_dlq_entries gauge", f"cpa_dlq_entries {values[len(labels)]}",
              "# HELP cpa_active_jobs Unfinished jobs per shard", "# TYPE cpa_active_jobs gauge"]
    for i, n in enumerate(values[len(labels) + 1:]):
        lines.append(f'cpa_active_jobs{{shard="{i}"}} {n}')
    return ("\n".join(lines) + "\n").encode()
