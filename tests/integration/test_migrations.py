from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from services.runtime.db import RUNTIME_MIGRATIONS, Login, load_migrations, migrate

STATS_MIGRATIONS = Path(__file__).parents[2] / "services" / "stats" / "migrations"


async def test_migrations_apply_from_zero_then_second_run_is_a_noop(database_url: str) -> None:
    migrations = load_migrations(RUNTIME_MIGRATIONS, STATS_MIGRATIONS)
    first = await migrate(database_url, "stats", migrations)
    assert first == [m.name for m in migrations]
    assert "runtime/0001_outbox_inbox" in first

    second = await migrate(database_url, "stats", migrations)
    assert second == []

    conn = await asyncpg.connect(database_url)
    try:
        tables = {
            r["tablename"]: r["tableowner"]
            for r in await conn.fetch(
                "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'stats'"
            )
        }
        recorded = await conn.fetchval("SELECT count(*) FROM stats.schema_migrations")
    finally:
        await conn.close()
    # the service's role owns its schema's tables, not the admin that ran the migration
    expected = {"outbox", "inbox", "delivery_attempts", "model_statistics", "schema_migrations"}
    assert expected <= set(tables)
    assert set(tables.values()) == {"stats"}
    assert recorded == len(migrations)


async def test_a_migration_edited_after_it_was_applied_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "svc" / "migrations"
    folder.mkdir(parents=True)
    (folder / "0001_t.sql").write_text("CREATE TABLE t (x int);")
    await migrate(database_url, "svc", load_migrations(folder))
    (folder / "0001_t.sql").write_text("CREATE TABLE t (x bigint);")
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        await migrate(database_url, "svc", load_migrations(folder))


async def test_concurrent_starts_apply_each_migration_once(database_url: str) -> None:
    import asyncio

    migrations = load_migrations(RUNTIME_MIGRATIONS, STATS_MIGRATIONS)
    results = await asyncio.gather(*(migrate(database_url, "stats", migrations) for _ in range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, len(migrations)]


async def test_each_service_schema_is_closed_to_the_other_services(database_url: str) -> None:
    await migrate(database_url, "stats", load_migrations(RUNTIME_MIGRATIONS, STATS_MIGRATIONS))
    await migrate(database_url, "sync", load_migrations(RUNTIME_MIGRATIONS))
    conn = await Login(database_url, "sync", "sync_app").connect("test")
    try:
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0  # its own: yes
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM stats.model_statistics")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM stats.outbox")
    finally:
        await conn.close()


@pytest.mark.parametrize("other", ["postgres", "stats", "stats_app", "stats_user", "sync"])
async def test_a_service_session_cannot_become_a_superuser_or_another_service(
    database_url: str, other: str
) -> None:
    await migrate(database_url, "stats", load_migrations(RUNTIME_MIGRATIONS, STATS_MIGRATIONS))
    await migrate(database_url, "sync", load_migrations(RUNTIME_MIGRATIONS))
    conn = await Login(database_url, "sync", "sync_app").connect("test")
    try:
        assert (
            await conn.fetchval(
                "SELECT rolsuper OR rolbypassrls OR rolcreaterole"
                " FROM pg_roles WHERE rolname = current_user"
            )
            is False
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f'SET ROLE "{other}"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f'SET SESSION AUTHORIZATION "{other}"')
        # it may act as its own request role, and that one sees no other schema either
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE sync_user")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("SELECT * FROM stats.model_statistics")
    finally:
        await conn.close()


async def test_a_service_logging_in_as_its_own_role_needs_no_admin_rights(
    database_url: str,
) -> None:
    migrations = load_migrations(RUNTIME_MIGRATIONS, STATS_MIGRATIONS)
    await migrate(database_url, "stats", migrations)  # the migration job, as an administrator
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("ALTER ROLE stats LOGIN")
    finally:
        await admin.close()
    own_url = database_url.replace("postgres@", "stats@", 1)
    assert own_url != database_url, "expects the embedded server's postgres user"
    assert await migrate(own_url, "stats", migrations) == []  # a restart of the service
