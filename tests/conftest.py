"""Fixtures on the real services: Postgres (a test database, migrated once), Redis,
the LLM simulator; and a guard that fails a test whose event loop logged an error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support import TEST_DSN
from uvian_worker.providers.simulator import RunningSimulator, SimulatorConfig, start_simulator
from uvian_worker.store import migrations
from uvian_worker.store.database import Database


@pytest.fixture(scope="session")
def migrated_dsn() -> str:
    async def prepare() -> None:
        await migrations.create_database_if_missing(TEST_DSN)
        await migrations.apply_migrations(TEST_DSN)

    asyncio.run(prepare())
    return TEST_DSN


@pytest.fixture
async def database(migrated_dsn: str) -> AsyncIterator[Database]:
    db = await Database.connect(migrated_dsn, min_size=1, max_size=5)
    yield db
    await db.close()


@pytest.fixture
async def simulator() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimulatorConfig())
    yield running
    await running.stop()


@pytest.fixture(autouse=True)
async def no_unhandled_loop_errors() -> AsyncIterator[None]:
    """Fail the test if the event loop reported an exception nobody handled."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    yield
    loop.set_exception_handler(previous)
    messages = [str(c.get("exception") or c.get("message")) for c in reported]
    assert not reported, f"the event loop reported unhandled errors: {messages}"
