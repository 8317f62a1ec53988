"""The asyncpg pool, made safe for transaction-mode poolers, and the one place
where asyncpg's errors become the worker's.

Supabase's pooler and pgbouncer in transaction mode hand each transaction to
whichever server connection is free. Behind one (`DATABASE_POOLER=transaction`,
the default) two habits keep every statement valid: the statement cache is off
(no named prepared statement outlives its transaction), and every statement
runs inside an explicit transaction, because asyncpg prepares an unnamed
statement and executes it in two round trips, which a transaction pooler may
otherwise send to two different servers.

On a direct connection or a session-mode pooler (`DATABASE_POOLER=none`)
statements are prepared once per connection and a single statement runs on
its own: about half the time per statement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from uvian_worker.errors import ConfigError, StoreUnavailable

logger = logging.getLogger(__name__)

# Lost or refused connections, and the server shutting down or failing over:
# the same job can succeed once Postgres is back.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)


# What Postgres says of a connection string that can never work: an unknown
# database, role or parameter, a refused password, a malformed URL.
_SETTING_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.ClientConfigurationError,
    ValueError,
)


async def connect_once(dsn: str, *, timeout_s: float) -> Any:
    """One connection outside any pool (migrations, creating the database), its errors
    translated as the pool's are."""
    try:
        return await asyncpg.connect(dsn, statement_cache_size=0, timeout=timeout_s)
    except _CONNECTION_ERRORS as exc:
        raise StoreUnavailable(f"cannot connect to Postgres: {describe(exc)}") from None


class _PoolerSafeConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection that skips asyncpg's reset query on release.

    The worker sets no session state (no LISTEN, advisory lock, cursor or SET),
    so the reset would only add a round trip to every acquire.
    """

    def get_reset_query(self) -> str:
        return ""


Connection = Any  # asyncpg ships no type information


class Database:
    """An asyncpg pool whose every use is a transaction with a bounded wait."""

    def __init__(self, pool: Any, *, acquire_timeout_s: float, behind_pooler: bool = True) -> None:
        self._pool = pool
        self._acquire_timeout_s = acquire_timeout_s
        self._behind_pooler = behind_pooler

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 20,
        acquire_timeout_s: float = 10.0,
        command_timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        behind_pooler: bool = True,
    ) -> Database:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min(min_size, max_size),
                max_size=max_size,
                statement_cache_size=0 if behind_pooler else 200,
                command_timeout=command_timeout_s,
                timeout=connect_timeout_s,
                max_inactive_connection_lifetime=60.0,
                connection_class=_PoolerSafeConnection,
            )
        except _CONNECTION_ERRORS as exc:
            raise StoreUnavailable(f"cannot connect to Postgres: {describe(exc)}") from None
        except _SETTING_ERRORS as exc:
            raise ConfigError(f"DATABASE_URL: {describe(exc)}") from None
        return cls(pool, acquire_timeout_s=acquire_timeout_s, behind_pooler=behind_pooler)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A pooled connection inside a transaction; connection loss becomes `StoreUnavailable`."""
        async with self._connection() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def statement(self) -> AsyncIterator[Connection]:
        """A pooled connection for one statement: in a transaction only behind a pooler.

        A single statement is atomic on its own; the explicit transaction is
        there only to pin both of asyncpg's round trips to one server.
        """
        if self._behind_pooler:
            async with self.transaction() as conn:
                yield conn
            return
        async with self._connection() as conn:
            yield conn

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection, acquired within the timeout, never handed on broken.

        A connection the server killed while it sat idle in the pool (a
        restart, an idle timeout, a failover) surfaces on its next use,
        sometimes only as asyncpg's "another operation is in progress": it is
        terminated so the pool opens a fresh one, and the step fails transient.
        A connection interrupted mid-query (cancelled, killed) is terminated by
        the pool itself on release.
        """
        try:
            async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                try:
                    yield conn
                except asyncpg.InternalClientError:
                    conn.terminate()
                    raise
        except (*_CONNECTION_ERRORS, asyncpg.InternalClientError) as exc:
            raise StoreUnavailable(f"Postgres unavailable: {describe(exc)}") from None

    async def check(self) -> None:
        async with self.transaction() as conn:
            await conn.fetchval("select 1")

    @property
    def pool_size(self) -> int:
        return int(self._pool.get_size())

    @property
    def pool_idle(self) -> int:
        return int(self._pool.get_idle_size())


def describe(exc: BaseException) -> str:
    """An error's class and message without anything from the connection string.

    asyncpg's texts name hosts and users at most; the DSN's password never
    reaches them, but this is where a future leak would be cut.
    """
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
