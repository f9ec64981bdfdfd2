"""stats' rows are each user's alone at the database level: through SQL as the request role,
on a pool whose one connection serves one user after another, and for the table owner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from contracts.events import SubtaskCompleted
from services.runtime.db import (
    RUNTIME_MIGRATIONS,
    Login,
    acting_for,
    create_pool,
    load_migrations,
    migrate,
)
from services.stats import handlers

STATS_MIGRATIONS = Path(__file__).parents[2] / "services" / "stats" / "migrations"
USERS = ("alice", "bob")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """stats migrated, two users' rows written as the consumers write them (stats_app), and
    a pool of ONE connection, so every request below reuses the same session."""
    await migrate(database_url, "stats", load_migrations(RUNTIME_MIGRATIONS, STATS_MIGRATIONS))
    one = await create_pool(Login(database_url, "stats", "stats_app"), 1, "test")
    completed = [
        SubtaskCompleted(plan_id="p", subtask_id=f"{u}-{m}", model_id=m, user_id=u, session_id="s")
        for u in USERS
        for m in ("m1", "m2")
    ]
    async with one.acquire() as conn:
        # as the consumer writes them
        await handlers.on_subtask_completed(handlers.Writer(), conn, completed)
    yield one
    await one.close()


async def users_seen(pool: asyncpg.Pool, claims: dict[str, str], where: str = "") -> list[str]:
    async with acting_for(pool, "stats", claims) as conn:
        rows = await conn.fetch(f"SELECT DISTINCT user_id FROM model_statistics {where}")
    return sorted(r["user_id"] for r in rows)


async def test_a_user_reads_their_own_rows_and_none_of_anyone_elses(pool: asyncpg.Pool) -> None:
    assert await users_seen(pool, {"sub": "alice"}) == ["alice"]
    assert await users_seen(pool, {"sub": "bob"}) == ["bob"]
    assert await users_seen(pool, {"sub": "alice"}, "WHERE user_id = 'bob'") == []
    assert await users_seen(pool, {"sub": "carol"}) == []
    assert await users_seen(pool, {"sub": "alice' OR true --"}) == []


async def test_alternating_users_on_one_pooled_connection_never_see_each_others_rows(
    pool: asyncpg.Pool,
) -> None:
    for i in range(20):
        user = USERS[i % 2]
        assert await users_seen(pool, {"sub": user}) == [user]
        # and nothing of the request stays on the session afterwards
        async with pool.acquire() as conn:
            left = await conn.fetchrow(
                "SELECT current_user AS who,"
                " coalesce(current_setting('request.jwt.claims', true), '') AS claims"
            )
        assert left is not None and (left["who"], left["claims"]) == ("stats_app", "")


async def test_a_request_role_without_claims_or_writes_gets_nothing(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE stats_user")  # no claims set
        assert await conn.fetchval("SELECT count(*) FROM model_statistics") == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with acting_for(pool, "stats", {"sub": "alice"}) as as_alice:
            await as_alice.execute("UPDATE model_statistics SET response_count = 99")


async def test_the_owner_is_held_to_the_policies_too(database_url: str, pool: asyncpg.Pool) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        async with admin.transaction():
            await admin.execute("SET LOCAL ROLE stats")
            assert await admin.fetchval("SELECT count(*) FROM stats.model_statistics") == 0
    finally:
        await admin.close()
