"""What every helper server process shares: a free port, a lifetime bound to a `with`
block and to the interpreter, and commands run as the service user with bounded waits."""

from __future__ import annotations

import asyncio
import atexit
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

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


class ManagedServer:
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


_live: set[ManagedServer] = set()


@atexit.register
def _close_leftovers() -> None:
    for server in list(_live):
        server.close()


def service_user_options() -> dict[str, Any]:
    """Popen arguments that drop root to the `postgres` user (a no-op when not root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": _SERVICE_USER, "group": _SERVICE_USER, "extra_groups": []}


def hand_to_service_user(folder: Path) -> None:
    if os.geteuid() != 0:
        return
    for path in [folder, *folder.rglob("*")]:
        shutil.chown(path, _SERVICE_USER, _SERVICE_USER)


def run_command(args: list[str], timeout_s: float, *, as_service_user: bool = False) -> str:
    options = service_user_options() if as_service_user else {}
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


def run_in_own_loop(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run on a thread of its own, because the caller may be inside a running loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(factory())).result()


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    # A process we started announces nothing we could await: poll, briefly and bounded.
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise FaultInfraError(f"{what} not ready after {timeout_s} s")
        time.sleep(_POLL_S)


def check_alive(process: subprocess.Popen[bytes] | None, log: Path) -> None:
    if process is not None and process.poll() is not None:
        tail = log.read_text(errors="replace")[-2000:]
        raise FaultInfraError(f"{process.args!r} exited with {process.returncode}: {tail}")


def end_process(process: subprocess.Popen[bytes] | None, signum: int, timeout_s: float) -> None:
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
