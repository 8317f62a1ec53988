"""A PostgreSQL cluster of the test's own, and pgbouncer in transaction mode before one."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.faults.servers import (
    HOST,
    START_TIMEOUT_S,
    FaultInfraError,
    ManagedServer,
    check_alive,
    end_process,
    free_port,
    hand_to_service_user,
    run_command,
    run_in_own_loop,
    service_user_options,
    wait_until,
)
from uvian_worker.store import migrations


class PrivatePostgres(ManagedServer):
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
            run_in_own_loop(self._migrate)
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
        # The extra 5 s outlasts terminate_backends' own wait.
        return run_command(args, self.timeout_s + 5).strip()

    def close(self) -> None:
        with contextlib.suppress(FaultInfraError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self._dir, ignore_errors=True)

    def _init_cluster(self) -> None:
        hand_to_service_user(self._dir)
        initdb = [str(self._bin / "initdb"), "-D", str(self._dir / "data"), "-U", "postgres"]
        initdb += ["-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"]
        run_command(initdb, self.timeout_s, as_service_user=True)
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
        run_command(command, self.timeout_s + 5, as_service_user=True)

    async def _migrate(self) -> None:
        await migrations.create_database_if_missing(self.dsn)
        await migrations.apply_migrations(self.dsn)


class PgBouncer(ManagedServer):
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
        command = [pgbouncer_binary() or "pgbouncer", "config.ini"]
        with open(self._dir / "pgbouncer.log", "ab") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **service_user_options(),
            )
        wait_until(self._accepts, self.timeout_s, f"pgbouncer on port {self.port}")

    def stop(self) -> None:
        """SIGTERM: pgbouncer closes every client and server connection at once."""
        end_process(self._process, signal.SIGTERM, self.timeout_s)

    def close(self) -> None:
        with contextlib.suppress(FaultInfraError):
            self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _write_config(self, server: str, settings: dict[str, str]) -> None:
        (self._dir / "userlist.txt").write_text('"postgres" ""\n', encoding="utf-8")
        lines = ["[databases]", f"* = {server}", "[pgbouncer]"]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        (self._dir / "config.ini").write_text("\n".join(lines) + "\n", encoding="utf-8")
        hand_to_service_user(self._dir)

    def _accepts(self) -> bool:
        check_alive(self._process, self._dir / "pgbouncer.log")
        try:
            socket.create_connection((HOST, self.port), timeout=1).close()
        except OSError:
            return False
        return True


def _postgres_bin_dir() -> Path:
    """The newest PostgreSQL under /usr/lib/postgresql (Debian's layout)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise FaultInfraError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return found[-1].parent


def pgbouncer_binary() -> str | None:
    """Debian's pgbouncer, which .ci/run installs; None on a machine without it."""
    found = shutil.which("pgbouncer")
    if found is None and Path("/usr/sbin/pgbouncer").exists():
        found = "/usr/sbin/pgbouncer"
    return found


def require_pgbouncer() -> None:
    if pgbouncer_binary() is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
