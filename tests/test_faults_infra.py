"""The fault-injection helpers do to real servers what the reliability tests rely on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tests.faults import HOST, PgBouncer, PrivatePostgres, PrivateRedis, TcpProxy
from tests.faults.postgres import require_pgbouncer
from uvian_worker.errors import StoreUnavailable
from uvian_worker.store.database import Database

# Bounded waits for things that must NOT happen; everything else is awaited.
QUIET_S = 0.3


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


@pytest.fixture(scope="module")
def bouncer(postgres: PrivatePostgres) -> Iterator[PgBouncer]:
    require_pgbouncer()
    with PgBouncer(postgres.port, pool_size=20, max_client_conn=500) as server:
        yield server


def no_retry_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))


async def backend_pid(database: Database) -> int:
    async with database.transaction() as conn:
        return int(await conn.fetchval("select pg_backend_pid()"))


async def test_private_redis_restarts_empty_on_the_same_url() -> None:
    with PrivateRedis() as server:
        client = no_retry_client(server.url)
        try:
            await client.set("kept", "no")
            assert await client.get("kept") == b"no"

            await asyncio.to_thread(server.stop)
            with pytest.raises(redis.ConnectionError):
                await client.get("kept")

            await asyncio.to_thread(server.start)
            assert await client.get("kept") is None  # same client, same URL: a new, empty server

            await client.set("crash", "1")
            await asyncio.to_thread(server.kill)
            with pytest.raises(redis.ConnectionError):
                await client.ping()
            await asyncio.to_thread(server.start)
            assert await client.dbsize() == 0

            await client.set("flushed", "1")
            server.flushall()
            assert await client.exists("flushed") == 0
        finally:
            await client.aclose()


async def test_private_postgres_is_migrated_and_bound_to_loopback(
    postgres: PrivatePostgres,
) -> None:
    assert postgres.psql("show listen_addresses") == HOST
    assert postgres.psql("show fsync") == "off"
    database = await Database.connect(postgres.dsn, min_size=1, max_size=1)
    try:
        async with database.transaction() as conn:
            applied = await conn.fetchval(
                "select count(*) from supabase_migrations.schema_migrations"
            )
            assert applied >= 1
            assert await conn.fetchval("select to_regclass('public.jobs')::text") == "jobs"
    finally:
        await database.close()
    assert postgres.start_s < 30


async def test_postgres_restart_fails_the_next_transaction_once(
    postgres: PrivatePostgres,
) -> None:
    database = await Database.connect(postgres.dsn, min_size=1, max_size=1)
    try:
        before = await backend_pid(database)

        # Blocking the loop on purpose: the pool learns of the restart only by using
        # its connection, as a worker does when Postgres bounced between two jobs.
        postgres.restart()
        with pytest.raises(StoreUnavailable, match=r"AdminShutdown|ConnectionDoesNotExist"):
            await backend_pid(database)

        after = await backend_pid(database)
        assert after != before
        assert await backend_pid(database) == after
    finally:
        await database.close()


async def test_postgres_down_then_up_again_on_its_port(postgres: PrivatePostgres) -> None:
    database = await Database.connect(postgres.dsn, min_size=1, max_size=1)
    try:
        await backend_pid(database)
        await asyncio.to_thread(postgres.stop)
        with pytest.raises(StoreUnavailable):
            await backend_pid(database)

        await asyncio.to_thread(postgres.start)
        assert await backend_pid(database) > 0
    finally:
        await database.close()


async def test_terminate_backends_breaks_a_held_connection(postgres: PrivatePostgres) -> None:
    database = await Database.connect(postgres.dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(StoreUnavailable):
            async with database.transaction() as conn:
                assert await conn.fetchval("select $1::int", 7) == 7
                assert postgres.terminate_backends() >= 1
                await conn.fetchval("select 1")

        assert await backend_pid(database) > 0  # the pool replaced the dead connection
    finally:
        await database.close()


async def test_pgbouncer_carries_200_concurrent_clients_of_the_store(bouncer: PgBouncer) -> None:
    """Each client runs three transactions with parameters; 20 server connections carry all."""
    database = await Database.connect(
        bouncer.dsn_for(PrivatePostgres.database), min_size=0, max_size=200
    )

    async def client(n: int) -> list[tuple[int, int]]:
        seen = []
        for step in range(3):
            async with database.transaction() as conn:
                total = await conn.fetchval("select $1::int + $2::int", n, step)
                await conn.execute("select pg_sleep($1)", 0.01)
                seen.append((int(total), int(await conn.fetchval("select pg_backend_pid()"))))
        return seen

    try:
        results = await asyncio.gather(*(client(n) for n in range(200)))
        assert [[total for total, _ in seen] for seen in results] == [
            [n, n + 1, n + 2] for n in range(200)
        ]
        assert database.pool_size > 20  # many client connections ...
        server_pids = {pid for seen in results for _, pid in seen}
        assert 1 < len(server_pids) <= 20  # ... on at most 20 server ones
    finally:
        await database.close()


async def test_pgbouncer_breaks_a_client_that_keeps_prepared_statements(
    bouncer: PgBouncer,
) -> None:
    """The control for the test above: the same load with asyncpg's statement cache on
    fails, so transactions really move between server connections."""
    pool = await asyncpg.create_pool(
        bouncer.dsn_for(PrivatePostgres.database), min_size=0, max_size=200
    )

    async def client(n: int) -> None:
        async with pool.acquire() as conn:
            for step in range(3):
                async with conn.transaction():
                    await conn.fetchval("select $1::int + $2::int", n, step)
                    await conn.execute("select pg_sleep($1)", 0.01)

    try:
        outcomes = await asyncio.gather(*(client(n) for n in range(200)), return_exceptions=True)
    finally:
        await pool.close()
    errors = [outcome for outcome in outcomes if outcome is not None]
    assert errors
    assert all("prepared statement" in str(error) for error in errors), errors[:3]


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # the proxy reset us: expected when a test cuts the link
        finally:
            writer.close()

    server = await asyncio.start_server(echo, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await reader.readexactly(len(data))


async def test_proxy_pause_holds_data_until_resume() -> None:
    async with echo_server() as port, TcpProxy(port) as proxy:
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        assert await roundtrip(reader, writer, b"before") == b"before"

        proxy.pause()
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(QUIET_S):
                await reader.readexactly(4)
        assert proxy.counters.active == 1

        proxy.resume()
        assert await reader.readexactly(4) == b"held"
        assert (proxy.counters.bytes_up, proxy.counters.bytes_down) == (10, 10)
        writer.close()
        await proxy.wait_until(lambda counters: counters.active == 0)


async def test_proxy_cut_resets_live_connections_and_keeps_serving() -> None:
    async with echo_server() as port, TcpProxy(port) as proxy:
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        assert await roundtrip(reader, writer, b"ping") == b"ping"

        assert proxy.cut() == 1
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
        writer.close()
        await proxy.wait_until(lambda counters: counters.active == 0 and counters.cut == 1)

        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        assert await roundtrip(reader, writer, b"again") == b"again"
        writer.close()


async def test_proxy_refuse_resets_new_connections_only_while_on() -> None:
    async with echo_server() as port, TcpProxy(port) as proxy:
        proxy.refuse(True)
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
        writer.close()
        assert proxy.counters.refused == 1

        proxy.refuse(False)
        reader, writer = await asyncio.open_connection(HOST, proxy.port)
        assert await roundtrip(reader, writer, b"open") == b"open"
        writer.close()
        assert proxy.counters.accepted == 2


async def test_proxy_cut_in_front_of_postgres_is_a_store_outage(
    postgres: PrivatePostgres,
) -> None:
    async with TcpProxy(postgres.port) as proxy:
        dsn = postgres.dsn.replace(f":{postgres.port}/", f":{proxy.port}/")
        database = await Database.connect(dsn, min_size=1, max_size=1)
        try:
            before = await backend_pid(database)
            with pytest.raises(StoreUnavailable):
                async with database.transaction() as conn:
                    proxy.cut()
                    await conn.fetchval("select 1")

            assert await backend_pid(database) != before
            assert proxy.counters.accepted == 2
        finally:
            await database.close()
