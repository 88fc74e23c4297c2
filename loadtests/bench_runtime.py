"""In-process runtime benchmark: the durable core without Ray or HTTP.

N diamond jobs (A → (B, C) → D, noop steps) are accepted through JobStore (as the ingress
does, with the LAM request replies thread on), then ONE ConversationShard runtime and ONE
pool worker, in this process, run them against the real Redis. Prints CPU ms per task
(process time: shard + worker + client), wall time, and what the garbage collector cost.

    .venv/bin/python loadtests/bench_runtime.py --jobs 10000            # tuned GC
    .venv/bin/python loadtests/bench_runtime.py --jobs 10000 --gc default
    .venv/bin/python loadtests/bench_runtime.py --jobs 2000 --profile   # cProfile top 30
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import pstats
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import lam
from actors.executors.noop import NoopExecutor
from actors.gctune import tune_gc
from actors.jobs import JobMeta
from actors.jobstore import JobStore, new_job_id
from actors.keys import Keys
from actors.orchestrator import SCHEDULER_AGENT
from actors.redisconn import connect
from actors.settings import Settings
from actors.shard import ShardRuntime
from actors.worker import PoolWorker

DIAMOND = [{"action": "noop"}, {"action": "noop", "depends_on": [0]},
           {"action": "noop", "depends_on": [0]}, {"action": "noop", "depends_on": [1, 2]}]


class GcMeter:
    """Time spent in the cyclic garbage collector, per generation."""

    def __init__(self) -> None:
        self.by_gen: dict[int, list[float]] = {}
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        entry = self.by_gen.setdefault(int(info["generation"]), [0, 0.0])
        entry[0] += 1
        entry[1] += time.perf_counter() - self._start

    def reset(self) -> None:
        self.by_gen = {}

    def summary(self) -> dict[str, Any]:
        return {f"gen{g}": {"collections": int(n), "seconds": round(t, 3)}
                for g, (n, t) in sorted(self.by_gen.items())}


def request(conv: str) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": lam.PROTOCOL_VERSION, "type": "request",
            "sender": "agent://channel/bench", "to": [SCHEDULER_AGENT],
            "task": "explicit plan of 4 steps", "payload": {}, "context": {"tenant": "acme"},
            "correlation": {"conversationId": conv}}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"rt{uuid.uuid4().hex[:8]}"
    settings = Settings(redis={"url": args.redis_url, "key_prefix": prefix},
                        runtime={"shards": 1})
    redis = connect(settings.redis)
    keys = Keys(prefix)
    store = JobStore(redis, keys, shards=1)
    for start in range(0, args.jobs, 200):
        metas = [JobMeta(job_id=new_job_id(), tenant="acme", conversation_id=f"c{i}", shard=0,
                         todos=DIAMOND, new_conversation=True, request=request(f"c{i}"),
                         created_at=time.time())
                 for i in range(start, min(start + 200, args.jobs))]
        await store.submit_many(metas)
    meter = GcMeter()
    if args.gc == "tuned":
        tune_gc()
    shard = ShardRuntime(0, settings, redis=connect(settings.redis))
    worker = PoolWorker("noop", NoopExecutor(), settings, replica_id="bench-1", workers=64,
                        redis=connect(settings.redis))
    profile = cProfile.Profile() if args.profile else None
    meter.reset()
    cpu0, wall0 = time.process_time(), time.time()
    if profile:
        profile.enable()
    tasks = [asyncio.create_task(shard.run()), asyncio.create_task(worker.run())]
    done_key = keys.jobs_by_status("acme", "succeeded")
    try:
        while await redis.zcard(done_key) < args.jobs:  # noqa: ASYNC110 (polls Redis)
            await asyncio.sleep(0.05)
    finally:
        if profile:
            profile.disable()
        cpu, wall = time.process_time() - cpu0, time.time() - wall0
        shard.stop()
        await worker.shutdown(1.0)
        for task in tasks:
            task.cancel()
        batch: list[str] = []
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
        for i in range(0, len(batch), 1000):
            await redis.unlink(*batch[i:i + 1000])
        await redis.aclose()
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    tasks_done = 4 * args.jobs
    return {"jobs": args.jobs, "gc": args.gc, "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "cpu_ms_per_task": round(cpu / tasks_done * 1000, 3),
            "tasks_per_min_per_core": round(tasks_done / cpu * 60),
            "gc_time": meter.summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--gc", choices=("tuned", "default"), default="tuned")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
