"""An incremental decoder of Server-Sent Events, fed with raw bytes as they arrive.

Both streaming protocols the worker speaks (OpenAI-compatible chat completions and
RunPod's stream route) deliver their payloads as SSE. Only the `data` field
matters to them, so the decoder returns each event's data and drops the rest.

The decoder works on whole buffers: it finds the last line end of each read,
decodes every complete line in one call and keeps the unfinished tail as bytes.
A UTF-8 character never contains a CR or LF byte, so cutting at a line end can
never split one.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_CR = 0x0D
_LF = 0x0A
_BOM = "\ufeff"


class SSEDecoder:
    """Turns a byte stream into the data payloads of its events, in order.

    Follows the event-stream rules of the HTML standard: lines end with CR, LF
    or CRLF; a blank line dispatches the event; lines starting with ':' are
    comments; `data` lines of one event are joined with LF; an event without
    any `data` line is not dispatched; a stream that ends before the blank line
    discards the unfinished event.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._tail = bytearray()
        self._data_lines: list[str] = []
        # The previous read ended with CR, so an LF opening the next one is its pair.
        self._after_cr = False
        # A byte-order mark is skipped once, at the very start of the stream.
        self._at_start = True

    def feed(self, data: bytes) -> list[str]:
        """Consume the next bytes of the stream; return the events they complete."""
        # The CR that ended the previous read already closed its line; an LF right
        # after it is the second half of a CRLF, not an empty line.
        if self._after_cr and data:
            self._after_cr = False
            if data[0] == _LF:
                data = data[1:]

        last_end = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if last_end < 0:
            self._tail += data
            return []

        block = bytes(self._tail) + data[: last_end + 1]
        self._tail = bytearray(data[last_end + 1 :])
        self._after_cr = last_end == len(data) - 1 and data[last_end] == _CR
        return self._decode_lines(block)

    def finish(self) -> list[str]:
        """End of stream: return nothing unfinished, and reset for a new stream.

        Every event closed by a blank line has already been returned by `feed`, so
        the only thing left here is an event the stream cut off, which is dropped.
        """
        if self._tail or self._data_lines:
            logger.debug(
                "event stream ended inside an event; dropped %d buffered bytes",
                len(self._tail) + sum(len(line) for line in self._data_lines),
            )
        self._reset()
        return []

    def _decode_lines(self, block: bytes) -> list[str]:
        """Decode a run of complete lines (it ends with a line end) into events."""
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        text = block.decode("utf-8", errors="replace")
        if self._at_start:
            self._at_start = False
            text = text.removeprefix(_BOM)

        events: list[str] = []
        # The block ends with LF, so the split's last item is the empty remainder.
        for line in text.split("\n")[:-1]:
            if not line:
                self._dispatch(events)
            elif line[0] != ":":
                self._take_field(line)
        return events

    def _take_field(self, line: str) -> None:
        name, _, value = line.partition(":")
        if name == "data":
            self._data_lines.append(value.removeprefix(" "))

    def _dispatch(self, events: list[str]) -> None:
        if self._data_lines:
            events.append("\n".join(self._data_lines))
            self._data_lines = []
