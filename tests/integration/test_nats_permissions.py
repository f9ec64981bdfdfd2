"""NATS users with the event catalog's permissions, on a server configured as `fleet up`
configures its own: a service or a client can use only what the catalog gives it, and a
service works under its permissions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import nats
import pytest
from nats.aio.client import Client as Nats
from nats.errors import NoRespondersError

from contracts.events import ModelSynced, SubtaskCompleted
from services.embedded import EmbeddedNats
from services.runtime.messaging import connect_nats, ensure_streams
from services.runtime.nats_users import FLEET_SERVICES, fleet_users, passwords, server_config
from services.stats.app import build as build_stats
from services.stats.config import StatsSettings
from tests.conftest import bearer, eventually, running


@dataclass
class Server:
    url: str
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("nats-users")
    users = fleet_users()
    secrets = passwords(home, users)
    assert (home / "secrets" / "nats-users.json").stat().st_mode & 0o777 == 0o600
    config = home / "nats.conf"
    config.write_text(server_config(users, secrets))
    embedded = EmbeddedNats(home / "nats", config=config)
    embedded.start()
    try:
        yield Server(embedded.url, secrets)
    finally:
        embedded.stop()


@asynccontextmanager
async def connected(server: Server, user: str) -> AsyncIterator[tuple[Nats, list[str]]]:
    """A connection as `user` and the errors the server sends it: a service connects as the
    chassis does (replies on its own inbox prefix), a client as any nats-py client does."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    if user in FLEET_SERVICES:
        nc = await connect_nats(server.url, user, user, server.passwords[user])
        nc._error_cb = on_error
    else:
        nc = await nats.connect(
            server.url, user=user, password=server.passwords[user], error_cb=on_error
        )
    try:
        yield nc, errors
    finally:
        await nc.close()


async def refused(nc: Nats, errors: list[str], what: str) -> bool:
    await nc.flush()

    async def seen() -> bool:
        return any(
            "permissions violation" in e.lower() and what.lower() in e.lower() for e in errors
        )

    await eventually(seen, timeout=5, what=f"a permissions violation for {what}: {errors}")
    return True


async def test_a_service_publishes_and_subscribes_only_what_the_catalog_gives_it(
    server: Server,
) -> None:
    async with connected(server, "admin") as (admin, _):
        await ensure_streams(admin.jetstream())
    async with connected(server, "stats") as (nc, errors):
        synced = ModelSynced(provider="p", model_id="m", name="m", change="added", status="active")
        await nc.publish(synced.subject, synced.model_dump_json().encode())  # sync's, not stats'
        assert await refused(nc, errors, '"model.synced"')
        await nc.subscribe("subtask.ready")  # planner's to agents
        assert await refused(nc, errors, '"subtask.ready"')
        await nc.subscribe("_INBOX.>")  # everyone else's replies
        assert await refused(nc, errors, '"_INBOX.>"')
        # it may ask JetStream about streams but not delete one or read others' consumers
        js = nc.jetstream()
        assert (await js.stream_info("PLANS")).config.name == "PLANS"
        with pytest.raises((TimeoutError, NoRespondersError)):  # no answer: it never got there
            await asyncio.wait_for(js.delete_stream("PLANS"), 2)
        assert await refused(nc, errors, "STREAM.DELETE")
    async with connected(server, "admin") as (admin, _):
        assert (await admin.jetstream().stream_info("PLANS")).config.name == "PLANS"


async def test_an_agent_reports_its_work_and_nothing_else(server: Server) -> None:
    async with connected(server, "agent") as (nc, errors):
        js = nc.jetstream()
        done = SubtaskCompleted(
            plan_id="p", subtask_id="s", model_id="m", user_id="u", session_id="s"
        )
        ack = await js.publish(done.subject, done.model_dump_json().encode())
        assert ack.stream == "PLANS"
        await nc.publish("service.down", b"{}")  # guardian's
        assert await refused(nc, errors, '"service.down"')


async def test_stats_consumes_under_its_own_permissions(server: Server, database_url: str) -> None:
    settings = StatsSettings(
        nats_url=server.url,
        nats_user="stats",
        nats_password=server.passwords["stats"],
        database_url=database_url,
    )
    async with running(build_stats(settings)) as (_, client):
        async with connected(server, "agent") as (agent, _):
            done = SubtaskCompleted(
                plan_id="p", subtask_id="s1", model_id="m", user_id="alice", session_id="s"
            )
            await agent.jetstream().publish(done.subject, done.model_dump_json().encode())

        async def counted() -> bool:
            r = await client.get("/v1/models/m/stats", headers=bearer("alice", "user"))
            return r.status_code == 200 and r.json()["response_count"] == 1

        await eventually(counted, what="the event counted by stats as user stats")
