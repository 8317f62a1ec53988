"""The SSE decoder gives the same events however the byte stream is cut into reads."""

from __future__ import annotations

import random

import pytest

from uvian_worker.providers.sse import SSEDecoder


def decode(reads: list[bytes]) -> list[str]:
    decoder = SSEDecoder()
    events: list[str] = []
    for data in reads:
        events += decoder.feed(data)
    return events + decoder.finish()


def every_cut(stream: bytes) -> list[list[bytes]]:
    """The stream in one read, in every possible two reads, and byte by byte
    with an empty read between bytes (an empty read must change nothing)."""
    cuts = [[stream]]
    cuts += [[stream[:at], stream[at:]] for at in range(len(stream) + 1)]
    one_by_one = [stream[at : at + 1] for at in range(len(stream))]
    cuts.append(one_by_one)
    cuts.append([piece for byte in one_by_one for piece in (byte, b"")])
    return cuts


def reference_decode(stream: bytes) -> list[str]:
    """The event-stream rules applied to the whole stream at once, naively."""
    lines = stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")[:-1]
    events: list[str] = []
    data: list[str] = []
    for number, raw in enumerate(lines):
        line = raw.decode("utf-8", errors="replace")
        if number == 0:
            line = line.removeprefix("\ufeff")
        if not line:
            if data:
                events.append("\n".join(data))
            data = []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value.removeprefix(" "))
    return events


CASES = {
    "lf": (b"data: hello\n\ndata: world\n\n", ["hello", "world"]),
    "crlf": (b"data: a\r\n\r\ndata: b\r\n\r\n", ["a", "b"]),
    "cr": (b"data: a\r\rdata: b\r\r", ["a", "b"]),
    "mixed line ends": (b"data: a\r\n\ndata: b\r\rdata: c\n\r\n", ["a", "b", "c"]),
    "multi-byte utf-8": ("data: héllo 世界 🎉\n\n".encode(), ["héllo 世界 🎉"]),
    "utf-8 over several lines": (
        "data: ü\r\ndata: 世界\r\n\r\ndata: 🎉🎉\r\r".encode(),
        ["ü\n世界", "🎉🎉"],
    ),
    "invalid utf-8 is replaced": (
        b"data: \xff\xfeok\n\ndata: \xe4\xb8\n\n",
        ["\ufffd\ufffdok", "\ufffd"],
    ),
    "comments": (b": keep-alive\n\ndata: x\n: inside an event\n\n:ping\r\n\r\n", ["x"]),
    "empty blocks": (b"\n\n\r\n\r\rdata: x\n\n\n\n", ["x"]),
    "fields without data": (b"event: ping\nid: 3\nretry: 1000\n\n", []),
    "other fields ignored": (
        b"event: message\nid: 7\nretry: 1000\ndata: x\n\nevent: done\ndata: y\nid: 8\n\n",
        ["x", "y"],
    ),
    "optional space": (b"data:x\n\ndata: y\n\ndata:  z\n\n", ["x", "y", " z"]),
    "colons in the value": (b'data: {"a": "b:c"}\n\n', ['{"a": "b:c"}']),
    "multi-line data": (b"data: one\ndata:two\ndata:\ndata: four\n\n", ["one\ntwo\n\nfour"]),
    "empty data": (b"data\n\ndata:\n\ndata: \n\n", ["", "", ""]),
    "field name must match exactly": (b"data : x\nDATA: y\ndatum: z\n\n", []),
    "leading byte-order mark": (b"\xef\xbb\xbfdata: x\n\n", ["x"]),
    "byte-order mark only at the start": (b"data: x\n\n\xef\xbb\xbfdata: y\n\n", ["x"]),
    "unfinished last event is dropped": (b"data: x\n\ndata: y\n", ["x"]),
    "unfinished last line is dropped": (b"data: x\n\ndata: y", ["x"]),
    "cr at the very end closes the event": (b"data: x\n\r", ["x"]),
    "long line": (b"data: " + b"a" * 3000 + b"\n\n", ["a" * 3000]),
    "openai chunks": (
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\r\n\r\n'
        b": keep-alive\r\n\r\n"
        b"data: [DONE]\r\n\r\n",
        ['{"choices":[{"delta":{"content":"Hi"}}]}', "[DONE]"],
    ),
}


@pytest.mark.parametrize(("stream", "expected"), CASES.values(), ids=CASES.keys())
def test_same_events_at_every_cut(stream: bytes, expected: list[str]) -> None:
    assert reference_decode(stream) == expected
    for reads in every_cut(stream):
        assert decode(reads) == expected, reads


def test_cr_then_lf_across_reads_is_one_line_end() -> None:
    decoder = SSEDecoder()

    assert decoder.feed(b"data: a\r") == []
    # Were the LF an empty line of its own, "a" would be dispatched alone here.
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r\n") == ["a\nb"]


def test_cr_then_cr_across_reads_is_an_empty_line() -> None:
    decoder = SSEDecoder()

    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == ["a"]


def test_events_come_out_as_soon_as_they_are_complete() -> None:
    decoder = SSEDecoder()

    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\ndata: b\n\ndata: c\n\nda") == ["a", "b", "c"]
    assert decoder.feed(b"ta: d\n") == []
    assert decoder.feed(b"\n") == ["d"]
    assert decoder.finish() == []


def test_finish_drops_the_unfinished_event_and_starts_over() -> None:
    decoder = SSEDecoder()

    assert decoder.feed(b"data: lost\ndata: also lost\n") == []
    assert decoder.finish() == []
    assert decoder.feed(b"\xef\xbb\xbfdata: next\n\n") == ["next"]


def test_split_inside_a_character_decodes_whole() -> None:
    stream = "data: 🎉\n\n".encode()
    emoji_at = stream.index(b"\xf0")
    decoder = SSEDecoder()

    for at in range(emoji_at, emoji_at + 4):
        assert decoder.feed(stream[at : at + 1]) == []
    assert decoder.feed(stream[emoji_at + 4 :]) == []
    assert decoder.finish() == []

    decoder = SSEDecoder()
    assert decoder.feed(stream[: emoji_at + 2]) == []
    assert decoder.feed(stream[emoji_at + 2 :]) == ["🎉"]


TOKENS = [
    b"data:",
    b"data: ",
    b"data",
    b"event: e",
    b": c",
    b"\r",
    b"\n",
    b"\r\n",
    b"x",
    b" ",
    b":",
    "é世🎉".encode(),
    b"\xff",
    b"\xe4\xb8",
    b"\xef\xbb\xbf",
]


@pytest.mark.parametrize("seed", range(100))
def test_random_streams_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    stream = b"".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 120)))
    expected = reference_decode(stream)

    assert decode([stream]) == expected
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(stream) + 1), k=min(len(stream) + 1, 6)))
        bounds = zip([0, *cuts], [*cuts, len(stream)], strict=True)
        reads = [stream[start:end] for start, end in bounds]
        assert decode(reads) == expected, reads
