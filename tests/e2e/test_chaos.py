"""Nothing lost, nothing counted twice, under failure: while events flow, the stats service
is killed with SIGKILL and restarted, NATS is killed and restarted, PostgreSQL is killed and
restarted, and PostgreSQL then stays away for longer than the consumer's whole retry budget
(`CONSUMER_MAX_DELIVER` x `CONSUMER_ACK_WAIT_S`). Afterwards every event is counted exactly
once and nothing was dead-lettered."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.aio.client import Client as Nats

from contracts.catalog import DEAD_LETTER_STREAM
from contracts.events import Event, ModelDismissed, ModelRewarded, SubtaskCompleted
from services.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.runtime.messaging import ensure_streams
from services.stack import spawn_service, wait_until_up

EVENTS = 3000
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


async def test_every_event_is_applied_exactly_once_through_kills_and_restarts(
    cluster: tuple[EmbeddedNats, EmbeddedPostgres], tmp_path: Path
) -> None:
    nats_server, pg = cluster
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    await ensure_streams(nc.jetstream())
    stats = StatsProcess(nats_server.url, pg.url, tmp_path / "stats.log")
    await stats.start()

    def mixed(i: int) -> Event:
        user, model = f"user-{i % 3}", f"model-{i % 7}"
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
            prompt_tokens=1,
        )

    events = [mixed(i) for i in range(EVENTS)]
    calls = sum(isinstance(e, SubtaskCompleted) for e in events)

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
        while (counted := await total_counted(pg.url)) != (EVENTS, EVENTS):
            assert counted[0] <= EVENTS, f"counted {counted[0]} of {EVENTS}: a duplicate"
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"counted {counted} of {EVENTS}; log: {stats.log}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a late redelivery would show up now
        assert await total_counted(pg.url) == (EVENTS, EVENTS)
        conn = await asyncpg.connect(pg.url)
        try:  # every call in the cost ledger once
            assert await conn.fetchval("SELECT count(*) FROM stats.llm_costs") == calls
        finally:
            await conn.close()
        dead = await nc.jetstream().stream_info(DEAD_LETTER_STREAM.name)
        assert dead.state.messages == 0, "a valid event was dead-lettered"
    finally:
        stats.stop()
        await nc.close()
