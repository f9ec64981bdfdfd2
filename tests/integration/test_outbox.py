from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import pytest
from nats.js import JetStreamContext

from contracts.events import ModelRewarded
from services.runtime import outbox
from services.runtime.db import (
    RUNTIME_MIGRATIONS,
    Connection,
    Login,
    create_pool,
    load_migrations,
    migrate,
)
from tests.conftest import eventually


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(database_url, "svc", load_migrations(RUNTIME_MIGRATIONS))
    p = await create_pool(Login(database_url, "svc", "svc_app"), 4, "test")
    yield p
    await p.close()


def rewards(n: int) -> list[ModelRewarded]:
    return [
        ModelRewarded(user_id="u", session_id="s", model_id=f"m{i}", brains=i + 1) for i in range(n)
    ]


async def stream_messages(js: JetStreamContext, stream: str) -> list[dict[str, str]]:
    info = await js.stream_info(stream)
    msgs = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(stream, seq)
        assert msg.data is not None
        msgs.append(json.loads(msg.data))
    return msgs


async def test_relay_publishes_committed_events_once_in_order(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    events = rewards(5)
    async with pool.acquire() as conn, conn.transaction():
        await outbox.add(conn, events)
    async with pool.acquire() as conn:  # rolled back: must never be published
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await outbox.add(conn, rewards(1))
                raise RuntimeError("state change failed")

    relay = outbox.Relay(pool, js, "svc")
    assert await relay.relay_once() == 5
    assert await relay.relay_once() == 0

    published = await stream_messages(js, "FEEDBACK")
    assert [m["event_id"] for m in published] == [str(e.event_id) for e in events]
    unsent = await pool.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    assert unsent == 0


class CrashBeforeMarkSent(outbox.Relay):
    """A relay that dies after publishing and before recording that it did."""

    async def mark_sent(self, conn: Connection, ids: list[int]) -> None:
        raise ConnectionResetError("killed between publish and mark-sent")


async def test_relay_killed_between_publish_and_mark_sent_publishes_each_event_once(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    events = rewards(50)
    async with pool.acquire() as conn, conn.transaction():
        await outbox.add(conn, events)

    with pytest.raises(ConnectionResetError):
        await CrashBeforeMarkSent(pool, js, "svc").relay_once()
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 50

    assert await outbox.Relay(pool, js, "svc").relay_once() == 50  # the restarted relay
    published = await stream_messages(js, "FEEDBACK")
    # JetStream dropped the second copies by Nats-Msg-Id = event_id
    assert sorted(m["event_id"] for m in published) == sorted(str(e.event_id) for e in events)


async def test_the_same_event_written_twice_is_recorded_once(pool: asyncpg.Pool) -> None:
    event = rewards(1)[0]
    for _ in range(2):
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, [event])
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 1


async def test_running_relay_is_woken_by_commit_and_carries_trace_context(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    relay = outbox.Relay(pool, js, "svc", poll_interval=30)  # only NOTIFY can wake it in time
    task = asyncio.create_task(relay.run())
    try:

        async def listening() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) > 0 FROM pg_stat_activity"
                    " WHERE datname = current_database() AND query = $1",
                    f'LISTEN "{relay.channel}"',
                )
            )

        await eventually(listening, what="the relay listening for commits")
        with tracer.start_as_current_span("producer") as span:
            async with pool.acquire() as conn, conn.transaction():
                await outbox.add(conn, rewards(1))
            trace_id = format(span.get_span_context().trace_id, "032x")
        sub = await js.subscribe("model.rewarded", ordered_consumer=True)
        msg = await sub.next_msg(timeout=5)
        assert msg.headers is not None
        assert msg.headers["traceparent"].split("-")[1] == trace_id
        assert msg.headers["Nats-Msg-Id"] == json.loads(msg.data)["event_id"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    _ = trace


async def test_a_transaction_publishes_its_events_at_commit_once(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    relay = outbox.Relay(pool, js, "svc", poll_interval=0.05)
    before = outbox.PUBLISHED.labels("model.rewarded")._value.get()
    events = rewards(20)
    async with relay.transaction() as conn:
        await outbox.add(conn, events)

    async def stored() -> bool:
        return len(await stream_messages(js, "FEEDBACK")) == 20

    # the relay loop is not running: only the publish at commit can have sent them
    await eventually(stored, what="20 events in the stream")
    loop = asyncio.create_task(relay.run())  # and once it runs, it must not publish again
    try:
        # a later event written without publish at commit: only the loop sends it, and it
        # sends what is unsent in order, so once it is in the stream the loop has passed
        # over the twenty (and JetStream would drop a second copy: count what was sent)
        async with pool.acquire() as conn, conn.transaction():
            await outbox.add(conn, rewards(1))

        async def sent_by_the_loop() -> bool:
            return len(await stream_messages(js, "FEEDBACK")) == 21

        await eventually(sent_by_the_loop, what="the later event sent by the relay loop")

        async def marked() -> bool:
            return bool(
                await pool.fetchval("SELECT count(*) = 0 FROM outbox WHERE sent_at IS NULL")
            )

        await eventually(marked, what="rows marked sent")
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    assert outbox.PUBLISHED.labels("model.rewarded")._value.get() - before == 21


async def test_a_rolled_back_transaction_publishes_nothing(
    pool: asyncpg.Pool, js: JetStreamContext
) -> None:
    relay = outbox.Relay(pool, js, "svc")
    with pytest.raises(RuntimeError):
        async with relay.transaction() as conn:
            await outbox.add(conn, rewards(3))
            raise RuntimeError("the state change failed")
    assert await stream_messages(js, "FEEDBACK") == []
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 0
