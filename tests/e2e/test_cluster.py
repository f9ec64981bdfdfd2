"""Scaled out, under faults: `fleet up --replicas 3 --nats-cluster 3` (three nats-server
processes forming one JetStream cluster, streams on all three, PostgreSQL, three processes of
each service), driven the way clients drive it: stats events (priced calls, rewards,
dismissals), plans worked by an agent, benchmark jobs run against a fake model server. While
that load runs, one replica of each service is killed with SIGKILL, the NATS node leading
the streams is killed (and later started again) and PostgreSQL is killed and started again.

Afterwards: every stats sum and the cost ledger are exact, every plan completed once, every
benchmark job ended once, nothing was dead-lettered and no service's outbox holds anything
unsent."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import httpx
import nats
import pytest
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from contracts.catalog import DEAD_LETTER_STREAM
from contracts.events import (
    Event,
    ModelDismissed,
    ModelRewarded,
    ModelSynced,
    SubtaskCompleted,
)
from services.runtime.messaging import publish_until_acknowledged
from services.stack import SERVICES, Stack, service_of
from tests.conftest import bearer
from tests.fakes import FakeModelServer, Script

pytestmark = pytest.mark.timeout(900)

T = TypeVar("T")
USER = "cluster-user"
PRICED_MODELS = [f"vendor/priced-{i}" for i in range(4)]
PROMPT_PRICE, COMPLETION_PRICE = Decimal(2), Decimal(6)  # USD per 1M tokens
PROMPT_TOKENS, COMPLETION_TOKENS = 100, 50
CATALOG_COST = (PROMPT_TOKENS * PROMPT_PRICE + COMPLETION_TOKENS * COMPLETION_PRICE) / 10**6
AGENT_COST = Decimal("0.001")  # the agent's calls carry their cost
STATS_EVENTS, PLANS, JOBS = 800, 24, 12
LOAD_S = 30.0


class OwnedStack:
    """A `Stack` run by a thread of its own, as `fleet up` runs it: the processes it starts
    die with that thread, so starting anything again (a NATS node, PostgreSQL) goes through
    it too."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.stop = threading.Event()
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.thread = threading.Thread(target=self._run, name="fleet-up", daemon=True)
        loop = asyncio.get_running_loop()

        def tell(error: BaseException | None) -> None:
            if not self.started.done():
                if error is None:
                    self.started.set_result(None)
                else:
                    self.started.set_exception(error)

        self._loop, self._told = loop, tell

    def _tell(self, error: BaseException | None) -> None:
        self._loop.call_soon_threadsafe(self._told, error)

    def _run(self) -> None:
        try:
            self.stack.up()
        except BaseException as exc:
            self._tell(exc)
            self.stack.down()
            return
        self._tell(None)
        try:
            self.stack.wait(until=self.stop)
        finally:
            self.stack.down()

    async def call(self, action: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.stack.on_owner_thread(action))


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[OwnedStack, FakeModelServer]]:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    async with FakeModelServer(Script(ttft_s=0.02, gap_s=0.01)) as fake:
        env |= {
            "OLLAMA_BASE_URL": fake.url,
            "OPENROUTER_BASE_URL": fake.url,  # never the internet
            "LOG_LEVEL": "WARNING",
            "CONSUMER_ACK_WAIT_S": "5",  # what a killed replica held comes back in 5 s
            "BENCHMARK_LEASE_S": "4",
            "BENCHMARK_HEARTBEAT_S": "1",
        }
        lines: list[str] = []
        stack = Stack(
            tmp_path / "fleet",
            env=env,
            say=lines.append,
            replicas=3,
            nats_cluster=3,
            known_ports=False,  # another stack on this machine may take them meanwhile
        )
        owned = OwnedStack(stack)
        owned.thread.start()
        try:
            await owned.started
            yield owned, fake
        finally:
            owned.stop.set()
            await asyncio.to_thread(owned.thread.join, 120)
            if stack.postgres is not None:
                stack.postgres.remove()  # its cluster lives outside tmp_path as root


async def connect_admin(stack: Stack) -> Nats:
    """As the admin user, to every node: credentials as options, not in the URLs, so they
    also hold for the servers the cluster tells the client about."""
    state = json.loads(stack.state_file.read_text())
    urls = [urlsplit(url) for url in str(state["nats_url"]).split(",")]
    return await nats.connect(
        [f"nats://{url.hostname}:{url.port}" for url in urls],
        user=urls[0].username,
        password=urls[0].password,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )


async def retrying(attempt: Callable[[], Awaitable[T]], give_up_s: float = 120) -> T:
    """A client's retry: the same request again while the server it reached is away."""
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            return await attempt()
        except (httpx.TransportError, OSError, asyncpg.PostgresError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Load:
    """What the clients send and what they expect back."""

    def __init__(self, stack: Stack, fake: FakeModelServer) -> None:
        self.stack = stack
        self.fake = fake
        self.urls = {
            name: [url for i, url in stack.urls.items() if service_of(i) == name]
            for name in SERVICES
        }
        self.rng = random.Random(17)
        self.expected_counts = 0  # responses + brains + dismissals
        self.expected_catalog_calls = 0
        self.agent_completions: set[uuid.UUID] = set()
        self.plans: list[str] = []
        self.jobs: list[str] = []
        self.published = 0

    def url(self, service: str) -> str:
        return self.rng.choice(self.urls[service])

    async def read(self, client: httpx.AsyncClient, service: str, path: str) -> dict[str, Any]:
        """GET from any replica that answers."""

        async def get() -> dict[str, Any]:
            r = await client.get(self.url(service) + path)
            if r.status_code >= 500:
                raise httpx.TransportError(f"HTTP {r.status_code}")
            found: dict[str, Any] = r.json()
            return found

        return await retrying(get)

    def stats_event(self, i: int) -> Event:
        user, model = USER, PRICED_MODELS[i % len(PRICED_MODELS)]
        if i % 5 == 3:
            return ModelRewarded(user_id=user, session_id="cluster", model_id=model, brains=1)
        if i % 5 == 4:
            return ModelDismissed(user_id=user, session_id=f"cluster-{i}", model_id=model)
        self.expected_catalog_calls += 1
        return SubtaskCompleted(
            plan_id="outside",
            subtask_id=f"call-{i}",
            model_id=model,
            user_id=user,
            session_id="cluster",
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=COMPLETION_TOKENS,
        )

    async def stats_events(self, js: JetStreamContext, clients: int = 4) -> None:
        """STATS_EVENTS spread evenly over LOAD_S by a few clients publishing at once."""
        events = [self.stats_event(i) for i in range(STATS_EVENTS)]
        started = time.monotonic()

        async def client(mine: list[tuple[int, Event]]) -> None:
            for i, event in mine:
                due = started + i * LOAD_S / STATS_EVENTS
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await publish_until_acknowledged(
                    js,
                    event.subject,
                    event.model_dump_json().encode(),
                    {"Nats-Msg-Id": str(event.event_id)},
                )
                self.expected_counts += 1
                self.published += 1

        numbered = list(enumerate(events))
        await asyncio.gather(*(client(numbered[c::clients]) for c in range(clients)))

    async def plan(self, client: httpx.AsyncClient, n: int) -> None:
        task = f"cluster-task-{n}"
        body = {
            "task_id": task,
            "plan_id": task,
            "user_id": USER,
            "session_id": "cluster-plans",
            "original_task": "three steps in a row",
            "subtasks": [
                {
                    "subtask_id": f"s{k}",
                    "description": f"step {k}",
                    "agent": PRICED_MODELS[k],
                    "estimated_time": "1s",
                    "depends_on": [f"s{k - 1}"] if k else [],
                }
                for k in range(3)
            ],
        }

        async def post() -> None:
            r = await client.post(f"{self.url('planner')}/v1/plans", json=body)
            if r.status_code >= 500:
                raise httpx.TransportError(f"HTTP {r.status_code}")
            assert r.status_code in (200, 201), r.text

        await retrying(post)
        self.plans.append(task)

    async def plans_and_jobs(self) -> None:
        async with httpx.AsyncClient(headers=bearer(USER, "operator"), timeout=10) as client:
            for n in range(max(PLANS, JOBS)):
                if n < PLANS:
                    await self.plan(client, n)
                if n < JOBS:
                    await self.job(client)
                await asyncio.sleep(LOAD_S / max(PLANS, JOBS))

    async def job(self, client: httpx.AsyncClient) -> None:
        body = {
            "provider": "ollama",
            "model": "llama3.1:8b",
            "task_type": "generate",
            "prompt": "Why is the sky blue?",
            "runs": 2,
        }
        # tried again on another replica when this one is away or dies answering (a job
        # it made before dying is not among those checked: its id never came back)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = await client.post(f"{self.url('benchmark')}/v1/benchmarks/run", json=body)
            except httpx.TransportError:
                await asyncio.sleep(0.3)
                continue
            if r.status_code == 202:
                self.jobs.append(r.json()["job_id"])
                return
            assert r.status_code == 503, r.text  # PostgreSQL away: nothing was made
            await asyncio.sleep(0.3)
        raise AssertionError("no benchmark replica took a job in 120 s")

    async def agent(self, nc: Nats) -> None:
        """Works every subtask.ready of the plans: one durable consumer, answered with
        subtask.completed (its id derived from the attempt, so a redelivery resends it)."""
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            "subtask.ready",
            durable="cluster-agent",
            config=ConsumerConfig(ack_wait=5, max_ack_pending=1000),
        )
        while not nc.is_closed:
            try:
                msgs = await sub.fetch(50, timeout=1)
            except TimeoutError:
                continue
            except nats.errors.Error:
                await asyncio.sleep(0.2)  # reconnecting
                continue
            for msg in msgs:
                ready = json.loads(msg.data)
                if not str(ready["plan_id"]).startswith("cluster-task-"):
                    await msg.ack()
                    continue
                key = f"{ready['plan_id']}/{ready['subtask_id']}/{ready['attempt']}"
                event = SubtaskCompleted(
                    event_id=uuid.uuid5(uuid.NAMESPACE_URL, key),
                    plan_id=ready["plan_id"],
                    subtask_id=ready["subtask_id"],
                    model_id=ready["agent"],
                    user_id=ready["user_id"],
                    session_id=ready["session_id"],
                    agent=ready["agent"],
                    attempt=ready["attempt"],
                    prompt_tokens=PROMPT_TOKENS,
                    completion_tokens=COMPLETION_TOKENS,
                    cost_usd=AGENT_COST,
                )
                await publish_until_acknowledged(
                    js,
                    event.subject,
                    event.model_dump_json().encode(),
                    {"Nats-Msg-Id": str(event.event_id)},
                )
                self.agent_completions.add(event.event_id)
                # not acknowledged: redelivered, its same id published again and dropped
                with contextlib.suppress(nats.errors.Error):
                    await msg.ack()


async def stream_records(js: JetStreamContext, subject: str) -> list[dict[str, Any]]:
    """Every message stored on `subject`, decoded."""
    found: list[dict[str, Any]] = []
    sub = await js.subscribe(subject, ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            found.append(json.loads(msg.data))
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return found


async def stream_leader(js: JetStreamContext) -> str:
    """The server leading most of the streams."""
    leaders: collections.Counter[str] = collections.Counter()
    for info in await js.streams_info():
        if info.cluster and info.cluster.leader:
            leaders[info.cluster.leader] += 1
    return leaders.most_common(1)[0][0]


async def sums(database_url: str) -> tuple[int, int, Decimal, int, int]:
    """(responses + brains + dismissals, calls priced from the catalog, their cost, the
    agent's calls, unsent outbox rows across the services)."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        counted = await conn.fetchval(
            "SELECT coalesce(sum(response_count + total_brains + dismissal_count), 0)"
            " FROM stats.model_statistics"
        )
        catalog = await conn.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(cost_usd), 0) AS cost FROM stats.llm_costs"
            " WHERE price_source = 'catalog'"
        )
        agent = await conn.fetchval(
            "SELECT count(*) FROM stats.llm_costs WHERE price_source = 'event' AND cost_usd = $1",
            AGENT_COST,
        )
        unsent = 0
        for schema in SERVICES:
            unsent += await conn.fetchval(
                f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL"
            )
        assert catalog is not None
        return int(counted), int(catalog["n"]), Decimal(catalog["cost"]), int(agent), unsent
    finally:
        await conn.close()


async def test_three_replicas_on_a_three_node_cluster_count_exactly_through_faults(
    fleet: tuple[OwnedStack, FakeModelServer],
) -> None:
    owned, fake = fleet
    stack = owned.stack
    assert stack.nats is not None and stack.postgres is not None
    nc = await connect_admin(stack)
    js = nc.jetstream()
    database_url = stack.postgres.url
    load = Load(stack, fake)
    agent: asyncio.Task[None] | None = None
    try:
        for info in await js.streams_info():
            assert info.config.num_replicas == 3, info.config.name
        # the catalog's prices first, as sync would publish them, and seen by stats
        for model in PRICED_MODELS:
            synced = ModelSynced(
                provider="openrouter",
                model_id=model,
                name=model,
                change="added",
                status="active",
                prompt_price_per_1m=PROMPT_PRICE,
                completion_price_per_1m=COMPLETION_PRICE,
            )
            headers = {"Nats-Msg-Id": str(synced.event_id)}
            await publish_until_acknowledged(
                js, synced.subject, synced.model_dump_json().encode(), headers
            )

        async def prices_known() -> bool:
            conn = await asyncpg.connect(database_url)
            try:
                n = await conn.fetchval(
                    "SELECT count(DISTINCT model_id) FROM stats.model_prices"
                    " WHERE model_id = ANY($1::text[])",
                    PRICED_MODELS,
                )
            finally:
                await conn.close()
            return bool(n == len(PRICED_MODELS))

        deadline = time.monotonic() + 60
        while not await prices_known():
            assert time.monotonic() < deadline, "stats never stored the catalog's prices"
            await asyncio.sleep(0.2)

        agent = asyncio.create_task(load.agent(nc))
        faults_at: list[int] = []
        t0 = time.monotonic()

        def note(what: str) -> None:  # shown with the test's output when it fails
            print(f"{time.monotonic() - t0:6.1f}s {what}; {load.published} published", flush=True)

        async def faults() -> None:
            await asyncio.sleep(3)
            faults_at.append(load.published)
            for name in SERVICES:  # one replica of each service, SIGKILL
                stack.procs[f"{name}-2"].kill()
            note("killed one replica of each service")
            await asyncio.sleep(6)
            faults_at.append(load.published)
            leader = stack.nats.node_named(await stream_leader(js))  # type: ignore[union-attr]
            leader.kill()
            note(f"killed {leader.server_name}, the node leading most streams")
            await asyncio.sleep(6)
            await owned.call(leader.start)
            note(f"{leader.server_name} started again")
            await asyncio.sleep(4)
            faults_at.append(load.published)
            pg = stack.postgres
            assert pg is not None
            pg.kill()
            note("killed PostgreSQL")
            await asyncio.sleep(1)
            await owned.call(pg.start)
            note("PostgreSQL started again")

        await asyncio.gather(load.stats_events(js), load.plans_and_jobs(), faults())
        note("load sent")
        assert all(0 < n < STATS_EVENTS for n in faults_at), faults_at

        expected_catalog_cost = CATALOG_COST * load.expected_catalog_calls
        deadline = time.monotonic() + 180
        async with httpx.AsyncClient(headers=bearer(USER, "operator"), timeout=5) as client:
            while True:
                counted = await retrying(lambda: sums(database_url))
                plans = [await load.read(client, "planner", f"/v1/plans/{p}") for p in load.plans]
                jobs = [
                    await load.read(client, "benchmark", f"/v1/benchmarks/{j}") for j in load.jobs
                ]
                expected = (
                    load.expected_counts + len(load.agent_completions),
                    load.expected_catalog_calls,
                    expected_catalog_cost,
                    len(load.agent_completions),
                    0,
                )
                done = (
                    counted == expected
                    and all(p.get("status") == "completed" for p in plans)
                    and all(j.get("status") in ("completed", "failed") for j in jobs)
                )
                if done:
                    break
                assert counted[0] <= expected[0], f"counted twice: {counted} > {expected}"
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"not converged: sums {counted} expected {expected};"
                        f" plans {collections.Counter(p.get('status') for p in plans)};"
                        f" jobs {collections.Counter(j.get('status') for j in jobs)};"
                        f" logs in {stack.home / 'logs'}"
                    )
                await asyncio.sleep(1)
        note("converged")
        await asyncio.sleep(2)  # a late redelivery would be counted now
        assert await sums(database_url) == expected
        assert len(load.plans) == PLANS and len(load.jobs) == JOBS
        assert all(j["status"] == "completed" for j in jobs), jobs

        completed = collections.Counter(
            r["plan_id"] for r in await stream_records(js, "plan.completed")
        )
        assert all(completed[p] == 1 for p in load.plans), completed
        ended_events = await stream_records(js, "benchmark.completed")
        ended_events += await stream_records(js, "benchmark.failed")
        ended = collections.Counter(r["job_id"] for r in ended_events)
        assert all(ended[j] == 1 for j in load.jobs), ended
        dead = await js.stream_info(DEAD_LETTER_STREAM.name)
        assert dead.state.messages == 0, "a valid event was dead-lettered"
    finally:
        if agent is not None:
            agent.cancel()
        await nc.close()
