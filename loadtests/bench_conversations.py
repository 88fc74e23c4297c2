"""Memory of live conversations: submit one job in each of N new conversations (batched),
wait until all are done — the orchestrators stay resident until passivation — and print the
extra RSS of the Ray processes (seed/issue target: 10,000 conversations < 1 GB extra).

    .venv/bin/python loadtests/bench_conversations.py --conversations 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import API_KEY, Results, start_own_system, total_rss, watch_all


def rss_mb() -> float:
    return total_rss() / 2**20


async def submit(url: str, n: int, batch: int, res: Results) -> None:
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for start in range(0, n, batch):
            jobs = [{"todos": [{"action": "noop"}], "conversation_id": f"c-{uuid.uuid4().hex}"}
                    for _ in range(min(batch, n - start))]
            async with session.post(f"{url}/schedule/batch",
                                    data=json.dumps({"jobs": jobs})) as r:
                body = await r.json()
                if r.status != 202:
                    raise SystemExit(f"HTTP {r.status}: {body}")
            now = time.time()
            for job in body["jobs"]:
                res.submitted[job["job_id"]] = now


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    ns = argparse.Namespace(redis_url=args.redis_url, shards=args.shards, port=0,
                            workers=64, replicas=1, ingress_replicas=1)
    target = start_own_system(ns)
    try:
        time.sleep(3)
        before = rss_mb()
        res = Results()
        t0 = time.time()
        asyncio.run(submit(target.url, args.conversations, args.batch, res))

        async def wait() -> None:
            done = asyncio.Event()
            await watch_all(argparse.Namespace(jobs=args.conversations), target, res, done)

        asyncio.run(wait())
        elapsed = time.time() - t0
        time.sleep(2)
        after = rss_mb()
    finally:
        target.cleanup()
    print("\n== live conversations ==")
    print(f"  conversations          {args.conversations} (all jobs finished in "
          f"{elapsed:.1f} s; none passivated yet)")
    print(f"  RSS of Ray processes   before {before:.0f} MB, after {after:.0f} MB, "
          f"extra {after - before:.0f} MB")
    print(f"  per conversation       {(after - before) * 1024 / args.conversations:.1f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
