"""The outbox with many replicas of a service: their relays share one outbox table, and
their housekeeping one purge."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest
from nats.js import JetStreamContext

from contracts.events import ModelRewarded
from services.runtime import outbox
from services.runtime.db import RUNTIME_MIGRATIONS, Login, create_pool, load_migrations, migrate
from tests.conftest import eventually

REPLICAS = 3


@pytest.fixture
async def pools(database_url: str) -> AsyncIterator[list[asyncpg.Pool]]:
    """One pool per replica of a service `svc`, on the same schema."""
    await migrate(database_url, "svc", load_migrations(RUNTIME_MIGRATIONS))
    made = [
        await create_pool(Login(database_url, "svc", "svc_app"), 4, f"replica-{i}")
        for i in range(REPLICAS)
    ]
    yield made
    for pool in made:
        await pool.close()


async def stream_event_ids(js: JetStreamContext, session: str) -> list[str]:
    """The event ids of the session's rewards stored in FEEDBACK, in stream order."""
    found: list[str] = []
    sub = await js.subscribe("model.rewarded", ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=0.5)
            event = ModelRewarded.model_validate_json(msg.data)
            if event.session_id == session:
                found.append(str(event.event_id))
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return found


async def test_relays_of_three_replicas_publish_every_row_once(
    pools: list[asyncpg.Pool], js: JetStreamContext
) -> None:
    session = "three-relays"
    relays = [outbox.Relay(pool, js, "svc", poll_interval=0.05) for pool in pools]
    loops = [asyncio.create_task(relay.run()) for relay in relays]
    written: list[str] = []

    async def write(replica: int, n: int) -> None:
        """Each replica commits events: half published at commit, half left to the loops."""
        relay = relays[replica]
        for i in range(n):
            event = ModelRewarded(
                user_id="u", session_id=session, model_id=f"m{replica}-{i}", brains=1
            )
            written.append(str(event.event_id))
            if i % 2:
                async with relay.transaction() as conn:
                    await outbox.add(conn, [event])
            else:
                async with relay.pool.acquire() as conn, conn.transaction():
                    await outbox.add(conn, [event])

    try:
        await asyncio.gather(*(write(r, 100) for r in range(REPLICAS)))

        async def all_sent() -> bool:
            unsent = await pools[0].fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
            return bool(unsent == 0)

        await eventually(all_sent, timeout=30)
    finally:
        for loop in loops:
            loop.cancel()
        for loop in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
    stored = await stream_event_ids(js, session)
    assert sorted(stored) == sorted(written)  # each once: JetStream dropped any second copy


async def test_a_purge_runs_on_one_replica_at_a_time(
    pools: list[asyncpg.Pool],
) -> None:
    async with pools[0].acquire() as conn:
        await conn.execute(
            "INSERT INTO outbox (event_id, subject, payload, headers, sent_at)"
            " SELECT gen_random_uuid(), 'model.rewarded', '\\x7b7d', '{}'::jsonb,"
            " now() - interval '2 days' FROM generate_series(1, 10)"
        )
    holder = await pools[1].acquire()
    try:
        # another replica is purging: it holds the lock inside its transaction
        async with holder.transaction():
            await holder.execute(
                "SELECT pg_advisory_xact_lock(hashtext('fleet-outbox-purge:' || current_schema()))"
            )
            assert not await outbox.purge(pools[0], 24, 7)
            assert await pools[0].fetchval("SELECT count(*) FROM outbox") == 10
        assert await outbox.purge(pools[0], 24, 7)
        assert await pools[0].fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await pools[1].release(holder)
