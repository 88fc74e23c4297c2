"""Throughput of the task queue on a real Redis: enqueue_many, read, complete.

    .venv/bin/python loadtests/bench_queue.py --entries 20000 --batch 100 --workers 8

Writes under a unique key prefix and deletes its keys afterwards (never FLUSHDB), so it can
run against a shared Redis. Figures are entries per second, wall clock, one process.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from uuid import uuid4

from actors.keys import Keys
from actors.queue import TaskQueue, task_fields
from actors.redisconn import connect
from actors.settings import QueueSettings, RedisSettings

CAPABILITY = "bench"


async def _cleanup(queue: TaskQueue, prefix: str) -> None:
    redis = queue.redis
    batch: list[str] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
    if batch:
        await redis.unlink(*batch)


async def _drain(
    queue: TaskQueue, inbox: str, entries: int, batch: int, workers: int, mode: str
) -> dict[str, float]:
    read_s = complete_s = 0.0
    done = 0

    async def worker(name: str) -> None:
        nonlocal read_s, complete_s, done
        while done < entries:
            t0 = time.perf_counter()
            leases = await queue.read(CAPABILITY, name, count=batch, block_ms=50)
            t1 = time.perf_counter()
            if not leases:
                continue
            if mode == "complete_many":
                results = await queue.complete_many(
                    [(le, inbox, {"d": "{}", "step": le.fields["step"]}) for le in leases])
            else:
                results = await asyncio.gather(*(
                    queue.complete(le, inbox, {"d": "{}", "step": le.fields["step"]})
                    for le in leases))
            read_s += t1 - t0
            complete_s += time.perf_counter() - t1
            done += sum(results)

    started = time.perf_counter()
    await asyncio.gather(*(worker(f"w{n}") for n in range(workers)))
    elapsed = time.perf_counter() - started
    # Per phase: entries over the seconds the workers spent in it, summed over workers.
    return {
        "read+complete (wall)": entries / elapsed,
        "read (per worker-second)": entries / read_s if read_s else 0.0,
        "complete (per worker-second)": entries / complete_s if complete_s else 0.0,
    }


async def run(url: str, entries: int, batch: int, workers: int) -> dict[str, float]:
    """Enqueue, then drain twice (complete, complete_many); returns entries/s per phase."""
    prefix = f"b{uuid4().hex[:8]}"
    keys = Keys(prefix)
    redis = connect(RedisSettings(url=url, key_prefix=prefix, max_connections=workers * 4 + 8))
    queue = TaskQueue(redis, keys, QueueSettings())
    streams = keys.task_streams(CAPABILITY)
    inbox = keys.shard_inbox(0)
    figures: dict[str, float] = {}
    try:
        # 1. enqueue_many: one MULTI/EXEC round trip per batch, spread over the priorities.
        items = [(streams[i % 3], task_fields({"i": i}, job="j", step=str(i), tenant="acme"))
                 for i in range(entries)]
        started = time.perf_counter()
        for start in range(0, entries, batch):
            await queue.enqueue_many(items[start:start + batch])
        figures["enqueue_many"] = entries / (time.perf_counter() - started)

        # 2 + 3. workers read `batch` leases at a time and complete them, until every
        # entry is done: either one fenced script per lease (concurrently) or all of a
        # read's leases in one pipelined round trip (complete_many).
        for mode in ("complete", "complete_many"):
            if mode == "complete_many":
                for start in range(0, entries, batch):
                    await queue.enqueue_many(items[start:start + batch])
            rates = await _drain(queue, inbox, entries, batch, workers, mode)
            for name, rate in rates.items():
                figures[f"{name} [{mode}]"] = rate
            assert await queue.depth(inbox) == entries, "every entry completed exactly once"
            await queue.redis.delete(inbox)
    finally:
        await _cleanup(queue, prefix)
        await redis.aclose()
    return figures


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run, print entries/s."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100, help="entries per enqueue/read")
    parser.add_argument("--workers", type=int, default=4, help="concurrent readers")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args.url, args.entries, args.batch, args.workers))
    print(f"entries={args.entries} batch={args.batch} workers={args.workers}")
    for name, rate in figures.items():
        print(f"  {name:<46} {rate:>10,.0f} entries/s")


if __name__ == "__main__":
    main()
