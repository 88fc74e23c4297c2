"""Executor pools as Ray Serve deployments, one application per capability (DESIGN.md D3).

Each replica runs a :class:`~actors.worker.PoolWorker` that pulls steps from Redis; Serve
gives replica counts, placement (``ray_actor_options``: resources, ``label_selector``),
health checks, graceful shutdown and the dashboard's scaling. Configured in
``configs/serve.yaml`` through the application builder :func:`build_pool`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ray import serve as ray_serve

from actors.executors.base import load_executor
from actors.gctune import tune_gc
from actors.settings import load_settings
from actors.worker import PoolWorker

DEFAULT_EXECUTORS = {
    "noop": "actors.executors.noop:NoopExecutor",
}


@ray_serve.deployment(
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=32,
    graceful_shutdown_timeout_s=30,
    graceful_shutdown_wait_loop_s=1,
    health_check_period_s=5,
    logging_config={"enable_access_log": False},
)
class ExecutorPool:
    """One replica of a capability's pool: a pull loop with ``workers`` concurrent steps."""

    def __init__(self, capability: str, executor: str | None = None, workers: int = 8,
                 settings: dict[str, Any] | None = None, grace_s: float = 20.0,
                 executor_args: dict[str, Any] | None = None) -> None:
        ctx = ray_serve.get_replica_context()
        self.replica_id = f"{capability}-{ctx.replica_id.unique_id}"
        path = executor or DEFAULT_EXECUTORS.get(capability)
        if path is None:
            raise ValueError(f"pool {capability!r}: no executor configured")
        self.grace_s = grace_s
        tune_gc()
        self.worker = PoolWorker(capability, load_executor(path, **(executor_args or {})),
                                 load_settings(**(settings or {})),
                                 replica_id=self.replica_id, workers=workers)
        self.task = asyncio.get_running_loop().create_task(self.worker.run())

    async def __call__(self, *_: Any) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        import os

        import ray

        return {**self.worker.status(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    async def check_health(self) -> None:
        if self.task.done():
            exc = None if self.task.cancelled() else self.task.exception()
            raise RuntimeError(f"pull loop of {self.replica_id} stopped: {exc!r}")

    async def __del__(self) -> None:
        # Graceful shutdown: finish in-flight steps (bounded), hand the rest back.
        with contextlib.suppress(Exception):
            await self.worker.shutdown(grace_s=self.grace_s)
        self.task.cancel()


def build_pool(args: dict[str, Any]) -> Any:
    """Application builder for serve.yaml: ``args`` = capability, executor, workers, settings."""
    allowed = {"capability", "executor", "workers", "settings", "grace_s", "executor_args"}
    unknown = set(args) - allowed
    if unknown:
        raise ValueError(f"pool args: unknown {sorted(unknown)}; allowed: {sorted(allowed)}")
    if "capability" not in args:
        raise ValueError("pool args: `capability` is required")
    return ExecutorPool.bind(**args)  # type: ignore[attr-defined]
