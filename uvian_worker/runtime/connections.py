"""Redis clients for the queues and the events, and the start-up checks of every connection.

The `bullmq` package builds its clients with redis-py's defaults unless it is
handed one. Those defaults do not suit a worker: redis-py 8's 5 s socket
timeout cuts the 10 s blocking waits short (jobs then wait ~20 s to be picked
up on an idle worker, far-off delayed jobs never run), and its retry policy
backs off to 20 s, so a worker would resume long after Redis is back. So the
runtime builds the clients itself: no socket timeout, a bounded connect
timeout, keep-alive, and retries capped at half a second.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, BusyLoadingError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from uvian_worker.errors import ConfigError

logger = logging.getLogger(__name__)

_RETRY_CAP_S = 0.5
_RETRY_BASE_S = 0.05
_RETRIES = 4


def make_redis(url: str, *, connect_timeout_s: float, max_connections: int = 64) -> redis.Redis:
    """A client for queue or event traffic; `decode_responses` as `bullmq` requires."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=None,
        decode_responses=True,
        # Bytes that are not UTF-8 (a producer writing the job hash by hand, a
        # stray publish) must not break a connection's reader: they decode as U+FFFD.
        encoding_errors="replace",
        socket_timeout=None,
        socket_connect_timeout=connect_timeout_s,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=_RETRY_CAP_S, base=_RETRY_BASE_S), _RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, BusyLoadingError],
    )
    return redis.Redis(connection_pool=pool)


async def check_redis(url: str, *, timeout_s: float) -> str:
    """PING once, without retries, within `timeout_s`; returns the server version.

    A wrong password or TLS against a plain port would otherwise look like a
    connection that keeps retrying; here each becomes one clear `ConfigError`.
    """
    client = redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(), 0),
        decode_responses=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
            info = await client.info("server")
    except AuthenticationError:
        raise ConfigError("REDIS_URL: Redis refused the credentials") from None
    except ResponseError as exc:
        raise ConfigError(f"REDIS_URL: Redis answered with an error: {_first_line(exc)}") from None
    except (TimeoutError, RedisTimeoutError):
        raise ConfigError(
            f"REDIS_URL: no answer from Redis within {timeout_s:g} s "
            "(wrong port, TLS mismatch or a firewall?)"
        ) from None
    except (RedisError, OSError) as exc:
        raise ConfigError(f"REDIS_URL: cannot connect to Redis: {_first_line(exc)}") from None
    finally:
        await client.aclose()
    return str(info.get("redis_version", "unknown"))


def _first_line(exc: BaseException) -> str:
    # redis-py's messages name host and port at most, never the password.
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
