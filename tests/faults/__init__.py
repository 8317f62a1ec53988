"""Servers a reliability test may break on purpose: Redis, Postgres, pgbouncer, a TCP proxy.

Everything here listens on 127.0.0.1 only, and is stopped by its context manager even
when the test fails (and at interpreter exit, should a finalizer never run).

`PrivateRedis`, `PrivatePostgres` and `PgBouncer` are processes, so their methods block
(each bounded by `timeout_s`) and they fit module- or session-scoped sync fixtures:

    @pytest.fixture(scope="module")
    def postgres() -> Iterator[PrivatePostgres]:
        with PrivatePostgres() as server:
            yield server

A blocking call inside an async test also blocks its event loop. Call it through
`await asyncio.to_thread(server.restart)` when the code under test must keep running
meanwhile (an in-process worker noticing the outage); call it directly when nothing
should notice before the test's next await.

`TcpProxy` is async: `async with TcpProxy(target_port) as proxy`, then point the client
at `proxy.port` and break the network with `pause()`, `cut()` or `refuse(True)`.

The modules: `servers` (what every server process shares: ports, lifetimes, commands),
`redis_server`, `postgres` (Postgres and pgbouncer) and `proxy`.
"""

from tests.faults.postgres import PgBouncer, PrivatePostgres
from tests.faults.proxy import ProxyCounters, TcpProxy
from tests.faults.redis_server import PrivateRedis
from tests.faults.servers import HOST, START_TIMEOUT_S, FaultInfraError, free_port

__all__ = [
    "HOST",
    "START_TIMEOUT_S",
    "FaultInfraError",
    "PgBouncer",
    "PrivatePostgres",
    "PrivateRedis",
    "ProxyCounters",
    "TcpProxy",
    "free_port",
]
