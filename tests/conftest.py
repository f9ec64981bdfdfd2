"""Real NATS (JetStream) and real PostgreSQL for the whole suite.

When NATS_URL and DATABASE_URL are set, the tests use those servers; otherwise they start
the embedded ones (the same as `make up`) in a temporary folder for the session. Each test
that asks for `database_url` gets a fresh, empty database of its own, made while the test
before it ran and dropped in the background after it (creating and dropping a database
waits on the disk: most of a second on a busy machine); `js` gives a JetStream with every
stream emptied and declared anew.

A template migrated once and copied per test (`CREATE DATABASE ... TEMPLATE`) was measured
and left out: on this PostgreSQL a copy of the migrated template costs more than an empty
database plus the one service's migrations it saves (see the suite's notes in BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import nats
import pytest
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from contracts import STREAMS
from services.embedded import EmbeddedNats, EmbeddedPostgres
from services.runtime.auth import Role, mint
from services.runtime.messaging import ensure_streams
from services.runtime.service import (
    Runtime,
    ServiceSpec,
    create_app,
    start_runtime,
    stop_runtime,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Every service in the suite verifies tokens signed with this secret (services started as
# processes inherit it); `bearer()` mints them.
TEST_JWT_SECRET = "test-only-secret-" + "0123456789" * 4
os.environ["AUTH_JWT_SECRET"] = TEST_JWT_SECRET


def bearer(user: str = "tester", role: Role = "operator") -> dict[str, str]:
    """Headers of a request made by `user` with `role`."""
    return {"Authorization": f"Bearer {mint(TEST_JWT_SECRET, user, role)}"}


@dataclass
class Infra:
    nats_url: str
    database_url: str
    nats: EmbeddedNats | None
    postgres: EmbeddedPostgres | None


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    nats_url, database_url = os.environ.get("NATS_URL"), os.environ.get("DATABASE_URL")
    tmp = Path(tempfile.mkdtemp(prefix="fleet-test-"))
    embedded_nats = embedded_pg = None
    try:
        if not nats_url:
            embedded_nats = EmbeddedNats(tmp / "nats")
            embedded_nats.start()
            nats_url = embedded_nats.url
        if not database_url:
            embedded_pg = EmbeddedPostgres(tmp / "postgres")
            embedded_pg.start()
            database_url = embedded_pg.url
        yield Infra(nats_url, database_url, embedded_nats, embedded_pg)
    finally:
        if embedded_nats:
            embedded_nats.stop()
        if embedded_pg:
            embedded_pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    query = url.split("?", 1)[1] if "?" in url else ""
    return f"{base}/{name}" + (f"?{query}" if query else "")


async def _admin(admin_url: str, statement: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


class Databases:
    """Fresh databases for the tests: the next one is created while the current test runs,
    and each is dropped in the background once its test is over."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.ahead: asyncio.Task[str] | None = None
        self.dropping: set[asyncio.Task[None]] = set()
        self.left: list[str] = []  # not dropped yet: tried again at the end

    async def _create(self) -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        await _admin(self.admin_url, f'CREATE DATABASE "{name}"')
        return name

    async def take(self) -> str:
        ahead, self.ahead = self.ahead, None
        name = None
        if ahead is not None:
            with contextlib.suppress(Exception):  # PostgreSQL was down meanwhile
                name = await ahead
        if name is None:
            name = await self._create()
        self.ahead = asyncio.create_task(self._create())
        return name

    def give_back(self, name: str) -> None:
        task = asyncio.create_task(self._drop(name))
        self.dropping.add(task)
        task.add_done_callback(self.dropping.discard)

    async def _drop(self, name: str) -> None:
        try:
            await _admin(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception:
            self.left.append(name)

    async def close(self) -> None:
        if self.ahead is not None:
            with contextlib.suppress(Exception):
                self.left.append(await self.ahead)
        await asyncio.gather(*self.dropping)
        for name in self.left:
            with contextlib.suppress(Exception):
                await _admin(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def databases(infra: Infra) -> AsyncIterator[Databases]:
    found = Databases(infra.database_url)
    try:
        yield found
    finally:
        await found.close()


@pytest.fixture
async def database_url(infra: Infra, databases: Databases) -> AsyncIterator[str]:
    """A fresh, empty database for one test."""
    name = await databases.take()
    try:
        yield _with_database(infra.database_url, name)
    finally:
        databases.give_back(name)


@pytest.fixture
async def nc(infra: Infra) -> AsyncIterator[Nats]:
    client = await nats.connect(infra.nats_url)
    yield client
    await client.drain()


@pytest.fixture
async def js(nc: Nats) -> JetStreamContext:
    """JetStream with every catalog stream deleted and declared again: no test sees
    another's messages or durable consumers."""
    context = nc.jetstream()
    for spec in STREAMS:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await context.delete_stream(spec.name)
    await ensure_streams(context)
    return context


@asynccontextmanager
async def running(
    spec: ServiceSpec, user: str = "tester", role: Role = "operator"
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    """A service started in this process (its real lifespan) with an HTTP client to its app
    that sends a token of `user` with `role` (pass other `bearer()` headers per request)."""
    app = create_app(spec)
    runtime, tasks = await start_runtime(spec)
    app.state.runtime = runtime
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test",
            headers=bearer(user, role),
        ) as client:
            yield runtime, client
    finally:
        await stop_runtime(runtime, tasks)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `check` until it holds; fail with `what` after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
