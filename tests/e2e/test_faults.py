"""Faults the delivery core survives, each injected on running services with servers of the
test's own: a poison message at the server's size limit, PubAcks lost with NATS, a
PostgreSQL outage longer than the retry budget, a durable consumer and a stream deleted by
an operator. After each, every valid event is applied exactly once and the service is ready
again without anyone's help."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from contracts import STREAMS
from contracts.catalog import DEAD_LETTER_STREAM
from contracts.events import ModelRewarded, SubtaskCompleted
from services.embedded import EmbeddedNats, EmbeddedPostgres
from services.runtime import outbox
from services.runtime.config import RuntimeSettings
from services.runtime.messaging import connect_nats, ensure_streams
from services.runtime.service import Runtime, ServiceSpec
from services.stats.app import build as build_stats
from services.stats.config import StatsSettings
from tests.conftest import eventually, running

CONSUMER = "stats-subtask-completed"


@dataclass
class Servers:
    nats: EmbeddedNats
    postgres: EmbeddedPostgres


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """NATS and PostgreSQL of this module's own: its tests stop, freeze and kill them."""
    base: Path = tmp_path_factory.mktemp("faults")
    found = Servers(EmbeddedNats(base / "nats"), EmbeddedPostgres(base / "postgres"))
    found.nats.start()
    found.postgres.start()
    try:
        yield found
    finally:
        found.postgres.stop()
        found.nats.stop()


@dataclass
class Env:
    servers: Servers
    nats_url: str
    database_url: str
    nc: Nats
    js: JetStreamContext


@pytest.fixture
async def env(servers: Servers) -> AsyncIterator[Env]:
    """Both servers up, a fresh database, every stream empty, and a client."""
    for server in (servers.nats, servers.postgres):
        if server.proc is None or server.proc.poll() is not None:
            server.start()
    name = f"faults_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(servers.postgres.url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    nc = await nats.connect(servers.nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    for spec in STREAMS:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(spec.name)
    await ensure_streams(js)
    database_url = servers.postgres.url.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield Env(servers, servers.nats.url, database_url, nc, js)
    finally:
        await nc.close()


def stats_spec(env: Env, **settings: object) -> ServiceSpec:
    return build_stats(
        StatsSettings(
            nats_url=env.nats_url,
            database_url=env.database_url,
            **settings,  # type: ignore[arg-type]
        )
    )


def completed(i: int) -> SubtaskCompleted:
    return SubtaskCompleted(
        plan_id="p",
        subtask_id=f"s{i}",
        model_id=f"model-{i % 3}",
        user_id="u",
        session_id="faults",
        prompt_tokens=1,
    )


async def publish(js: JetStreamContext, events: list[SubtaskCompleted]) -> None:
    for e in events:
        await js.publish(
            e.subject, e.model_dump_json().encode(), headers={"Nats-Msg-Id": str(e.event_id)}
        )


async def counted(database_url: str) -> tuple[int, int]:
    """(responses counted, events in the inbox) of stats; (-1, -1) while unreachable."""
    try:
        conn = await asyncpg.connect(database_url, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return -1, -1
    try:
        responses = await conn.fetchval(
            "SELECT coalesce(sum(response_count), 0) FROM stats.model_statistics"
        )
        applied = await conn.fetchval("SELECT count(*) FROM stats.inbox")
        return int(responses), int(applied)
    finally:
        await conn.close()


async def dead_letters(js: JetStreamContext) -> list[RawStreamMsg]:
    info = await js.stream_info(DEAD_LETTER_STREAM.name)
    return [
        await js.get_msg(DEAD_LETTER_STREAM.name, seq)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
        if info.state.messages
    ]


async def ready(runtime: Runtime) -> bool:
    return all(v == "ok" for v in (await runtime.readiness()).values())


async def test_garbage_at_the_size_limit_is_parked_and_the_events_behind_it_are_counted(
    env: Env,
) -> None:
    async with running(stats_spec(env, stats_batch_size=50)) as (stats, _):
        limit = env.nc.max_payload
        garbage = b"\x00not json " * (limit // 10)
        garbage = garbage[: limit - 100]  # as large as the server accepts with our headers
        await env.js.publish("subtask.completed", garbage)
        events = [completed(i) for i in range(20)]
        await publish(env.js, events)

        async def all_counted() -> bool:
            return await counted(env.database_url) == (20, 20)

        await eventually(all_counted, timeout=20, what="the 20 events behind the garbage")
        [parked] = await dead_letters(env.js)
        headers = parked.headers or {}
        assert headers["Fleet-Dead-Reason"] == "invalid"
        assert headers["Fleet-Consumer"] == CONSUMER
        assert headers["Fleet-Delivered"] == "1"  # parked on its first delivery
        assert f"body of {len(garbage)} bytes" in headers["Fleet-Dead-Truncated"]
        kept = parked.data or b""
        assert garbage.startswith(kept) and 0 < len(kept) < len(garbage)
        # the original stays in its stream, where the header says
        original = await env.js.get_msg("PLANS", int(headers["Fleet-Original-Sequence"]))
        assert original.data == garbage
        assert stats.nc.is_connected and await ready(stats)


async def test_a_server_error_reconnects_instead_of_closing_the_connection(env: Env) -> None:
    """nats-py closes a connection for good on any -ERR; ours reconnects and keeps its
    subscriptions."""
    nc = await connect_nats(env.nats_url, "faults")
    try:
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(msg: Msg) -> None:
            await received.put(msg.data)

        await nc.subscribe("faults.ping", cb=on_message)
        # headers push the message past the server's limit: "-ERR Maximum Payload Violation"
        await nc.publish("faults.big", b"x" * (nc.max_payload - 50), headers={"H": "v" * 200})

        async def delivered_again() -> bool:
            with contextlib.suppress(Exception):
                await env.nc.publish("faults.ping", b"still here")
                await env.nc.flush()
            return not received.empty()

        await eventually(delivered_again, timeout=15, what="the subscription to work again")
        assert not nc.is_closed
    finally:
        await nc.close()


async def test_events_whose_puback_was_lost_with_nats_are_published_again_once(
    env: Env,
) -> None:
    spec = ServiceSpec(
        name="faults",
        settings=RuntimeSettings(
            nats_url=env.nats_url, database_url=env.database_url, outbox_ack_timeout_s=1.0
        ),
    )
    server = env.servers.nats
    async with running(spec) as (runtime, _):
        event = ModelRewarded(model_id="m", user_id="u", session_id="s", brains=1)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # frozen: the PubAck will never come
        try:
            async with runtime.transaction() as conn:
                await outbox.add(conn, [event])
        finally:
            server.kill()  # works on a stopped process too
        server.start()  # same port and store: the stream is there, without the event

        async def published() -> bool:
            with contextlib.suppress(Exception):
                info = await env.js.stream_info("FEEDBACK")
                return bool(info.state.messages)
            return False

        await eventually(published, timeout=30, what="the event to reach JetStream")

        async def marked_sent() -> bool:
            async with runtime.pool.acquire() as conn:
                return bool(
                    await conn.fetchval(
                        "SELECT sent_at IS NOT NULL FROM outbox WHERE event_id = $1",
                        event.event_id,
                    )
                )

        await eventually(marked_sent, timeout=10, what="the outbox row to be marked sent")
        info = await env.js.stream_info("FEEDBACK")
        assert info.state.messages == 1
        stored = await env.js.get_msg("FEEDBACK", info.state.last_seq)
        assert ModelRewarded.from_wire(stored.data or b"").event_id == event.event_id
        await eventually(lambda: ready(runtime), timeout=10, what="readiness")


async def test_a_postgres_outage_longer_than_the_retry_budget_parks_nothing(env: Env) -> None:
    max_deliver, ack_wait = 2, 0.6
    spec = stats_spec(
        env, consumer_max_deliver=max_deliver, consumer_ack_wait_s=ack_wait, stats_batch_size=10
    )
    postgres = env.servers.postgres
    async with running(spec) as (stats, client):
        await publish(env.js, [completed(i) for i in range(10)])

        async def first_counted() -> bool:
            return await counted(env.database_url) == (10, 10)

        await eventually(first_counted, timeout=20, what="the first 10 events")
        postgres.stop()
        try:
            await publish(env.js, [completed(i) for i in range(10, 40)])
            subscription = stats.subscriptions[0]

            async def paused() -> bool:
                return subscription.problem is not None

            await eventually(paused, timeout=20, what="the consumer to pause")
            assert not await ready(stats)
            answer = await client.get("/v1/models/model-1/stats", params={"user_id": "u"})
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "unavailable"
            # the fault itself: an outage several times longer than max_deliver x ack_wait
            await asyncio.sleep(4 * max_deliver * ack_wait)
        finally:
            postgres.start()

        async def all_counted() -> bool:
            return await counted(env.database_url) == (40, 40)

        await eventually(all_counted, timeout=30, what="every event once")
        assert await dead_letters(env.js) == []
        await eventually(lambda: ready(stats), timeout=10, what="readiness")


async def test_a_deleted_durable_consumer_and_stream_are_declared_again(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.runtime")
    async with running(stats_spec(env)) as (stats, _):
        await publish(env.js, [completed(i) for i in range(5)])

        async def seen(n: int) -> bool:
            return await counted(env.database_url) == (n, n)

        await eventually(lambda: seen(5), timeout=20, what="5 events")

        await env.js.delete_consumer("PLANS", CONSUMER)  # an operator's `nats consumer rm`
        await publish(env.js, [completed(i) for i in range(5, 10)])
        await eventually(lambda: seen(10), timeout=20, what="10 events")

        await env.js.delete_stream("PLANS")  # a stream lost

        async def stream_back() -> bool:
            with contextlib.suppress(NotFoundError):
                info = await env.js.consumer_info("PLANS", CONSUMER)
                return info is not None
            return False

        await eventually(stream_back, timeout=20, what="the stream and consumer declared again")
        await publish(env.js, [completed(i) for i in range(10, 15)])
        await eventually(lambda: seen(15), timeout=20, what="15 events")
        await eventually(lambda: ready(stats), timeout=10, what="readiness")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 8, [r.getMessage() for r in warnings]


async def test_values_the_database_refuses_are_parked_at_once_and_the_rest_counted(
    env: Env,
) -> None:
    async with running(stats_spec(env, stats_batch_size=50)) as (stats, _):
        poisoned = completed(0).model_copy(update={"session_id": "nul\x00byte"})
        events = [poisoned, *(completed(i) for i in range(1, 11))]
        await publish(env.js, events)

        async def all_counted() -> bool:
            return await counted(env.database_url) == (10, 10)

        await eventually(all_counted, timeout=20, what="the 10 storable events")
        [parked] = await dead_letters(env.js)
        headers = parked.headers or {}
        assert headers["Fleet-Dead-Reason"] == "rejected"  # not retried: it never could be
        assert headers["Fleet-Delivered"] == "1"
        assert SubtaskCompleted.from_wire(parked.data or b"").event_id == poisoned.event_id
        assert await ready(stats)
