"""`uvian-worker run` as a real process: start-up checks, signals, idle pick-up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.support import (
    ROOT,
    TEST_DSN,
    QueueWatcher,
    WorkerProcess,
    enqueue,
    seed_chat_job,
    settings_for_test,
    worker_env,
)
from uvian_worker.providers.simulator import RunningSimulator
from uvian_worker.store.database import Database


def run_cli(
    *args: str, env: dict[str, str], timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DATABASE_", "LLM_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "uvian_worker", *args],
        env={**clean, **env},
        cwd=ROOT / "tests",  # no .env there
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def test_missing_setting_stops_with_one_line() -> None:
    done = run_cli("run", env={"LLM_PROVIDER": "simulator", "SIMULATOR_URL": "http://127.0.0.1:9"})
    assert done.returncode == 2
    assert done.stderr == "uvian-worker: DATABASE_URL is not set\n"


@pytest.fixture(scope="module")
def redis_with_password() -> Iterator[int]:
    """A second Redis server, started by the test, that requires a password."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--requirepass",
            "right-pw",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    ping = ["redis-cli", "-p", str(port), "-a", "right-pw", "--no-auth-warning", "ping"]
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(ping, capture_output=True, text=True, check=False).stdout.strip()
            != "PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)  # polling a process we just started; nothing to await
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis://:not-the-password@127.0.0.1:{port}/0",
            "uvian-worker: REDIS_URL: Redis refused the credentials",
        ),
        ("rediss://:right-pw@127.0.0.1:{port}/0", "uvian-worker: REDIS_URL: "),
        ("redis://127.0.0.1:{port}/0", "uvian-worker: REDIS_URL: Redis refused the credentials"),
    ],
    ids=["wrong password", "TLS against a plain port", "no password"],
)
def test_bad_redis_connection_fails_fast_with_one_line(
    redis_with_password: int, url: str, expected: str
) -> None:
    started = time.monotonic()
    done = run_cli(
        "run",
        env={
            "DATABASE_URL": TEST_DSN,
            "REDIS_URL": url.format(port=redis_with_password),
            "CONNECT_TIMEOUT_S": "2",
            "LLM_PROVIDER": "simulator",
            "SIMULATOR_URL": "http://127.0.0.1:9",
        },
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(expected), done.stderr
    assert "Traceback" not in done.stderr
    assert "not-the-password" not in done.stderr and "right-pw" not in done.stderr
    assert time.monotonic() - started < 10


def test_unreachable_postgres_fails_with_one_line() -> None:
    done = run_cli(
        "run",
        env={
            "DATABASE_URL": "postgresql://postgres:s3cret@127.0.0.1:1/uvian_test",
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "LLM_PROVIDER": "simulator",
            "SIMULATOR_URL": "http://127.0.0.1:9",
        },
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("uvian-worker: DATABASE_URL: ")
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr


async def test_idle_worker_stops_quickly_and_cleanly_on_sigterm_and_sigint(
    migrated_dsn: str, simulator: RunningSimulator
) -> None:
    settings = settings_for_test(simulator.url)
    for signum in (signal.SIGTERM, signal.SIGINT):
        worker = WorkerProcess(worker_env(settings))
        await worker.start()
        assert "Connected to Redis" in worker.output and "Connected to Postgres" in worker.output
        started = time.monotonic()
        code = await worker.stop(signum)
        assert code == 0, worker.output
        assert time.monotonic() - started < 1.0
        assert "Traceback" not in worker.output
        assert "Worker stopped" in worker.output


async def test_job_after_long_idle_is_picked_up_at_once(
    database: Database, simulator: RunningSimulator
) -> None:
    """redis-py 8's default socket timeout would delay this by up to ~20 s."""
    settings = settings_for_test(simulator.url)
    worker = WorkerProcess(worker_env(settings))
    await worker.start()
    try:
        await asyncio.sleep(32)  # the idle period is the subject of this test
        chat = await seed_chat_job(database)
        async with QueueWatcher.open(settings) as watcher:
            enqueued_at = time.monotonic()
            await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
            event, _fields = await watcher.finished(str(chat.job_id))
            elapsed_s = time.monotonic() - enqueued_at
    finally:
        assert await worker.stop() == 0
    assert event == "completed"
    assert elapsed_s < 0.5, f"picked up and finished after {elapsed_s:.2f} s"


async def test_running_worker_serves_metrics_and_answers_health(
    database: Database, simulator: RunningSimulator
) -> None:
    import aiohttp

    from tests.faults import free_port

    settings = settings_for_test(simulator.url)
    port = free_port()
    worker = WorkerProcess(worker_env(settings) | {"METRICS_PORT": str(port)})
    await worker.start()
    health_env = {"DATABASE_URL": TEST_DSN, "QUEUE_PREFIX": settings.queue_prefix}
    try:
        chat = await seed_chat_job(database, "Count me")
        async with QueueWatcher.open(settings) as watcher:
            await enqueue(settings, "ai-chat", chat.data, str(chat.job_id))
            assert (await watcher.finished(str(chat.job_id)))[0] == "completed"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
            async with session.get(f"http://127.0.0.1:{port}/health") as response:
                health_status = response.status
        alive = await asyncio.to_thread(run_cli, "health", env=health_env)
    finally:
        assert await worker.stop() == 0
    gone = await asyncio.to_thread(run_cli, "health", env=health_env)

    assert 'uvian_worker_jobs_finished_total{job_name="ai-chat",outcome="completed"} 1.0' in metrics
    assert "uvian_worker_first_token_seconds_count 1.0" in metrics
    assert "uvian_worker_queue_jobs" in metrics or "uvian_worker_queue" in metrics
    assert health_status == 200
    assert alive.returncode == 0, alive.stderr
    assert gone.returncode == 1, gone.stdout


@pytest.mark.parametrize(
    ("command", "dsn", "expected"),
    [
        (
            "run",
            "postgresql://postgres@127.0.0.1:5432/no_such_db",
            "uvian-worker: DATABASE_URL: InvalidCatalogNameError: "
            'database "no_such_db" does not exist',
        ),
        (
            "migrate",
            "postgresql://no_such_role@127.0.0.1:5432/uvian_test",
            "uvian-worker: DATABASE_URL: InvalidAuthorizationSpecificationError: "
            'role "no_such_role"',
        ),
        (
            "run",
            "postgresql://postgres:pw@127.0.0.1:notaport/uvian_test",
            "uvian-worker: DATABASE_URL is invalid: its port is not a number",
        ),
        (
            "enqueue",
            "postgresql://postgres@127.0.0.1:5432/postgres",
            'uvian-worker: UndefinedTableError: relation "public.jobs" does not exist',
        ),
    ],
    ids=["unknown database", "unknown role", "malformed port", "schema missing"],
)
def test_database_mistakes_end_in_one_line(command: str, dsn: str, expected: str) -> None:
    args = [command]
    if command == "enqueue":
        ids = ["00000000-0000-4000-8000-000000000001"] * 3
        args += [
            "chat",
            "--conversation-id",
            ids[0],
            "--user-id",
            ids[1],
            "--message-id",
            ids[2],
            "--message",
            "hi",
        ]
    done = run_cli(
        *args,
        env={
            "DATABASE_URL": dsn,
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "QUEUE_PREFIX": "uvian-test-mistakes",
            "LLM_PROVIDER": "simulator",
            "SIMULATOR_URL": "http://127.0.0.1:9",
        },
    )
    assert done.returncode in (1, 2)
    assert done.stderr.strip().splitlines()[-1].startswith(expected), done.stderr
    assert "Traceback" not in done.stderr and ":pw@" not in done.stderr


def test_migrate_gives_up_on_a_silent_server_within_the_connect_timeout() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        done = run_cli(
            "migrate",
            env={
                "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/uvian_test",
                "CONNECT_TIMEOUT_S": "1",
            },
        )
    assert done.returncode == 2
    assert (
        done.stderr.strip() == "uvian-worker: DATABASE_URL: cannot connect to Postgres: timed out"
    )
    assert time.monotonic() - started < 5


def test_busy_metrics_port_refuses_to_start_before_taking_jobs(
    migrated_dsn: str, simulator: RunningSimulator
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = settings_for_test(simulator.url)
        done = run_cli(
            "run",
            env=worker_env(settings) | {"METRICS_PORT": str(port), "METRICS_HOST": "127.0.0.1"},
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"uvian-worker: METRICS_PORT: cannot listen on 127.0.0.1:{port}: address in use"
    )
    assert "Worker started" not in done.stderr


async def test_signal_while_connecting_stops_at_once(migrated_dsn: str) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        worker = WorkerProcess(
            {
                "DATABASE_URL": migrated_dsn,
                "REDIS_URL": f"redis://127.0.0.1:{port}/0",  # accepts, never answers
                "CONNECT_TIMEOUT_S": "30",
                "LLM_PROVIDER": "simulator",
                "SIMULATOR_URL": "http://127.0.0.1:9",
                "LOG_FORMAT": "console",
            }
        )
        await worker.start(wait_for=None)
        # Nothing to await from a process that is stuck connecting; give it a moment.
        await asyncio.sleep(1.0)
        started = time.monotonic()
        code = await worker.stop(signal.SIGINT)
    assert code == 0, worker.output
    assert time.monotonic() - started < 2
    assert "Stopped on SIGINT before the worker started" in worker.output
