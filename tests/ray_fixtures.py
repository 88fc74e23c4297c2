"""PYTEST_DONT_REWRITE

One local Ray instance per test session, and a running CPA system on it (Serve ingress,
noop pool, ConversationShards) under a unique Redis key prefix per test module.

Use with ``pytest_plugins = ("tests.redis_fixtures", "tests.ray_fixtures")``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from actors.launcher import free_port
from tests.redis_fixtures import REDIS_URL, unique_prefix

__all__ = ["ACME", "GLOBEX", "System", "free_port", "start_system", "stop_system"]

ACME = {"X-API-Key": "acme-dev-key"}
GLOBEX = {"X-API-Key": "globex-dev-key"}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """A private local Ray (never someone else's cluster; GCS never on 6379)."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # As `cpa up` runs it: each ingress replica also answers on its own port (tests use the
    # proxy URL unless they ask for the direct one).
    os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    # No load balancer to deregister from: don't hold deleted replicas open for 30 s.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    import ray

    namespace = f"cpa-test-{uuid.uuid4().hex[:6]}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=namespace,
             log_to_driver=False, configure_logging=False)
    try:
        yield namespace
    finally:
        from ray import serve as ray_serve

        try:
            ray_serve.shutdown()
        finally:
            ray.shutdown()


@dataclass
class System:
    url: str
    prefix: str
    namespace: str
    overrides: dict[str, Any]
    http_port: int

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=headers or ACME, timeout=30)

    def wait_job(self, job_id: str, statuses: tuple[str, ...] = ("succeeded",),
                 headers: dict[str, str] | None = None, within_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        last: dict[str, Any] = {}
        with self.client(headers) as c:
            while time.monotonic() < deadline:
                r = c.get(f"/jobs/{job_id}")
                if r.status_code == 200:
                    last = r.json()
                    if last["status"] in statuses:
                        return last
                time.sleep(0.05)
        raise AssertionError(f"job {job_id} not in {statuses} after {within_s}s: {last}")


_SERVE_PORT: dict[str, int] = {}


def start_system(namespace: str, *, queue: dict[str, Any] | None = None,
                 pools: tuple[dict[str, Any], ...] = ({"capability": "noop", "workers": 8},),
                 redis_url: str = REDIS_URL, http: dict[str, Any] | None = None) -> System:
    """Deploy ingress + pools + shards under a fresh key prefix on the session's Ray."""
    from actors.launcher import deploy_system

    prefix = unique_prefix()
    overrides: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": prefix},
        "runtime": {"shards": 2, "ray_namespace": namespace},
        "queue": {"visibility_timeout_s": 3.0, "heartbeat_interval_s": 0.5,
                  "reclaim_interval_s": 0.5, "backoff_base_s": 0.05, "backoff_max_s": 0.5,
                  **(queue or {})},
    }
    if http:
        overrides["http"] = http
    port = _SERVE_PORT.setdefault("port", free_port())
    url = deploy_system(overrides, http_port=port, route_prefix=f"/{prefix}",
                        pools=[{"grace_s": 2.0, **pool} for pool in pools],
                        app_suffix=f"-{prefix}")
    return System(url=url, prefix=prefix, namespace=namespace, overrides=overrides,
                  http_port=port)


def stop_system(system: System) -> None:
    from ray import serve as ray_serve

    from actors.cluster import stop_shards
    from actors.settings import load_settings
    from tests.redis_fixtures import delete_prefixed

    for name in list(ray_serve.status().applications):
        if name.endswith(system.prefix):
            ray_serve.delete(name)
    stop_shards(load_settings(**system.overrides))

    async def _clean() -> None:
        import redis.asyncio as aioredis

        client = aioredis.from_url(system.overrides["redis"]["url"], decode_responses=True)
        await delete_prefixed(client, system.prefix)
        await client.aclose()

    asyncio.run(_clean())


@pytest.fixture(scope="module")
def system(ray_session: str) -> Iterator[System]:
    sys_ = start_system(ray_session, pools=(
        {"capability": "noop", "workers": 8},
        {"capability": "browser", "workers": 2,
         "executor": "actors.executors.unavailable:Unavailable",
         "executor_args": {"capability": "browser"}},
    ))
    try:
        yield sys_
    finally:
        stop_system(sys_)
