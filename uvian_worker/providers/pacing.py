"""Reading a streamed reply at its reader's pace rather than at the network's.

A model streams about one token per network packet, and every read of a
socket costs the event loop about the same whether it brings one token or five.
The reply's reader publishes at most one delta per window, so reading sooner
than the window's close only spends CPU: the bytes wait in the HTTP client's
buffer, and one read at the close takes them all. At a thousand streams in one
process this is what decides how many replies it can carry.
"""

from __future__ import annotations

import asyncio

import aiohttp

from uvian_worker.clock import monotonic_s
from uvian_worker.providers.base import ReadPace


class ReadPacer:
    """Holds a reply's next read until the moment `pace` names.

    The end of the body cuts a hold short, so the reply's end is not held back;
    a cancel (a stop, a deadline) ends it at once.
    """

    __slots__ = ("_content", "_pace", "_wake")

    def __init__(self, content: aiohttp.StreamReader, pace: ReadPace | None) -> None:
        self._content = content
        self._pace = pace
        self._wake: asyncio.Future[None] | None = None
        if pace is not None:
            content.on_eof(self._release)

    async def hold(self) -> None:
        if self._pace is None:
            return
        delay_s = self._pace() - monotonic_s()
        if delay_s <= 0 or self._content.is_eof():
            return
        loop = asyncio.get_running_loop()
        self._wake = loop.create_future()
        timer = loop.call_later(delay_s, self._release)
        try:
            await self._wake
        finally:
            timer.cancel()
            self._wake = None

    def _release(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
