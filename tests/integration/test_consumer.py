"""Consumers against real JetStream and PostgreSQL: inbox dedupe, poison messages,
redelivery with backoff and the dead-letter subject."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from nats.js import JetStreamContext

from contracts.events import ModelRewarded, SubtaskCompleted
from services.runtime.config import RuntimeSettings
from services.runtime.consumer import Consumer, DeadLetter, Processor
from services.runtime.db import (
    RUNTIME_MIGRATIONS,
    Connection,
    Login,
    create_pool,
    load_migrations,
    migrate,
)
from services.runtime.service import ServiceSpec
from services.stats.app import build as build_stats
from services.stats.config import StatsSettings
from tests.conftest import Infra, bearer, eventually, running


def completed(**overrides: Any) -> SubtaskCompleted:
    fields: dict[str, Any] = dict(
        plan_id="p1",
        subtask_id=str(uuid.uuid4()),
        model_id="openai/gpt-4o",
        user_id="alice",
        session_id="s1",
        prompt_tokens=10,
        completion_tokens=5,
    )
    return SubtaskCompleted(**{**fields, **overrides})


async def publish(js: JetStreamContext, subject: str, data: bytes) -> None:
    await js.publish(subject, data)  # no Nats-Msg-Id: only the inbox can stop a duplicate


async def record(
    client: httpx.AsyncClient, model: str = "openai/gpt-4o", user: str = "alice"
) -> dict[str, Any] | None:
    r = await client.get(f"/v1/models/{model}/stats", headers=bearer(user, "user"))
    if r.status_code == 404:
        return None
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def stats_settings(infra: Infra, database_url: str) -> StatsSettings:
    return StatsSettings(nats_url=infra.nats_url, database_url=database_url, http_port=0)


async def test_a_redelivered_event_counts_once(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with running(build_stats(stats_settings(infra, database_url))) as (_, client):
        event = completed()
        for _ in range(3):
            await publish(js, event.subject, event.model_dump_json().encode())
        other = completed(prompt_tokens=1, completion_tokens=2)
        await publish(js, other.subject, other.model_dump_json().encode())

        async def both_applied() -> bool:
            rec = await record(client)
            return rec is not None and rec["prompt_tokens"] == 11

        await eventually(both_applied, what="two distinct events applied")
        rec = await record(client)
        assert rec is not None
        assert rec["response_count"] == 2
        assert (rec["prompt_tokens"], rec["completion_tokens"]) == (11, 7)
        assert [s["session_id"] for s in rec["sessions"]] == ["s1"]
        info = await js.consumer_info("PLANS", "stats-subtask-completed")
        assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_the_same_event_twice_in_one_batch_is_applied_once(
    database_url: str, js: JetStreamContext
) -> None:
    """Both copies arrive in one fetch, so the inbox (which holds only what earlier batches
    applied) cannot tell them apart: the batch itself must be deduplicated."""
    batches: list[list[uuid.UUID]] = []

    async def handle(conn: Connection, events: list[ModelRewarded]) -> None:
        batches.append([e.event_id for e in events])

    twice = ModelRewarded(user_id="u", session_id="s", model_id="twice")
    once = ModelRewarded(user_id="u", session_id="s", model_id="once")
    for event in (twice, once, twice):
        await publish(js, event.subject, event.model_dump_json().encode())
    pull = await js.pull_subscribe("model.rewarded", durable="svc-batch")
    msgs = await pull.fetch(3, timeout=5)
    assert len(msgs) == 3  # one batch: all three were stored before the fetch

    await migrate(database_url, "svc", load_migrations(RUNTIME_MIGRATIONS))  # its inbox
    pool = await create_pool(Login(database_url, "svc", "svc_app"), 1, "test")

    @asynccontextmanager
    async def transaction() -> AsyncIterator[Connection]:
        async with pool.acquire() as conn, conn.transaction():
            yield conn

    consumer = Consumer("svc-batch", ModelRewarded, handle, batch_size=3)
    try:
        await Processor(consumer, js, transaction, max_deliver=3, ack_wait_s=30).process(msgs)
        inbox = await pool.fetchval("SELECT count(*) FROM inbox WHERE consumer = 'svc-batch'")
    finally:
        await pool.close()
    assert batches == [[twice.event_id, once.event_id]]
    assert inbox == 2
    info = await js.consumer_info("FEEDBACK", "svc-batch")
    assert info.num_ack_pending == 0 and info.num_pending == 0  # every copy acknowledged


async def test_a_malformed_event_is_dead_lettered_and_the_consumer_goes_on(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    dead = await js.subscribe("deadletter.subtask.completed", ordered_consumer=True)
    async with running(build_stats(stats_settings(infra, database_url))) as (_, client):
        await publish(js, "subtask.completed", b"{not json")
        missing_user = completed().model_dump(mode="json")
        del missing_user["user_id"]
        await publish(js, "subtask.completed", json.dumps(missing_user).encode())
        good = completed()
        await publish(js, good.subject, good.model_dump_json().encode())

        first = await dead.next_msg(timeout=10)
        second = await dead.next_msg(timeout=10)
        assert first.data == b"{not json"
        assert first.headers is not None and second.headers is not None
        assert first.headers["Fleet-Dead-Reason"] == "invalid"
        assert "user_id" in second.headers["Fleet-Dead-Detail"]
        assert second.headers["Fleet-Original-Subject"] == "subtask.completed"

        async def good_counted() -> bool:
            rec = await record(client)
            return rec is not None and rec["response_count"] == 1

        await eventually(good_counted, what="the valid event after the poison ones")


async def test_a_message_that_keeps_failing_is_redelivered_then_dead_lettered(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    attempts: list[uuid.UUID] = []
    applied: list[str] = []

    async def handle(conn: Connection, events: list[ModelRewarded]) -> None:
        poison = [e for e in events if e.model_id == "poison"]
        if poison:
            attempts.append(poison[0].event_id)
            raise ValueError("cannot apply this one")
        applied.extend(e.model_id for e in events)

    spec = ServiceSpec(
        name="svc",
        settings=RuntimeSettings(
            nats_url=infra.nats_url, database_url=database_url, consumer_max_deliver=3
        ),
        consumers=[Consumer("svc-model-rewarded", ModelRewarded, handle, batch_size=10)],
    )
    dead = await js.subscribe("deadletter.model.rewarded", ordered_consumer=True)
    async with running(spec):
        for model in ("a", "poison", "b"):
            e = ModelRewarded(user_id="u", session_id="s", model_id=model)
            await js.publish(e.subject, e.model_dump_json().encode())
        msg = await dead.next_msg(timeout=15)
        assert msg.headers is not None
        assert msg.headers["Fleet-Dead-Reason"] == "max_deliver"
        assert msg.headers["Fleet-Delivered"] == "3"
        assert "cannot apply this one" in msg.headers["Fleet-Dead-Detail"]
    assert sorted(applied) == ["a", "b"]  # the poison one held back neither
    assert len(attempts) >= 3


async def test_a_handler_can_reject_a_message_outright(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async def handle(conn: Connection, events: list[ModelRewarded]) -> None:
        raise DeadLetter("unknown model")

    spec = ServiceSpec(
        name="svc",
        settings=RuntimeSettings(nats_url=infra.nats_url, database_url=database_url),
        consumers=[Consumer("svc-model-rewarded", ModelRewarded, handle)],
    )
    dead = await js.subscribe("deadletter.model.rewarded", ordered_consumer=True)
    async with running(spec):
        e = ModelRewarded(user_id="u", session_id="s", model_id="x")
        await js.publish(e.subject, e.model_dump_json().encode())
        msg = await dead.next_msg(timeout=10)
    assert msg.headers is not None
    assert msg.headers["Fleet-Dead-Reason"] == "rejected"
    assert msg.headers["Fleet-Delivered"] == "1"


async def test_a_slow_handler_keeps_its_message_from_being_redelivered(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    calls: list[uuid.UUID] = []

    async def handle(conn: Connection, events: list[ModelRewarded]) -> None:
        calls.extend(e.event_id for e in events)
        await asyncio.sleep(2.5)  # longer than the ack wait below

    spec = ServiceSpec(
        name="svc",
        settings=RuntimeSettings(
            nats_url=infra.nats_url, database_url=database_url, consumer_ack_wait_s=1.0
        ),
        consumers=[Consumer("svc-model-rewarded", ModelRewarded, handle)],
    )
    async with running(spec):
        e = ModelRewarded(user_id="u", session_id="s", model_id="x")
        await js.publish(e.subject, e.model_dump_json().encode())

        async def acked() -> bool:
            info = await js.consumer_info("FEEDBACK", "svc-model-rewarded")
            return bool(info.num_ack_pending == 0 and info.delivered.stream_seq == 1)

        await eventually(acked, timeout=10, what="the slow message acknowledged")
        info = await js.consumer_info("FEEDBACK", "svc-model-rewarded")
    assert calls == [e.event_id]
    assert info.num_redelivered == 0
