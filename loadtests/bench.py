"""End-to-end benchmark of the CPA Scheduler: N diamond jobs (A → (B, C) → D) over HTTP.

Starts its own system on a private local Ray (Serve ingress, noop pool, shards; real Redis,
everything durable) unless ``--url`` targets a running one (e.g. ``make run``), submits the
jobs with C concurrent clients, waits for all of them and prints one summary:
tasks/min, jobs/s, job latency p50/p95/p99, HTTP accept latency p50/p99, peak RSS of the Ray
processes and CPU seconds per 1,000 tasks (Ray processes + redis-server).

    .venv/bin/python loadtests/bench.py --jobs 2000 --clients 32
    .venv/bin/python loadtests/bench.py --latency --jobs 200          # 1 job in flight
    .venv/bin/python loadtests/bench.py --jobs 5000 --batch 50         # POST /schedule/batch
    .venv/bin/python loadtests/bench.py --ws --jobs 5000 --clients 4   # WS /lam/stream frames
    .venv/bin/python loadtests/bench.py --url http://127.0.0.1:8000 --prefix cpa --jobs 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

API_KEY = "acme-dev-key"
TENANT = "acme"


def diamond(step: str) -> list[dict[str, Any]]:
    """The benchmark job: A → (B, C) → D of ``noop`` or ``sleep:<ms>`` steps."""
    if step == "noop":
        base: dict[str, Any] = {"action": "noop"}
    elif step.startswith("sleep:"):
        base = {"action": "sleep", "params": {"ms": float(step.split(":", 1)[1])}}
    else:
        raise SystemExit(f"--step: got {step!r}; use noop or sleep:<ms>")
    return [dict(base), {**base, "depends_on": [0]}, {**base, "depends_on": [0]},
            {**base, "depends_on": [1, 2]}]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# ------------------------------------------------------------------ process metrics


def system_processes(redis_port: int = 6379) -> list[psutil.Process]:
    """The system's processes and redis-server. With an own system (started by this script)
    that is everything this process started — its Ray head, raylet, workers, Serve actors —
    so other Ray instances on the machine are not counted; with --url, every Ray process."""
    found = [p for p in psutil.process_iter(["name", "cmdline"])
             if p.info["name"] == "redis-server"
             and f":{redis_port}" in " ".join(p.info["cmdline"] or [])]
    own = psutil.Process().children(recursive=True)
    if own:
        return found + own
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if proc.info["pid"] == me:
                continue
            name = proc.info["name"] or ""
            cmd = " ".join(proc.info["cmdline"] or [])
            if (name in ("raylet", "gcs_server") or name.startswith("ray::")
                    or "ray/_private" in cmd or "ray::" in cmd or "default_worker.py" in cmd
                    or ("dashboard" in cmd and "ray" in cmd)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


ROLES = (("ray::ProxyActor", "proxy"), ("ray::ServeReplica:pool-", "pools"),
         ("ray::ServeReplica:", "ingress"), ("ray::ConversationShard", "shards"),
         ("redis-server", "redis"))


def cpu_by_role(procs: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds so far of the system's processes, summed per role (proxy, ingress,
    shards, pools, redis, ray = Ray's own daemons and idle workers)."""
    out: dict[str, float] = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
            cmd = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        role = next((r for prefix, r in ROLES if cmd.startswith(prefix)), "ray")
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def total_rss() -> int:
    """Summed RSS of the system's processes, bytes."""
    total = 0
    for proc in system_processes():
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class RssSampler(threading.Thread):
    """Samples the summed RSS of the system's processes; keeps the peak."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, total_rss())
            self.stop_event.wait(self.interval_s)


# ------------------------------------------------------------------------- system


@dataclass
class Target:
    url: str
    redis_url: str
    prefix: str
    cleanup: Any = None
    urls: list[str] = field(default_factory=list)  # client i uses urls[i % len(urls)]


def start_own_system(args: argparse.Namespace) -> Target:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve as ray_serve

    from actors.launcher import deploy_system

    direct = getattr(args, "direct", False)
    if direct:
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=namespace,
             log_to_driver=False, configure_logging=False)
    prefix = f"b{uuid.uuid4().hex[:8]}"
    overrides: dict[str, Any] = {
        "redis": {"url": args.redis_url, "key_prefix": prefix},
        "runtime": {"shards": args.shards, "ray_namespace": namespace},
        "router": {"llm_provider": "none"},
    }
    url = deploy_system(overrides, http_port=args.port, route_prefix="/",
                        pools=[{"capability": "noop", "workers": args.workers,
                                "num_replicas": args.replicas}],
                        ingress_replicas=args.ingress_replicas)
    urls = [url]
    if direct:
        from actors.launcher import direct_ingress_urls

        urls = direct_ingress_urls("cpa") or urls
        print(f"direct ingress: {urls}", file=sys.stderr)

    def cleanup() -> None:
        try:
            ray_serve.shutdown()
        finally:
            ray.shutdown()

            async def drop_keys() -> None:
                client = aioredis.from_url(args.redis_url, decode_responses=True)
                batch: list[str] = []
                async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        await client.unlink(*batch)
                        batch = []
                if batch:
                    await client.unlink(*batch)
                await client.aclose()

            asyncio.run(drop_keys())

    return Target(url=urls[0], redis_url=args.redis_url, prefix=prefix, cleanup=cleanup,
                  urls=urls)


# --------------------------------------------------------------------------- load


@dataclass
class Results:
    submitted: dict[str, float] = field(default_factory=dict)  # job id -> submit start
    accept_ms: list[float] = field(default_factory=list)
    finished: dict[str, tuple[str, float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


async def submit_ws(args: argparse.Namespace, target: Target, res: Results) -> None:
    """--ws: the jobs as LAM requests (payload.todos) over ``--clients`` WebSocket
    connections to /lam/stream, ``--batch`` messages per frame (default 50)."""
    import aiohttp

    todos = diamond(args.step)
    per_frame = args.batch or 50
    pending = [{"id": str(uuid.uuid4()), "ts": "2026-11-30T00:00:00Z", "type": "request",
                "sender": "agent://channel/bench", "to": ["agent://scheduler/cpa"],
                "task": "bench", "payload": {"todos": todos}, "context": {"tenant": TENANT},
                "correlation": {"conversationId": f"bench-{uuid.uuid4().hex}"}}
               for _ in range(args.jobs)]
    bases = target.urls or [target.url]
    timeout = aiohttp.ClientTimeout(total=None)

    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker(base: str) -> None:
            url = base.replace("http", "ws", 1) + "/lam/stream"
            async with session.ws_connect(url, headers={"X-API-Key": API_KEY},
                                          max_msg_size=0) as ws:
                while pending:
                    frame = [pending.pop() for _ in range(min(per_frame, len(pending)))]
                    t0 = time.time()
                    await ws.send_str(json.dumps(frame))
                    results = json.loads((await ws.receive(timeout=60)).data)
                    res.accept_ms.append((time.time() - t0) * 1000)
                    wait_s = 0.0
                    for msg, result in zip(frame, results, strict=True):
                        code = result["code"]
                        if code in (200, 202):
                            res.submitted.setdefault(result["job_id"], t0)
                            continue
                        res.errors[str(code)] = res.errors.get(str(code), 0) + 1
                        if code in (429, 503):  # again later (the same id: no duplicate)
                            pending.append(msg)
                            wait_s = max(wait_s, float(result.get("retry_after_s", 1)))
                    if wait_s:
                        await asyncio.sleep(wait_s)

        await asyncio.gather(*(worker(bases[i % len(bases)]) for i in range(args.clients)))


async def submit_all(args: argparse.Namespace, target: Target, res: Results) -> None:
    import aiohttp  # lighter than httpx: the load generator shares the 2 cores

    if args.ws:
        await submit_ws(args, target, res)
        return

    todos = diamond(args.step)
    remaining = args.jobs
    lock = asyncio.Lock()
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    single = json.dumps({"todos": todos}).encode()
    connector = aiohttp.TCPConnector(limit=args.clients)
    timeout = aiohttp.ClientTimeout(total=60)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers=headers) as session:

        async def worker(base: str) -> None:
            nonlocal remaining
            while True:
                async with lock:
                    if remaining <= 0:
                        return
                    n = min(args.batch, remaining) if args.batch else 1
                    remaining -= n
                t0 = time.time()
                if args.batch:
                    body = json.dumps({"jobs": [{"todos": todos}] * n}).encode()
                    url = f"{base}/schedule/batch"
                else:
                    body, url = single, f"{base}/schedule"
                async with session.post(url, data=body) as r:
                    status = r.status
                    retry_after = float(r.headers.get("Retry-After", "1"))
                    data = await r.json() if status in (200, 202) else None
                dt = (time.time() - t0) * 1000
                if data is None:
                    res.errors[str(status)] = res.errors.get(str(status), 0) + n
                    if status in (429, 503):
                        async with lock:
                            remaining += n
                        await asyncio.sleep(retry_after)
                    continue
                res.accept_ms.append(dt)
                ids = [j["job_id"] for j in data["jobs"]] if args.batch else [data["job_id"]]
                for job_id in ids:
                    res.submitted[job_id] = t0
                if waiter is not None:
                    await waiter.wait(ids[0], res)

        bases = target.urls or [target.url]
        waiter = Waiter(target) if args.latency else None
        try:
            await asyncio.gather(*(worker(bases[i % len(bases)])
                                   for i in range(1 if args.latency else args.clients)))
        finally:
            if waiter is not None:
                await waiter.close()


class Waiter:
    """Waits for one job at a time without polling (polling would steal the CPU being
    measured): subscribe to the job's live-update channel, read its status once (closes the
    race with a job that finished before the subscription), then wait for updates."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.client = aioredis.from_url(target.redis_url, decode_responses=True)
        self.pubsub = self.client.pubsub()

    async def wait(self, job_id: str, res: Results) -> None:
        tag = f"{self.target.prefix}:{{t:{TENANT}}}"
        channel = f"{tag}:events:{job_id}"
        await self.pubsub.subscribe(channel)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status, updated = await self.client.hmget(f"{tag}:job:{job_id}",
                                                          ["status", "updated_at"])
                if status in ("succeeded", "failed", "cancelled"):
                    res.finished[job_id] = (status, float(updated))
                    return
                await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        finally:
            await self.pubsub.unsubscribe(channel)

    async def close(self) -> None:
        await self.pubsub.aclose()
        await self.client.aclose()


async def watch_all(args: argparse.Namespace, target: Target, res: Results,
                    done: asyncio.Event) -> None:
    client = aioredis.from_url(target.redis_url, decode_responses=True)
    try:
        while len(res.finished) < args.jobs:
            pending = [j for j in list(res.submitted) if j not in res.finished]
            if pending:
                pipe = client.pipeline(transaction=False)
                for job_id in pending:
                    pipe.hmget(f"{target.prefix}:{{t:{TENANT}}}:job:{job_id}",
                               ["status", "updated_at"])
                for job_id, (status, updated) in zip(pending, await pipe.execute(),
                                                     strict=True):
                    if status in ("succeeded", "failed", "cancelled"):
                        res.finished[job_id] = (status, float(updated))
            # Finish times come from the server (updated_at), so polling slowly costs no
            # accuracy — and keeps the load generator off the 2 cores it shares.
            await asyncio.sleep(0.25)
    finally:
        await client.aclose()
        done.set()


async def run_load(args: argparse.Namespace, target: Target) -> tuple[Results, float, float]:
    res = Results()
    done = asyncio.Event()
    t0 = time.time()
    if args.latency:
        await submit_all(args, target, res)
        return res, t0, time.time()
    watcher = asyncio.create_task(watch_all(args, target, res, done))
    await submit_all(args, target, res)
    try:
        await asyncio.wait_for(done.wait(), timeout=args.timeout_s)
    except TimeoutError:
        watcher.cancel()
    end = max((t for _, t in res.finished.values()), default=time.time())
    return res, t0, end


def summary(args: argparse.Namespace, res: Results, t0: float, t1: float, cpu_s: float,
            peak_rss: int) -> dict[str, Any]:
    lat = [(res.finished[j][1] - res.submitted[j]) * 1000 for j in res.finished
           if j in res.submitted]
    ok = sum(1 for s, _ in res.finished.values() if s == "succeeded")
    tasks = ok * 4
    wall = max(t1 - t0, 1e-9)
    return {
        "jobs": args.jobs, "clients": 1 if args.latency else args.clients, "step": args.step,
        "batch": args.batch, "succeeded": ok, "not_finished": args.jobs - len(res.finished),
        "http_errors": res.errors, "wall_s": round(wall, 2),
        "tasks_per_min": round(tasks / wall * 60), "jobs_per_s": round(ok / wall, 1),
        "job_latency_ms": {"p50": round(pct(lat, 50), 2), "p95": round(pct(lat, 95), 2),
                           "p99": round(pct(lat, 99), 2)},
        "accept_latency_ms": {"p50": round(pct(res.accept_ms, 50), 2),
                              "p99": round(pct(res.accept_ms, 99), 2)},
        "peak_rss_mb": round(peak_rss / 2**20), "cpu_s_per_1000_tasks":
            round(cpu_s / max(tasks, 1) * 1000, 3),
        "mean_job_latency_ms": round(statistics.fmean(lat), 2) if lat else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="N diamond jobs")
    parser.add_argument("--clients", type=int, default=32, help="C concurrent HTTP clients")
    parser.add_argument("--step", default="noop", help="noop or sleep:<ms>")
    parser.add_argument("--latency", action="store_true", help="1 job in flight at a time")
    parser.add_argument("--batch", type=int, default=0, help="jobs per /schedule/batch call")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1, help="noop executor replicas")
    parser.add_argument("--workers", type=int, default=64, help="concurrent steps per replica")
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--ws", action="store_true",
                        help="submit LAM requests over --clients WebSockets to /lam/stream, "
                             "--batch messages per frame (default 50)")
    parser.add_argument("--direct", action="store_true",
                        help="Serve direct ingress: clients talk to the ingress replica's own "
                             "HTTP port (no proxy hop)")
    parser.add_argument("--url", help="target a running system instead of starting one")
    parser.add_argument("--prefix", default="cpa", help="its Redis key prefix (with --url)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--port", type=int, default=0, help="HTTP port of an own system")
    parser.add_argument("--warmup", type=int, default=50, help="jobs before measuring")
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = parser.parse_args(argv)

    target = (Target(args.url.rstrip("/"), args.redis_url, args.prefix) if args.url
              else start_own_system(args))
    try:
        if args.warmup:
            warm = argparse.Namespace(**{**vars(args), "jobs": args.warmup, "latency": False,
                                         "batch": 0, "clients": min(args.clients, 8)})
            asyncio.run(run_load(warm, target))
        procs = system_processes()
        cpu0 = cpu_by_role(procs)
        sampler = RssSampler()
        sampler.start()
        res, t0, t1 = asyncio.run(run_load(args, target))
        cpu1 = cpu_by_role(procs)
        by_role = {role: cpu1[role] - cpu0.get(role, 0.0) for role in cpu1}
        cpu_s = sum(by_role.values())
        sampler.stop_event.set()
        sampler.join()
        out = summary(args, res, t0, t1, cpu_s, sampler.peak)
        tasks = max(out["succeeded"] * 4, 1)
        out["cpu_s_per_1000_tasks_by_role"] = {
            role: round(v / tasks * 1000, 3) for role, v in sorted(by_role.items())}
    finally:
        if target.cleanup:
            target.cleanup()
    if args.json:
        print(json.dumps(out))
    else:
        print("\n== CPA Scheduler benchmark (diamond jobs, durable) ==")
        for key, value in out.items():
            print(f"  {key:<22} {value}")
    return 0 if out["not_finished"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
