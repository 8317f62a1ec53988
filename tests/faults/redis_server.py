"""A `redis-server` of the test's own, to stop, kill and start again on the same port."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.servers import (
    HOST,
    START_TIMEOUT_S,
    ManagedServer,
    check_alive,
    end_process,
    free_port,
    wait_until,
)


class PrivateRedis(ManagedServer):
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
        wait_until(self._answers_ping, self.timeout_s, f"redis-server on port {self.port}")

    def stop(self) -> None:
        """SIGTERM: Redis closes its clients' connections and exits; the data is gone."""
        end_process(self._process, signal.SIGTERM, self.timeout_s)

    def kill(self) -> None:
        """SIGKILL: the connections die with the process, as in a crash."""
        end_process(self._process, signal.SIGKILL, self.timeout_s)

    def flushall(self) -> None:
        with self._client() as client:
            client.flushall()

    def close(self) -> None:
        end_process(self._process, signal.SIGKILL, self.timeout_s)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _answers_ping(self) -> bool:
        check_alive(self._process, self._dir / "redis.log")
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
