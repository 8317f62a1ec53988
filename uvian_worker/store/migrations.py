"""Applies `supabase/migrations/*.sql` to any Postgres and records them.

The record is Supabase CLI's own table, `supabase_migrations.schema_migrations`,
so a database migrated here and one migrated by `supabase db push` agree on what
has been applied. Each file runs in its own transaction under an advisory lock,
so two workers starting together apply each migration once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from uvian_worker.errors import ConfigError
from uvian_worker.store.database import connect_once

logger = logging.getLogger(__name__)

_FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>[\w-]+)\.sql$")
_LOCK_KEY = 0x75766961  # "uvia": any constant shared by every migrator of this schema

_CREATE_HISTORY = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
    version text primary key,
    statements text[],
    name text
);
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def default_migrations_dir() -> Path:
    """`supabase/migrations` of the checkout, or the copy the wheel installs beside the package."""
    # In a checkout and in site-packages alike, `supabase/` stands beside `uvian_worker/`.
    candidate = Path(__file__).resolve().parents[2] / "supabase" / "migrations"
    if candidate.is_dir():
        return candidate
    raise ConfigError(
        "no supabase/migrations folder found beside the package; run `migrate` from a "
        "checkout or the Docker image"
    )


def discover(folder: Path) -> list[Migration]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name must be <version>_<name>.sql: {path.name}")
        found.append(Migration(match["version"], match["name"], path))
    return found


async def apply_migrations(
    dsn: str, folder: Path | None = None, *, timeout_s: float = 10.0
) -> list[str]:
    """Apply every pending migration; returns the versions applied now."""
    migrations = discover(folder or default_migrations_dir())
    conn = await connect_once(dsn, timeout_s=timeout_s)
    try:
        await conn.execute(_CREATE_HISTORY)
        return [m.version for m in migrations if await _apply_one(conn, m)]
    finally:
        await conn.close()


async def _apply_one(conn: asyncpg.Connection, migration: Migration) -> bool:
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock($1)", _LOCK_KEY)
        applied = await conn.fetchval(
            "select 1 from supabase_migrations.schema_migrations where version = $1",
            migration.version,
        )
        if applied:
            return False

        sql = migration.sql
        await conn.execute(sql)
        await conn.execute(
            "insert into supabase_migrations.schema_migrations (version, statements, name)"
            " values ($1, $2, $3)",
            migration.version,
            [sql],
            migration.name,
        )
    logger.info("Applied migration %s_%s", migration.version, migration.name)
    return True


async def create_database_if_missing(dsn: str, *, timeout_s: float = 10.0) -> bool:
    """Create the database the DSN names, connecting to `postgres` to do it (development aid)."""
    try:
        conn = await connect_once(dsn, timeout_s=timeout_s)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False

    name = dsn.rsplit("/", 1)[1].split("?", 1)[0]
    admin_dsn = dsn.rsplit("/", 1)[0] + "/postgres"
    admin = await connect_once(admin_dsn, timeout_s=timeout_s)
    try:
        await admin.execute(f'create database "{name}"')
    except asyncpg.DuplicateDatabaseError:
        return False
    finally:
        await admin.close()
    logger.info("Created database %s", name)
    return True
