"""PostgreSQL: one schema and three roles per service, versioned SQL migrations, the pool.

For a service `svc`: the role `svc` (no login) owns the schema `svc` and everything in it;
migrations run as it. The service logs in as `svc_app`, which may read and write the tables
of its own schema and nothing else (not the owner, so row-level security applies to it; not
a member of any other role, so it cannot become a superuser or another service). A request
made for a user runs as `svc_user` (no login; `svc_app` may switch to it inside a
transaction) with the caller's claims set, which is what row-level security policies check.

Migrations are `NNNN_name.sql` files applied in order, each in its own transaction, under
an advisory lock so that concurrent starts of the same service apply them once. Applied
files are recorded with a checksum; editing one after it was applied is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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


def login_role(schema: str) -> str:
    return f"{schema}_app"


def user_role(schema: str) -> str:
    return f"{schema}_user"


async def _role_missing(conn: asyncpg.Connection, role: str) -> bool:
    return not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)


async def _create_role(conn: asyncpg.Connection, role: str, options: str) -> bool:
    """Roles belong to the whole cluster: the same service migrating another database at
    the same moment may have created it first."""
    try:
        await conn.execute(f"CREATE ROLE {ident(role)} {options}")
    except asyncpg.DuplicateObjectError:
        return False
    return True


async def ensure_schema(
    conn: asyncpg.Connection, schema: str, owner: str, login: str, password: str | None = None
) -> None:
    """Create the roles and the schema when missing, and let the connected user act as the
    owner. Each step runs only when needed, so the schema's owner re-running migrations (the
    schema and roles made by an administrator or the migration job) needs no more rights."""
    if await _role_missing(conn, owner):
        await _create_role(conn, owner, "NOLOGIN")
    if not await conn.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", owner):
        await conn.execute(f"GRANT {ident(owner)} TO current_user")
    if not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
        await conn.execute(f"CREATE SCHEMA {ident(schema)} AUTHORIZATION {ident(owner)}")
    if await _role_missing(conn, user_role(schema)):
        await _create_role(conn, user_role(schema), "NOLOGIN")
    if await _role_missing(conn, login) and await _create_role(conn, login, "LOGIN NOINHERIT"):
        await conn.execute(f"GRANT {ident(user_role(schema))} TO {ident(login)}")
    if password is not None:
        await conn.execute(f"ALTER ROLE {ident(login)} PASSWORD {_literal(password)}")


def _literal(text: str) -> str:
    if "\x00" in text:
        raise ValueError("a password cannot hold a NUL byte")
    return "'" + text.replace("'", "''") + "'"


async def grant_to_runtime(conn: asyncpg.Connection, schema: str, login: str) -> None:
    """As the owner: the login role reads and writes the schema's tables; the request role
    may use the schema (each service's migrations grant it what it reads)."""
    s, app = ident(schema), ident(login)
    await conn.execute(
        f"GRANT USAGE ON SCHEMA {s} TO {app}, {ident(user_role(schema))};"
        f" GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {app};"
        f" GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {app};"
        f" GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {s} TO {app}, {ident(user_role(schema))}"
    )


async def migrate(
    database_url: str,
    schema: str,
    migrations: list[Migration],
    login: str | None = None,
    password: str | None = None,
) -> list[str]:
    """Apply what is not yet applied, as the schema's owner (`schema`), and grant the login
    role (`login`, by default `<schema>_app`) its rights; returns the names applied now."""
    owner, login = schema, login or login_role(schema)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"fleet-migrate:{schema}")
        try:
            await ensure_schema(conn, schema, owner, login, password)
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
            await grant_to_runtime(conn, schema, login)
            return applied
        finally:
            await conn.execute("RESET ROLE; SELECT pg_advisory_unlock_all()")
    finally:
        await conn.close()


@asynccontextmanager
async def acting_for(
    pool: asyncpg.Pool, schema: str, claims: dict[str, str]
) -> AsyncIterator[Connection]:
    """A transaction acting for a user: as `<schema>_user`, with `claims` (at least `sub`)
    in `request.jwt.claims`, both local to the transaction, so nothing of them is left on
    the pooled connection for the next request; what row-level security policies check."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true)",
            user_role(schema),
            json.dumps(claims),
        )
        yield conn


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


@dataclass(frozen=True)
class Login:
    """Where and as whom a service's sessions log in: the database of `database_url`, as
    `user` (its login role) with `password` when one is set; `schema` first on the search
    path (a connection default, so the pool's RESET ALL between uses keeps it)."""

    database_url: str
    schema: str
    user: str
    password: str | None = None

    def settings(self, application: str) -> dict[str, str]:
        return {"search_path": self.schema, "application_name": application}

    async def connect(self, application: str, timeout: float = 5) -> asyncpg.Connection:
        """One connection of its own (a leader lock lives as long as its connection)."""
        conn = await asyncpg.connect(
            self.database_url,
            user=self.user,
            password=self.password,
            server_settings=self.settings(application),
            timeout=timeout,
        )
        await _init_connection(conn)
        return conn


async def create_pool(login: Login, size: int, application: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        login.database_url,
        user=login.user,
        password=login.password,
        min_size=0,  # a floor would be refilled (and logged) once a second in an outage
        max_size=size,
        init=_init_connection,
        server_settings=login.settings(application),
    )
    assert pool is not None
    return pool
