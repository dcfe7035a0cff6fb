"""A Redis client that fails fast: short connect/read timeouts, no retries, a bounded pool.

Callers catch every exception (:data:`REDIS_ERRORS`) and fall back; Redis trouble must never turn
into a 5xx or a hung request.
"""

from __future__ import annotations

from typing import Any

REDIS_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)


def redis_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    return (*REDIS_ERRORS, redis.exceptions.RedisError)


def make_redis(url: str, *, timeout: float, max_connections: int = 256) -> Any:
    """An asyncio Redis client for ``url`` (raises ImportError without the ``redis`` extra)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=max(timeout * 4, 1.0),
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
