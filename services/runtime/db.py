"""PostgreSQL: one schema and one role per service, versioned SQL migrations, the pool.

Migrations are `NNNN_name.sql` files applied in order, each in its own transaction, under
an advisory lock so that concurrent starts of the same service apply them once. Applied
files are recorded with a checksum; editing one after it was applied is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

Connection = asyncpg.Connection | PoolConnectionProxy
"""A connection, straight or borrowed from a pool; what handlers and queries receive."""

RUNTIME_MIGRATIONS = Path(__file__).parent / "migrations"
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def ident(name: str) -> str:
    """A schema or role name, checked, since identifiers cannot be bind parameters."""
    if not _IDENT.match(name):
        raise ValueError(f"invalid identifier {name!r}")
    return f'"{name}"'


@dataclass(frozen=True)
class Migration:
    name: str  # "<dir>/<file stem>", e.g. "stats/0001_model_statistics"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(*directories: Path) -> list[Migration]:
    found: list[Migration] = []
    for directory in directories:
        label = directory.parent.name
        for path in sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            found.append(Migration(f"{label}/{path.stem}", path.read_text()))
    return found


async def ensure_schema(conn: asyncpg.Connection, schema: str, owner: str) -> None:
    """Create the owner role and its schema when missing, and let the connected user act as
    it. Each step runs only when needed, so a service that logs in with just its own role
    (schema made by an administrator or the migration job) needs no further privilege."""
    if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", owner):
        await conn.execute(f"CREATE ROLE {ident(owner)} NOLOGIN")
    if not await conn.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", owner):
        await conn.execute(f"GRANT {ident(owner)} TO current_user")
    if not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
        await conn.execute(f"CREATE SCHEMA {ident(schema)} AUTHORIZATION {ident(owner)}")


async def migrate(
    database_url: str, schema: str, migrations: list[Migration], owner: str | None = None
) -> list[str]:
    """Apply what is not yet applied; returns the names applied now."""
    owner = owner or schema
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"fleet-migrate:{schema}")
        try:
            await ensure_schema(conn, schema, owner)
            await conn.execute(f"SET ROLE {ident(owner)}; SET search_path = {ident(schema)}")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                r["name"]: r["checksum"]
                for r in await conn.fetch("SELECT name, checksum FROM schema_migrations")
            }
            applied: list[str] = []
            for m in migrations:
                if m.name in done:
                    if done[m.name] != m.checksum:
                        raise RuntimeError(f"migration {m.name} was changed after it was applied")
                    continue
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                        m.name,
                        m.checksum,
                    )
                applied.append(m.name)
                log.info("applied migration %s", m.name, extra={"schema": schema})
            return applied
        finally:
            await conn.execute("RESET ROLE; SELECT pg_advisory_unlock_all()")
    finally:
        await conn.close()


def usable(conn: Connection | None) -> bool:
    """False for no connection, a closed one, or one the pool took back (it does when the
    server goes away, and the borrowed proxy then refuses every call)."""
    if conn is None:
        return False
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(
    database_url: str, schema: str, role: str, size: int, application: str
) -> asyncpg.Pool:
    """A pool whose sessions act as `role` with `schema` first on the search path; these are
    connection defaults, so the pool's RESET ALL between uses keeps them."""
    pool = await asyncpg.create_pool(
        database_url,
        min_size=0,  # a floor would be refilled (and logged) once a second in an outage
        max_size=size,
        init=_init_connection,
        server_settings={"search_path": schema, "role": role, "application_name": application},
    )
    assert pool is not None
    return pool
