"""Fixtures for tests on the real Redis at ``CPA_TEST_REDIS_URL`` (default 127.0.0.1:6379).

That server is shared with other test runs: nothing here flushes it. Every test gets a
unique key prefix (``t`` + 8 hex digits) and its keys are deleted afterwards by
``SCAN MATCH <prefix>:*``. A test module loads the fixtures with::

    pytest_plugins = ("tests.redis_fixtures",)

and may import helpers from here (``free_port``, ``delete_prefixed``, …) as usual.

PYTEST_DONT_REWRITE — this module asserts nothing, and the marker keeps pytest from
warning (an error under our warning filter) when a test module imported it before
``pytest_plugins`` named it, which depends on collection order.

Also: the ``private_redis`` fixture runs a private ``redis-server`` with AOF on a free port
for fault-injection tests (kill -9, restart); every process it started is stopped by pid.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from uuid import uuid4

import pytest
import redis as syncredis
import redis.asyncio as aioredis

from actors.keys import Keys
from actors.redisconn import connect
from actors.settings import RedisSettings

__all__ = ["key_prefix", "keys", "private_redis", "redis_client", "redis_settings"]

REDIS_URL = os.environ.get("CPA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
"""The shared test Redis."""


def unique_prefix() -> str:
    """A key prefix no other test uses."""
    return f"t{uuid4().hex[:8]}"


async def delete_prefixed(client: aioredis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix:`` (SCAN, never FLUSHDB); returns how many."""
    deleted = 0
    batch: list[str] = []
    async for key in client.scan_iter(match=f"{prefix}:*", count=500):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await client.unlink(*batch)
            batch = []
    if batch:
        deleted += await client.unlink(*batch)
    return deleted


@pytest.fixture
def key_prefix() -> str:
    """A unique key prefix for this test."""
    return unique_prefix()


@pytest.fixture
def redis_settings(key_prefix: str) -> RedisSettings:
    """Settings for the shared test Redis under this test's prefix."""
    return RedisSettings(url=REDIS_URL, key_prefix=key_prefix)


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    """Key names under this test's prefix."""
    return Keys(key_prefix)


@pytest.fixture
async def redis_client(
    redis_settings: RedisSettings, key_prefix: str
) -> AsyncIterator[aioredis.Redis]:
    """A client of the shared test Redis; the test's keys are deleted afterwards."""
    client = connect(redis_settings, retries=1)
    try:
        await client.ping()
    except (syncredis.RedisError, OSError) as exc:
        await client.aclose()
        pytest.fail(
            f"Redis tests need a server at {REDIS_URL} ({exc}); start one with "
            "`redis-server --port 6379 --save ''` or set CPA_TEST_REDIS_URL"
        )
    try:
        yield client
    finally:
        await delete_prefixed(client, key_prefix)
        await client.aclose()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis_server(
    port: int, data_dir: Path, *, timeout_s: float = 10.0
) -> subprocess.Popen[bytes]:
    """Start a private ``redis-server`` with AOF (fsync always) in ``data_dir`` and wait
    until it answers; the caller must stop it (``proc.kill()``/``terminate()``, by pid)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_s
    probe = syncredis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5)
    try:
        while True:
            try:
                if probe.ping():
                    return proc
            except (syncredis.RedisError, OSError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.02)
    finally:
        probe.close()


class PrivateRedis:
    """A ``redis-server`` of our own on one port and data directory, restartable."""

    def __init__(self, port: int, data_dir: Path) -> None:
        self.port = port
        self.data_dir = data_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """Where it listens."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it (again) on the same port and directory; returns once it answers."""
        proc = await asyncio.to_thread(start_redis_server, self.port, self.data_dir)
        self.procs.append(proc)

    def kill9(self) -> None:
        """SIGKILL the running server (no shutdown, no final save) and reap it."""
        proc = self.procs[-1]
        proc.kill()
        proc.wait()

    def stop_all(self) -> None:
        """Stop every server this object started, by pid."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private Redis (not started yet: call ``await private_redis.start()``)."""
    server = PrivateRedis(free_port(), tmp_path)
    try:
        yield server
    finally:
        server.stop_all()
