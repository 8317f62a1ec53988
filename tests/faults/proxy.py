"""An asyncio TCP proxy a test points a client through, to pause, cut or refuse its network."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from tests.faults.servers import HOST


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
