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
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from uvian_worker.store import migrations

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
_POLL_S = 0.02
_SERVICE_USER = "postgres"  # initdb, postgres and pgbouncer all refuse to run as root


class FaultInfraError(RuntimeError):
    """A helper server could not be started or stopped; the message has its log's tail."""


def free_port() -> int:
    """A port nobody listens on, chosen below Linux's ephemeral range (32768 and up),
    so no outgoing connection can take it while a server is down between restarts."""
    for _ in range(100):
        port = random.randint(20_000, 32_000)
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return port
    raise FaultInfraError("no free port between 20000 and 32000")


class _Managed:
    """Start on `with`, `close()` on leaving it; `close()` also runs at interpreter exit."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        _live.add(self)
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
        _live.discard(self)


_live: set[_Managed] = set()


@atexit.register
def _close_leftovers() -> None:
    for server in list(_live):
        server.close()


class PrivateRedis(_Managed):
    """A `redis-server` of the test's own; it keeps its port across `stop()`/`kill()` and
    `start()`, so a worker's configured `url` stays valid. With `appendonly` its data
    survives a restart, as a production BullMQ Redis's does; without, it comes back empty."""

    def __init__(self, *, timeout_s: float = START_TIMEOUT_S, appendonly: bool = False) -> None:
        self.port = free_port()
        self.timeout_s = timeout_s
        self.appendonly = appendonly
        self._dir = Path(tempfile.mkdtemp(prefix="uvian-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        """Start (again) on the same port; returns once the server answers PING."""
        args = ["redis-server", "--bind", HOST, "--port", str(self.port), "--save", ""]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--dir", str(self._dir)]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        with open(self._dir / "redis.log", "ab") as log:
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        _wait_until(self._answers_ping, self.timeout_s, f"redis-server on port {self.port}")

    def stop(self) -> None:
        """SIGTERM: Redis closes its clients' connections and exits; the data is gone."""
        _end(self._process, signal.SIGTERM, self.timeout_s)

    def kill(self) -> None:
        """SIGKILL: the connections die with the process, as in a crash."""
        _end(self._process, signal.SIGKILL, self.timeout_s)

    def flushall(self) -> None:
        with self._client() as client:
            client.flushall()

    def close(self) -> None:
        _end(self._process, signal.SIGKILL, self.timeout_s)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _answers_ping(self) -> bool:
        _check_alive(self._process, self._dir / "redis.log")
        with self._client() as client:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

    def _client(self) -> redis.Redis:
        # No retries: redis-py's default backoff would stretch every readiness poll.
        return redis.Redis(
            host=HOST, port=self.port, socket_timeout=self.timeout_s, retry=Retry(NoBackoff(), 0)
        )


class PrivatePostgres(_Managed):
    """A PostgreSQL cluster of the test's own, with `uvian_test` created and migrated.

    The first `start()` runs initdb (trust auth, fsync off) and the migrations; later
    ones reuse the cluster on the same port. `start_s` is how long the last start took.
    """

    database = "uvian_test"

    def __init__(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        self.port = free_port()
        self.timeout_s = timeout_s
        self.start_s = 0.0
        self._bin = _postgres_bin_dir()
        self._dir = Path(tempfile.mkdtemp(prefix="uvian-pg-"))
        self._running = False
        self._initialized = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{self.database}"

    def start(self) -> None:
        began = time.monotonic()
        if not self._initialized:
            self._init_cluster()
        log = self._dir / "server.log"
        self._pg_ctl("start", "-w", "-t", str(int(self.timeout_s)), "-l", str(log))
        self._running = True
        if not self._initialized:
            _run_in_own_loop(self._migrate)
            self._initialized = True
        self.start_s = time.monotonic() - began

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop`: "fast" ends every session with an admin-shutdown error first,
        "immediate" drops them as a crash would (crash recovery on the next start)."""
        if self._running:
            self._pg_ctl("stop", "-w", "-m", mode)
            self._running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def terminate_backends(self) -> int:
        """Kill every client session from the server side; returns how many.

        Each backend sends its client a FATAL admin-shutdown error and closes the
        connection before this returns (pg_terminate_backend waits for its exit).
        """
        wait_ms = int(self.timeout_s * 1000)
        sql = (
            "with victims as materialized (select pid from pg_stat_activity"
            " where backend_type = 'client backend' and pid <> pg_backend_pid())"
            f" select count(*) from victims where pg_terminate_backend(pid, {wait_ms})"
        )
        return int(self.psql(sql))

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql, outside any pool; returns the unaligned output."""
        args = [str(self._bin / "psql"), "-XAtq", "-h", HOST, "-p", str(self.port)]
        args += ["-U", "postgres", "-d", database, "-c", sql]
        return _run(args, self.timeout_s + 5).strip()  # outlasts terminate_backends' own wait

    def close(self) -> None:
        with contextlib.suppress(FaultInfraError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self._dir, ignore_errors=True)

    def _init_cluster(self) -> None:
        _hand_to_service_user(self._dir)
        initdb = [str(self._bin / "initdb"), "-D", str(self._dir / "data"), "-U", "postgres"]
        initdb += ["-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"]
        _run(initdb, self.timeout_s, as_service_user=True)
        settings = {
            "port": str(self.port),
            "listen_addresses": f"'{HOST}'",
            "unix_socket_directories": f"'{self._dir}'",
            "fsync": "off",  # a test cluster is thrown away: durability only costs time
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "'32MB'",
        }
        with open(self._dir / "data" / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def _pg_ctl(self, *args: str) -> None:
        command = [str(self._bin / "pg_ctl"), "-D", str(self._dir / "data"), *args]
        _run(command, self.timeout_s + 5, as_service_user=True)

    async def _migrate(self) -> None:
        await migrations.create_database_if_missing(self.dsn)
        await migrations.apply_migrations(self.dsn)


class PgBouncer(_Managed):
    """Debian's pgbouncer in transaction mode in front of a Postgres on 127.0.0.1.

    Clients connect as `postgres` without a password (auth_type trust, as the server
    behind it); `pool_size` server connections per database carry every client's
    transactions, so statements really move between server connections. `settings`
    adds to or overrides the [pgbouncer] section. While Postgres is down, pgbouncer
    queues clients (up to its `query_wait_timeout`, 120 s) rather than failing them.
    """

    def __init__(
        self,
        server_port: int,
        *,
        server_host: str = HOST,
        pool_size: int = 20,
        max_client_conn: int = 1000,
        settings: dict[str, str] | None = None,
        timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.port = free_port()
        self.timeout_s = timeout_s
        self._dir = Path(tempfile.mkdtemp(prefix="uvian-pgbouncer-"))
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config(
            f"host={server_host} port={server_port}",
            {
                "listen_addr": HOST,
                "listen_port": str(self.port),
                "unix_socket_dir": "",
                "auth_type": "trust",
                "auth_file": "userlist.txt",
                "pool_mode": "transaction",
                "max_client_conn": str(max_client_conn),
                "default_pool_size": str(pool_size),
                # The default 15 s pause after a failed server login would outlast a
                # test's Postgres restart by far; clients are refused during the pause.
                "server_login_retry": "1",
                "log_connections": "0",
                "log_disconnections": "0",
                **(settings or {}),
            },
        )

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def start(self) -> None:
        """Start (again) on the same port; returns once it accepts connections."""
        command = [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", "config.ini"]
        with open(self._dir / "pgbouncer.log", "ab") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **_service_user_options(),
            )
        _wait_until(self._accepts, self.timeout_s, f"pgbouncer on port {self.port}")

    def stop(self) -> None:
        """SIGTERM: pgbouncer closes every client and server connection at once."""
        _end(self._process, signal.SIGTERM, self.timeout_s)

    def close(self) -> None:
        with contextlib.suppress(FaultInfraError):
            self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _write_config(self, server: str, settings: dict[str, str]) -> None:
        (self._dir / "userlist.txt").write_text('"postgres" ""\n', encoding="utf-8")
        lines = ["[databases]", f"* = {server}", "[pgbouncer]"]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        (self._dir / "config.ini").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _hand_to_service_user(self._dir)

    def _accepts(self) -> bool:
        _check_alive(self._process, self._dir / "pgbouncer.log")
        try:
            socket.create_connection((HOST, self.port), timeout=1).close()
        except OSError:
            return False
        return True


@dataclass
class ProxyCounters:
    accepted: int = 0  # client connections taken, forwarded or refused
    active: int = 0  # connections being forwarded now
    refused: int = 0  # reset at once while `refuse(True)` was on
    cut: int = 0  # reset by `cut()`
    upstream_failed: int = 0  # the target did not accept; the client was reset
    bytes_up: int = 0  # client to target
    bytes_down: int = 0  # target to client


class TcpProxy:
    """An asyncio TCP proxy from 127.0.0.1:`port` (ephemeral) to a target.

    `pause()` holds every connection open but forwards nothing (new ones wait too)
    until `resume()`; `cut()` resets every live connection on both sides; `refuse(True)`
    resets new connections on accept: the client's connect succeeds and its first
    read fails with a reset, which clients report as a connection error, as for a
    server that is down. `counters` and `wait_until()` let a test await the effect.
    """

    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.counters = ProxyCounters()
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._changed = asyncio.Event()
        self._links: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._links)
        self.cut()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def refuse(self, refusing: bool) -> None:
        self._refusing = refusing

    def cut(self) -> int:
        """Reset every live connection now; returns how many."""
        for task, writers in list(self._links.items()):
            for writer in writers:
                _reset(writer)
            task.cancel()
        self._count("cut", len(self._links))
        return len(self._links)

    async def wait_until(
        self, predicate: Callable[[ProxyCounters], bool], timeout_s: float = 20.0
    ) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate(self.counters):
                self._changed.clear()
                await self._changed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Runs as a task of its own; it must not raise, or the event loop reports it.
        self._count("accepted")
        if self._refusing:
            self._count("refused")
            _reset(writer)
            return

        task = asyncio.current_task()
        assert task is not None
        self._links[task] = [writer]
        self._count("active")
        try:
            await self._forward(reader, writer, self._links[task])
        except asyncio.CancelledError:
            # Only `cut()` cancels this task, the proxy's own connection handler. Python
            # 3.11's start_server reports a handler that ends cancelled as an error.
            pass
        finally:
            del self._links[task]
            self._count("active", -1)

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: list[asyncio.StreamWriter],
    ) -> None:
        await self._flowing.wait()  # a paused network does not carry the handshake either
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._count("upstream_failed")
            _reset(writer)
            return

        writers.append(target_writer)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pump(reader, target_writer, writers, "bytes_up"))
            group.create_task(self._pump(target_reader, writer, writers, "bytes_down"))
        for each in writers:
            each.close()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        writers: list[asyncio.StreamWriter],
        counter: str,
    ) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
                self._count(counter, len(data))
            await self._flowing.wait()
            if sink.can_write_eof():
                sink.write_eof()  # pass the half-close on; the other direction may go on
        except OSError:
            for writer in writers:  # one side broke: so does the whole connection
                _reset(writer)

    def _count(self, counter: str, amount: int = 1) -> None:
        setattr(self.counters, counter, getattr(self.counters, counter) + amount)
        self._changed.set()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN, as a broken path or a crashed peer would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _postgres_bin_dir() -> Path:
    """The newest PostgreSQL under /usr/lib/postgresql (Debian's layout)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise FaultInfraError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return found[-1].parent


def _service_user_options() -> dict[str, Any]:
    """Popen arguments that drop root to the `postgres` user (a no-op when not root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": _SERVICE_USER, "group": _SERVICE_USER, "extra_groups": []}


def _hand_to_service_user(folder: Path) -> None:
    if os.geteuid() != 0:
        return
    for path in [folder, *folder.rglob("*")]:
        shutil.chown(path, _SERVICE_USER, _SERVICE_USER)


def _run(args: list[str], timeout_s: float, *, as_service_user: bool = False) -> str:
    options = _service_user_options() if as_service_user else {}
    # PG* variables of the caller's shell would redirect psql and pg_ctl elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd="/",
        check=False,
        **options,
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-2000:]
        raise FaultInfraError(f"{Path(args[0]).name} exited with {done.returncode}: {output}")
    return str(done.stdout)


def _run_in_own_loop(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run on a thread of its own, because the caller may be inside a running loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(factory())).result()


def _wait_until(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    # A process we started announces nothing we could await: poll, briefly and bounded.
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise FaultInfraError(f"{what} not ready after {timeout_s} s")
        time.sleep(_POLL_S)


def _check_alive(process: subprocess.Popen[bytes] | None, log: Path) -> None:
    if process is not None and process.poll() is not None:
        tail = log.read_text(errors="replace")[-2000:]
        raise FaultInfraError(f"{process.args!r} exited with {process.returncode}: {tail}")


def _end(process: subprocess.Popen[bytes] | None, signum: int, timeout_s: float) -> None:
    """Signal the process and reap it; one that ignores the signal is killed, and reported."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise FaultInfraError(f"{process.args!r} ignored signal {signum}; killed") from None
