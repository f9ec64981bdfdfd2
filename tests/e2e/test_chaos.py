"""Nothing lost, nothing counted twice, under failure: while events flow, the stats service
is killed with SIGKILL and restarted, NATS is killed and restarted, PostgreSQL is killed and
restarted, and PostgreSQL then stays away for longer than the consumer's whole retry budget
(`CONSUMER_MAX_DELIVER` x `CONSUMER_ACK_WAIT_S`). The events are calls (subtask.completed,
priced from the catalog's model.synced or carrying their own cost), rewards and dismissals.
Afterwards every event is counted exactly once, every call is in the cost ledger once at its
exact cost, and nothing was dead-lettered."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.aio.client import Client as Nats

from contracts.catalog import DEAD_LETTER_STREAM
from contracts.events import Event, ModelDismissed, ModelRewarded, ModelSynced, SubtaskCompleted
from services.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.runtime.messaging import ensure_streams
from services.stack import spawn_service, wait_until_up

EVENTS = 3000
MODELS = [f"model-{i}" for i in range(7)]
PROMPT_PRICE, COMPLETION_PRICE = Decimal("1.5"), Decimal(4)  # USD per 1M tokens
PROMPT_TOKENS, COMPLETION_TOKENS = 120, 30
CATALOG_COST = (PROMPT_TOKENS * PROMPT_PRICE + COMPLETION_TOKENS * COMPLETION_PRICE) / 10**6
EVENT_COST = Decimal("0.0042")  # what a call that reports its own cost says
MAX_DELIVER, ACK_WAIT_S = 2, 1.0
LONG_OUTAGE_S = 3 * MAX_DELIVER * ACK_WAIT_S


class StatsProcess:
    def __init__(self, nats_url: str, database_url: str, log: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "NATS_URL": nats_url,
            "DATABASE_URL": database_url,
            "HTTP_PORT": str(self.port),
            "STATS_BATCH_SIZE": "100",
            "CONSUMER_MAX_DELIVER": str(MAX_DELIVER),
            "CONSUMER_ACK_WAIT_S": str(ACK_WAIT_S),
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = spawn_service("stats", self.env, self.log)
        # live is enough: what the test checks is the count, not readiness
        await wait_until_up(f"http://127.0.0.1:{self.port}", self.proc, path="/health/live")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, EmbeddedPostgres]]:
    nats_server = EmbeddedNats(tmp_path / "nats")
    pg = EmbeddedPostgres(tmp_path / "pg")
    nats_server.start()
    pg.start()
    try:
        yield nats_server, pg
    finally:
        pg.stop()
        nats_server.stop()


async def publish_until_stored(nc: Nats, event: Event) -> None:
    """A client that retries until JetStream confirms, reusing the event's id."""
    js = nc.jetstream()
    while True:
        try:
            await js.publish(
                event.subject,
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(event.event_id)},
                timeout=1,
            )
            return
        except Exception:
            await asyncio.sleep(0.1)


async def total_counted(database_url: str) -> tuple[int, int]:
    try:
        conn = await asyncpg.connect(database_url, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return -1, -1
    try:
        # each event adds exactly one: a response, a brain or a dismissal
        counted = await conn.fetchval(
            "SELECT coalesce(sum(response_count + total_brains + dismissal_count), 0)"
            " FROM stats.model_statistics"
        )
        inbox = await conn.fetchval("SELECT count(*) FROM stats.inbox")
        return int(counted), int(inbox)
    except asyncpg.PostgresError:
        return -1, -1
    finally:
        await conn.close()


async def prices_known(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n: int = await conn.fetchval("SELECT count(DISTINCT model_id) FROM stats.model_prices")
        return n
    except asyncpg.UndefinedTableError:  # stats has not migrated yet
        return 0
    finally:
        await conn.close()


async def test_every_event_is_applied_exactly_once_through_kills_and_restarts(
    cluster: tuple[EmbeddedNats, EmbeddedPostgres], tmp_path: Path
) -> None:
    nats_server, pg = cluster
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    await ensure_streams(nc.jetstream())
    stats = StatsProcess(nats_server.url, pg.url, tmp_path / "stats.log")
    await stats.start()

    # the catalog's prices, as sync publishes them, known to stats before the calls
    for model in MODELS:
        await publish_until_stored(
            nc,
            ModelSynced(
                provider="openrouter",
                model_id=model,
                name=model,
                change="added",
                status="active",
                prompt_price_per_1m=PROMPT_PRICE,
                completion_price_per_1m=COMPLETION_PRICE,
            ),
        )
    deadline = asyncio.get_running_loop().time() + 30
    while await prices_known(pg.url) < len(MODELS):
        assert asyncio.get_running_loop().time() < deadline, "stats never stored the prices"
        await asyncio.sleep(0.1)

    def mixed(i: int) -> Event:
        user, model = f"user-{i % 3}", MODELS[i % len(MODELS)]
        if i % 5 == 3:
            return ModelRewarded(user_id=user, session_id="chaos", model_id=model, brains=1)
        if i % 5 == 4:
            return ModelDismissed(user_id=user, session_id=f"chaos-{i}", model_id=model)
        return SubtaskCompleted(
            plan_id="p",
            subtask_id=f"s{i}",
            model_id=model,
            user_id=user,
            session_id="chaos",
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=COMPLETION_TOKENS,
            cost_usd=EVENT_COST if i % 5 == 2 else None,  # else priced from the catalog
        )

    events = [mixed(i) for i in range(EVENTS)]
    applied = EVENTS + len(MODELS)  # the inbox holds the catalog's prices too
    calls = [e for e in events if isinstance(e, SubtaskCompleted)]
    own_cost = [e for e in calls if e.cost_usd is not None]
    expected_cost = EVENT_COST * len(own_cost) + CATALOG_COST * (len(calls) - len(own_cost))

    published = 0

    async def publisher() -> None:
        nonlocal published
        for i, event in enumerate(events):
            await publish_until_stored(nc, event)
            published += 1
            if i % 50 == 0:
                await asyncio.sleep(0.1)  # keep the flow going across all the faults

    during: list[int] = []

    async def chaos() -> None:
        await asyncio.sleep(0.5)
        during.append(published)
        stats.kill()  # SIGKILL mid-batch
        await asyncio.sleep(0.3)
        await stats.start()
        await asyncio.sleep(0.5)
        during.append(published)
        nats_server.kill()
        await asyncio.sleep(0.5)
        nats_server.start()
        await asyncio.sleep(1.0)
        during.append(published)
        pg.kill()
        await asyncio.sleep(0.5)
        pg.start()
        await asyncio.sleep(0.5)
        stats.kill()
        during.append(published)
        await stats.start()
        await asyncio.sleep(0.5)
        during.append(published)
        pg.stop()
        await asyncio.sleep(LONG_OUTAGE_S)  # longer than the consumer's retry budget
        pg.start()

    try:
        await asyncio.gather(publisher(), chaos())
        # every fault struck while events were still being published
        assert all(0 < n < EVENTS for n in during), during
        deadline = asyncio.get_running_loop().time() + 60
        while (counted := await total_counted(pg.url)) != (EVENTS, applied):
            assert counted[0] <= EVENTS, f"counted {counted[0]} of {EVENTS}: a duplicate"
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"counted {counted} of {EVENTS}; log: {stats.log}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a late redelivery would show up now
        assert await total_counted(pg.url) == (EVENTS, applied)
        conn = await asyncpg.connect(pg.url)
        try:  # every call in the cost ledger once, at its exact cost
            ledger = await conn.fetch(
                "SELECT price_source, count(*) AS n, sum(cost_usd) AS cost FROM stats.llm_costs"
                " GROUP BY price_source ORDER BY price_source"
            )
        finally:
            await conn.close()
        assert [(r["price_source"], r["n"]) for r in ledger] == [
            ("catalog", len(calls) - len(own_cost)),
            ("event", len(own_cost)),
        ]
        assert sum(r["cost"] for r in ledger) == expected_cost
        dead = await nc.jetstream().stream_info(DEAD_LETTER_STREAM.name)
        assert dead.state.messages == 0, "a valid event was dead-lettered"
    finally:
        stats.stop()
        await nc.close()
