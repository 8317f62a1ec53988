"""The processes of the chat benchmark: the simulator (and the latency it plays), and the
workers with their logs."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import ROOT, BenchError, ProcessReading, read_process

START_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Latency:
    name: str
    first_token_ms: float
    tokens_per_s: float  # 0: as fast as the simulator can write
    reply_tokens: int = 200

    @property
    def reply_s(self) -> float:
        """The simulator's own time for one reply."""
        streaming_s = self.reply_tokens / self.tokens_per_s if self.tokens_per_s else 0.0
        return self.first_token_ms / 1000 + streaming_s


ZERO = Latency("zero", 0.0, 0.0)
REALISTIC = Latency("realistic", 300.0, 50.0)


class SimulatorProcess:
    """`bench.sim_server` in its own process, so its CPU is not the worker's."""

    def __init__(self, latency: Latency) -> None:
        self.latency = latency
        self.url = ""
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> SimulatorProcess:
        latency = self.latency
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "bench.sim_server", "--reply-tokens", str(latency.reply_tokens)),
            *("--first-token-ms", str(latency.first_token_ms)),
            *("--tokens-per-s", str(latency.tokens_per_s)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert self._process.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            line = await self._process.stdout.readline()
        if not line:
            raise BenchError("the simulator did not start")
        self.url = orjson.loads(line)["url"]
        self._session = aiohttp.ClientSession()
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def spans(self) -> dict[str, Any]:
        """The requests seen since the last call (the simulator then forgets them)."""
        assert self._session is not None
        async with self._session.get(f"{self.url}/_bench/spans") as response:
            spans: dict[str, Any] = orjson.loads(await response.read())
        return spans

    async def __aexit__(self, *_exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._process is not None and self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            await self._process.wait()


class WorkerProcesses:
    """`uvian-worker run` processes, each logging JSON to a file of its own."""

    def __init__(self, count: int, env: dict[str, str], log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self._env = env
        self._logs = [log_dir / f"worker-{n}.log" for n in range(count)]
        self._processes: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for log_path in self._logs:
            with log_path.open("wb") as log:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "uvian_worker", "run"),
                    env=self._env,
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            self._processes.append(process)
        async with asyncio.timeout(START_TIMEOUT_S):
            for process, log_path in zip(self._processes, self._logs, strict=True):
                while b"Worker started" not in log_path.read_bytes():
                    if process.returncode is not None:
                        tail = log_path.read_text()[-1500:]
                        raise BenchError(f"a worker exited at start: {tail}")
                    await asyncio.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def readings(self) -> list[ProcessReading]:
        return [read_process(process.pid) for process in self._processes]

    async def stop(self) -> None:
        """SIGTERM twice: the second skips the grace period of jobs still in flight."""
        for _ in range(2):
            for process in self._processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
        for process in self._processes:
            await process.wait()

    def job_records(self) -> list[dict[str, Any]]:
        """The runner's lines with an outcome: job id, outcome, duration, wall-clock time."""
        records = []
        for log_path in self._logs:
            for line in log_path.read_bytes().splitlines():
                if b'"outcome"' in line:
                    records.append(orjson.loads(line))
        return records
