"""Opening the Redis client, and turning "Redis is down" into one operator error.

The client retries a command that failed on a connection error or a timeout, with
exponential backoff, on a fresh connection: a Redis restarted (or failed over) within the
retry window is reconnected by itself and the caller never notices. When the window is
exhausted the error reaches :func:`redis_errors`, which turns it into
:class:`~actors.errors.DependencyUnavailable` (HTTP 503 with ``retry_after_s``).

A retried write may have run once already (the connection broke after the server executed
it but before the reply arrived). Everything built on this client is therefore
at-least-once and deduplicates by id (D2); the queue's fenced scripts report such a second
run as "lease lost", which callers treat as "nothing more to do".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from actors.errors import DependencyUnavailable
from actors.settings import RedisSettings

DEFAULT_RETRIES: Final = 6
"""Retries of one command on connection errors; with the backoff below ≈ 3.5 s in all."""

BACKOFF_BASE_S: Final = 0.05
"""First reconnect delay, doubled per failure (0.1, 0.2, 0.4, 0.8, 1, 1 s)."""

BACKOFF_CAP_S: Final = 1.0
"""Largest reconnect delay, seconds."""

HEALTH_CHECK_INTERVAL_S: Final = 10
"""A pooled connection idle this long is PINGed before use, so a connection to a Redis that
restarted meanwhile is replaced before a command is sent on it, seconds."""

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def connect(
    settings: RedisSettings,
    *,
    retries: int = DEFAULT_RETRIES,
    backoff_cap_s: float = BACKOFF_CAP_S,
    decode_responses: bool = True,
) -> aioredis.Redis:
    """A pooled asyncio client for ``settings.url``; no I/O happens until the first command.

    Replies are decoded to ``str`` (every queue field, key and JSON payload is text).
    ``retries=0`` makes every connection error surface at once (tests, health probes).
    The caller owns the client and closes it with ``await client.aclose()``.
    """
    retry = Retry(ExponentialBackoff(cap=backoff_cap_s, base=BACKOFF_BASE_S), retries)
    # A blocking pool: when all connections are busy, a coroutine waits (up to the socket
    # timeout) for one to come back. The default pool raises MaxConnectionsError at once,
    # which under a burst of concurrent commands would read as "Redis is down".
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        decode_responses=decode_responses,
    )
    return aioredis.Redis.from_pool(pool)


async def ping(client: aioredis.Redis) -> bool:
    """True when Redis answers PING; False on any Redis or network error (never raises)."""
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False


def socket_timeout_s(client: aioredis.Redis) -> float | None:
    """The client's per-command socket timeout (a blocking read must end before it)."""
    value = client.connection_pool.connection_kwargs.get("socket_timeout")
    return float(value) if value is not None else None


@contextlib.contextmanager
def redis_errors(operation: str) -> Iterator[None]:
    """Turn connection failures inside the block into ``DependencyUnavailable("redis", …)``.

    Only "cannot reach Redis" is translated; a ``ResponseError`` (a wrong command, a script
    error) is a bug and propagates unchanged.
    """
    try:
        yield
    except _UNAVAILABLE as exc:
        raise DependencyUnavailable(
            "redis", f"{operation} failed: {type(exc).__name__}: {exc}", retry_after_s=1.0
        ) from exc
