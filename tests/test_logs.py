"""The JSON log lines: their timestamps, and the handler that writes each line at once."""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
import time
from datetime import UTC, datetime

import orjson
import pytest

from uvian_worker.observability.logs import JsonFormatter, LineWriter


def line(message: str, level: str, **extra: object) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": message, "levelname": level, **extra})


@pytest.mark.parametrize(
    "created",
    [0.5, 1_700_000_000.0, 1_700_000_000.9995, 1_700_000_059.999_999, 1_796_428_800.123_456],
)
def test_the_timestamp_is_isoformat_to_the_millisecond_in_utc(created: float) -> None:
    record = logging.makeLogRecord({"msg": "x", "levelname": "INFO", "created": created})

    line = orjson.loads(JsonFormatter().format(record))

    assert line["ts"] == datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


def test_the_timestamp_agrees_with_datetime_on_many_instants() -> None:
    formatter = JsonFormatter()
    picker = random.Random(20261204)
    for _ in range(20_000):
        created = picker.uniform(1.6e9, 1.9e9)
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert formatter._timestamp(created) == expected, created


def test_consecutive_lines_in_one_second_and_the_next_keep_their_own_time() -> None:
    formatter = JsonFormatter()
    stamps = []
    for created in (1_700_000_000.25, 1_700_000_000.75, 1_700_000_001.01):
        record = logging.makeLogRecord({"msg": "x", "levelname": "INFO", "created": created})
        stamps.append(orjson.loads(formatter.format(record))["ts"])

    assert stamps == [
        "2023-11-14T22:13:20.250+00:00",
        "2023-11-14T22:13:20.750+00:00",
        "2023-11-14T22:13:21.010+00:00",
    ]


def test_each_line_reaches_the_descriptor_whole_and_at_once() -> None:
    read_end, write_end = os.pipe()
    try:
        handler = LineWriter(write_end)
        handler.setFormatter(JsonFormatter())
        handler.handle(line("Job started", "INFO", job_id="j-1"))
        handler.handle(line("long " + "é" * 3000, "WARNING"))  # more than a small write

        data = os.read(read_end, 65536)
        while data.count(b"\n") < 2:
            data += os.read(read_end, 65536)
    finally:
        os.close(read_end)
        os.close(write_end)
    first, second = (orjson.loads(line) for line in data.splitlines())
    assert (first["msg"], first["job_id"], first["level"]) == ("Job started", "j-1", "info")
    assert second["msg"] == "long " + "é" * 3000


def test_a_full_non_blocking_descriptor_gets_every_line_whole() -> None:
    # stderr inherited with O_NONBLOCK (some launchers set it): a full pipe refuses the
    # write instead of waiting, and a line cut there would be glued onto the next.
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(write_end, False)
    received = bytearray()

    def drain_slowly() -> None:
        while chunk := os.read(read_end, 1024):
            received.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=drain_slowly)
    reader.start()
    try:
        handler = LineWriter(write_end)
        handler.setFormatter(JsonFormatter())
        for n in range(40):
            handler.handle(line(f"{n} " + "x" * 3000, "INFO"))
    finally:
        os.close(write_end)
        reader.join(timeout=10)
        os.close(read_end)
    messages = [orjson.loads(text)["msg"] for text in bytes(received).splitlines()]
    assert messages == [f"{n} " + "x" * 3000 for n in range(40)]


def test_a_descriptor_that_fails_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)  # writing now fails with EBADF
    handler = LineWriter(write_end)

    handler.handle(line("goes nowhere", "ERROR"))

    assert "Logging error" in capsys.readouterr().err
