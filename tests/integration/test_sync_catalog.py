"""sync's OpenRouter catalog against a local server speaking OpenRouter's wire format, real
PostgreSQL and real JetStream: what is stored, what is published, and what a failure leaves."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from services.runtime.service import Runtime
from services.sync.app import build
from services.sync.config import SyncSettings
from tests.conftest import SHARED_DATA, Infra, eventually, running

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openrouter"
OPENROUTER_DATA = SHARED_DATA / "openrouter"
needs_data = pytest.mark.skipif(
    not OPENROUTER_DATA.is_dir(),
    reason=f"an extra over the fixtures: real OpenRouter responses are not in {OPENROUTER_DATA}",
)

# --- a local HTTP server --------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering
    declared_length: int | None = None  # more than len(body): the connection is cut short
    trickle: float = 0.0  # seconds between 64-byte pieces of the body (each read is quick)


Route = Callable[[Request], Reply]
REASONS = {
    200: "OK",
    304: "Not Modified",
    401: "Unauthorized",
    404: "Not Found",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class FakeHttp:
    """A small HTTP/1.1 server on 127.0.0.1 (one request per connection) whose answers the
    test sets per path; it records every request it gets. It can be stopped and started
    again on the same port, as a device that goes down and comes back."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hits(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name:
                    headers[name.strip().lower()] = value.strip()
            request = Request(method, target.split("?")[0], headers)
            self.requests.append(request)
            route = self.routes.get(request.path)
            reply = route(request) if route else Reply(404, b'{"error":"not found"}')
            if reply.delay:
                await asyncio.sleep(reply.delay)
            length = reply.declared_length if reply.declared_length is not None else len(reply.body)
            lines = [f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Status')}"]
            lines += [f"{k}: {v}" for k, v in reply.headers.items()]
            if reply.status != 304:
                lines.append(f"Content-Length: {length}")
            lines.append("Connection: close")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            body = reply.body
            while reply.trickle and len(body) > 64:
                writer.write(body[:64])
                await writer.drain()
                body = body[64:]
                await asyncio.sleep(reply.trickle)
            writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)


class FakeOpenRouter(FakeHttp):
    """GET /api/v1/models: the catalog set by the test, with an ETag when given one (a
    matching If-None-Match gets 304), or whatever failure the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.catalog = b'{"data": []}'
        self.etag: str | None = None
        self.failure: Callable[[int], Reply | None] = lambda attempt: None
        self.routes["/api/v1/models"] = self._models

    def serve(self, catalog: bytes, etag: str | None = None) -> None:
        self.catalog, self.etag = catalog, etag
        self.failure = lambda attempt: None

    def _models(self, request: Request) -> Reply:
        failed = self.failure(len(self.hits("/api/v1/models")))
        if failed:
            return failed
        if self.etag and request.headers.get("if-none-match") == self.etag:
            return Reply(304, headers={"ETag": self.etag})
        headers = {"Content-Type": "application/json"}
        if self.etag:
            headers["ETag"] = self.etag
        return Reply(200, self.catalog, headers)


@asynccontextmanager
async def openrouter() -> AsyncIterator[FakeOpenRouter]:
    server = FakeOpenRouter()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --- helpers --------------------------------------------------------------------------------


def settings(infra: Infra, database_url: str, base_url: str, **overrides: Any) -> SyncSettings:
    values: dict[str, Any] = dict(
        nats_url=infra.nats_url,
        database_url=database_url,
        http_port=0,
        openrouter_base_url=base_url,
        openrouter_max_price_per_1m=Decimal(1_000_000),
        openrouter_top_n=10_000,
        openrouter_timeout_s=2.0,
        openrouter_retry_attempts=3,
        openrouter_retry_backoff_s=0.01,
        openrouter_retry_max_backoff_s=0.05,
        outbox_poll_interval_s=0.05,
    )
    return SyncSettings(**{**values, **overrides})


@asynccontextmanager
async def synced_service(
    infra: Infra, database_url: str, **overrides: Any
) -> AsyncIterator[tuple[FakeOpenRouter, Runtime, httpx.AsyncClient]]:
    """sync running against a fake OpenRouter of its own (serve a listing, then sync)."""
    async with (
        openrouter() as server,
        running(build(settings(infra, database_url, server.url, **overrides))) as (rt, client),
    ):
        yield server, rt, client


async def sync_once(client: httpx.AsyncClient) -> dict[str, Any]:
    """POST /v1/sync/run and wait for the run to end; returns the run."""
    r = await client.post("/v1/sync/run")
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    assert r.headers["location"] == f"/v1/sync/runs/{run_id}"
    run: dict[str, Any] = {}

    async def ended() -> bool:
        nonlocal run
        run = (await client.get(f"/v1/sync/runs/{run_id}")).json()
        return bool(run["status"] != "running")

    await eventually(ended, timeout=30, what=f"sync run {run_id} to end")
    return run


async def relayed(runtime: Runtime) -> None:
    async def nothing_unsent() -> bool:
        async with runtime.pool.acquire() as conn:
            return bool(
                await conn.fetchval("SELECT count(*) = 0 FROM outbox WHERE sent_at IS NULL")
            )

    await eventually(nothing_unsent, what="the outbox relayed")


class Catalog:
    """What sync published on the CATALOG stream, read back message by message."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.seen = 0

    async def new(self, runtime: Runtime, subject: str | None = None) -> list[dict[str, Any]]:
        """Messages published since the last call (all subjects, or one)."""
        await relayed(runtime)
        last = (await self.js.stream_info("CATALOG")).state.last_seq
        found = []
        for seq in range(self.seen + 1, last + 1):
            msg = await self.js.get_msg("CATALOG", seq)
            if subject is None or msg.subject == subject:
                found.append({"subject": msg.subject, **json.loads(msg.data or b"{}")})
        self.seen = last
        return found


async def snapshot(runtime: Runtime) -> list[tuple[Any, ...]]:
    """Every catalog row with its row version: equal snapshots mean nothing was written."""
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch("SELECT xmin::text AS v, * FROM models ORDER BY model_id")
        history = await conn.fetchval("SELECT count(*) FROM price_history")
    return [tuple(r.values()) for r in rows] + [("price_history", history)]


def entry(
    model_id: str, prompt: str, completion: str, context_length: int = 8192, **extra: Any
) -> dict[str, Any]:
    return {
        "id": model_id,
        "name": extra.pop("name", model_id),
        "created": extra.pop("created", 1_750_000_000),
        "context_length": context_length,
        "architecture": {"modality": "text->text", "output_modalities": ["text"]},
        "pricing": {"prompt": prompt, "completion": completion},
        "top_provider": {"context_length": context_length, "max_completion_tokens": None},
        **extra,
    }


SMALL = [
    entry("vendor/cheap", "0.0000001", "0.0000004", 32768),
    entry("vendor/mid", "0.000003", "0.000015", 200000),
    entry("vendor/pricey", "0.00003", "0.00006", 128000),
    entry("vendor/free:free", "0", "0", 131072),
    entry("openrouter/auto", "-1", "-1", 2000000),
]


def small(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"data": list(entries or SMALL)}).encode()


# --- the real responses -------------------------------------------------------------------


def listing(name: str) -> bytes:
    """A response by name: one of the project's fixtures ("catalog-a") or a real day."""
    if name.startswith("catalog-"):
        return (FIXTURES / f"{name}.json").read_bytes()
    return (OPENROUTER_DATA / f"{name}.json").read_bytes()


def fixed_price_entries(name: str) -> dict[str, tuple[Any, ...]]:
    """The test's own reading of a response: id → (name, context length, prompt and
    completion USD per 1M, tiers as (min prompt tokens, prompt, completion)) of the models
    kept by default: text output only, price known (routers' "-1" are left out)."""
    models = {}
    for e in json.loads(listing(name))["data"]:
        pricing = e["pricing"]
        prompt, completion = pricing["prompt"], pricing["completion"]
        if "-1" in (prompt, completion) or e["architecture"]["output_modalities"] != ["text"]:
            continue
        tiers = tuple(
            (
                o.get("min_prompt_tokens"),
                Decimal(o.get("prompt", prompt)) * 1_000_000,
                Decimal(o.get("completion", completion)) * 1_000_000,
            )
            for o in pricing.get("overrides", [])
        )
        models[e["id"]] = (
            e["name"],
            e["context_length"],
            Decimal(prompt) * 1_000_000,
            Decimal(completion) * 1_000_000,
            tiers,
        )
    return models


def expected_changes(
    before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]
) -> set[tuple[str, str]]:
    added = {(m, "added") for m in after.keys() - before.keys()}
    removed = {(m, "removed") for m in before.keys() - after.keys()}
    changed = {(m, "changed") for m in before.keys() & after.keys() if before[m] != after[m]}
    return added | removed | changed


def published_changes(events: list[dict[str, Any]]) -> set[tuple[str, str]]:
    found = [(e["model_id"], e["change"]) for e in events if e["subject"] == "model.synced"]
    assert len(found) == len(set(found)), "a model was published twice in one run"
    return set(found)


TWO_LISTINGS = [
    pytest.param("catalog-a", "catalog-b", id="fixtures"),
    pytest.param("2026-03-13", "2026-04-02", id="real-days", marks=needs_data),
]


@pytest.mark.parametrize(("first", "second"), TWO_LISTINGS)
async def test_two_listings_publish_exactly_what_changed_between_them(
    first: str, second: str, infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    march, april = fixed_price_entries(first), fixed_price_entries(second)
    expected = expected_changes(march, april)
    assert {c for _, c in expected} == {"added", "changed", "removed"}  # the data has all three
    fetched = [len(json.loads(listing(n))["data"]) for n in (first, second)]
    async with synced_service(infra, database_url) as (server, runtime, client):
        stream = Catalog(js)
        server.serve(listing(first))
        run = await sync_once(client)
        assert run["status"] == "succeeded", run
        assert (run["fetched"], run["selected"], run["added"]) == (
            fetched[0],
            len(march),
            len(march),
        )
        assert published_changes(await stream.new(runtime)) == {(m, "added") for m in march}

        server.serve(listing(second))
        run = await sync_once(client)
        events = await stream.new(runtime)
        assert published_changes(events) == expected
        counts = {c: sum(1 for _, k in expected if k == c) for c in ("added", "changed", "removed")}
        assert {c: run[c] for c in counts} == counts
        [completed] = [e for e in events if e["subject"] == "sync.completed"]
        assert completed["status"] == "succeeded" and completed["run_id"] == run["run_id"]
        assert (completed["fetched"], completed["selected"]) == (fetched[1], len(april))

        for e in events:  # what a consumer is told is the new state, exactly
            if e["subject"] == "model.synced" and e["change"] != "removed":
                name, ctx, prompt, completion, tiers = april[e["model_id"]]
                assert (e["name"], e["context_length"]) == (name, ctx)
                assert Decimal(e["prompt_price_per_1m"]) == prompt
                assert Decimal(e["completion_price_per_1m"]) == completion
                told_tiers = tuple(
                    (
                        t["min_prompt_tokens"],
                        Decimal(t["prompt_price_per_1m"]),
                        Decimal(t["completion_price_per_1m"]),
                    )
                    for t in e["price_tiers"]
                )
                assert told_tiers == tiers
                assert e["status"] == "active" and e["output_modalities"] == ["text"]

        repriced = next(m for m in march.keys() & april.keys() if march[m][2] != april[m][2])
        detail = (await client.get(f"/v1/models/{repriced}")).json()
        assert [Decimal(p["prompt_price_per_1m"]) for p in detail["price_history"]] == [
            march[repriced][2],
            april[repriced][2],
        ]
        gone = next(m for m, c in expected if c == "removed")
        assert (await client.get(f"/v1/models/{gone}")).json()["status"] == "removed"
        providers = (await client.get("/v1/providers")).json()
        assert providers == [
            {
                "provider": "openrouter",
                "count": len(april),
                "by_status": {"active": len(april), "removed": counts["removed"]},
            }
        ]


def highest(model: tuple[Any, ...]) -> tuple[Decimal, Decimal]:
    """(prompt, completion) at their highest over the base and every tier."""
    _, _, prompt, completion, tiers = model
    return max([prompt, *(t[1] for t in tiers)]), max([completion, *(t[2] for t in tiers)])


@pytest.mark.parametrize(
    ("first", "second", "cap", "top_n"),
    [
        pytest.param("catalog-a", "catalog-b", Decimal("0.15"), 5, id="fixtures"),
        pytest.param("2026-03-13", "2026-04-02", Decimal(10), 25, id="real-days", marks=needs_data),
    ],
)
async def test_a_small_top_n_publishes_what_entered_and_left_the_top(
    first: str,
    second: str,
    cap: Decimal,
    top_n: int,
    infra: Infra,
    database_url: str,
    js: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    def top(day: str) -> dict[str, tuple[Any, ...]]:
        models = fixed_price_entries(day)
        within = [m for m, v in models.items() if max(highest(v)) <= cap]
        # the documented rank: largest context, then cheapest (highest tier), then model id
        within.sort(key=lambda m: (-models[m][1], sum(highest(models[m])), m))
        return {m: models[m] for m in within[:top_n]}

    march, april = top(first), top(second)
    expected = expected_changes(march, april)
    assert expected, "the two days should differ in their top models"
    config = settings(
        infra,
        database_url,
        "",
        openrouter_max_price_per_1m=cap,
        openrouter_top_n=top_n,
        openrouter_rank_by="context_length",
    )
    async with openrouter() as server:
        config.openrouter_base_url = server.url
        async with running(build(config)) as (runtime, client):
            stream = Catalog(js)
            server.serve(listing(first))
            assert (await sync_once(client))["selected"] == top_n
            assert published_changes(await stream.new(runtime)) == {(m, "added") for m in march}
            server.serve(listing(second))
            run = await sync_once(client)
            assert published_changes(await stream.new(runtime)) == expected
            listed = (await client.get("/v1/models", params={"available": "true"})).json()
            assert {m["model_id"] for m in listed} == set(april)
    # the log says what the numbers are: N kept of M eligible, not N/N
    eligible = sum(1 for v in fixed_price_entries(second).values() if max(highest(v)) <= cap)
    assert eligible > top_n
    assert (
        f"kept the top {top_n} of {eligible} eligible models (OPENROUTER_TOP_N={top_n}): "
        f"{run['added']} added, {run['changed']} changed, {run['removed']} removed"
    ) in caplog.text


@needs_data
async def test_the_older_schema_loads(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    raw = listing("2025-07-29")
    expected = fixed_price_entries("2025-07-29")
    async with synced_service(infra, database_url) as (server, _, client):
        server.serve(raw)
        run = await sync_once(client)
        assert run["status"] == "succeeded" and run["skipped"] == 0
        assert run["selected"] == run["added"] == len(expected) == 151
        listed = {m["model_id"]: m for m in (await client.get("/v1/models")).json()}
        assert listed.keys() == expected.keys()
        for model_id, (_, ctx, prompt, completion, _) in expected.items():
            m = listed[model_id]
            assert m["context_length"] == ctx
            assert Decimal(m["prompt_price_per_1m"]) == prompt
            assert Decimal(m["completion_price_per_1m"]) == completion


# --- unchanged, not modified, failed ------------------------------------------------------


async def test_an_unchanged_catalog_writes_no_row_and_publishes_no_model(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with synced_service(infra, database_url) as (server, runtime, client):
        stream = Catalog(js)
        server.serve(small())  # no ETag: the body itself is compared
        first = await sync_once(client)
        assert (first["added"], first["selected"]) == (4, 4)  # the router model is left out
        assert len(await stream.new(runtime, "model.synced")) == 4
        before = await snapshot(runtime)
        second = await sync_once(client)
        assert second["status"] == "succeeded"
        assert (second["added"], second["changed"], second["removed"]) == (0, 0, 0)
        assert await snapshot(runtime) == before
        events = await stream.new(runtime)
        assert [(e["subject"], e["run_id"]) for e in events] == [
            ("sync.completed", second["run_id"])
        ]


async def test_a_not_modified_catalog_is_not_fetched_again(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with openrouter() as server:
        config = settings(infra, database_url, server.url)
        async with running(build(config)) as (runtime, client):
            stream = Catalog(js)
            server.serve(small(), etag='W/"v1"')
            await sync_once(client)
            await stream.new(runtime)
            before = await snapshot(runtime)
            run = await sync_once(client)
            assert server.hits("/api/v1/models")[-1].headers["if-none-match"] == 'W/"v1"'
            assert run["status"] == "not_modified"
            assert await snapshot(runtime) == before
            [event] = await stream.new(runtime)
            assert (event["subject"], event["status"]) == ("sync.completed", "not_modified")

            server.serve(small(*SMALL[:3]), etag='W/"v2"')  # the catalog changes
            run = await sync_once(client)
            assert (run["status"], run["removed"]) == ("succeeded", 1)
            assert server.hits("/api/v1/models")[-1].headers["if-none-match"] == 'W/"v1"'
            await sync_once(client)
            assert server.hits("/api/v1/models")[-1].headers["if-none-match"] == 'W/"v2"'

        # other rules make another catalog out of the same response: no conditional request
        fewer = settings(infra, database_url, server.url, openrouter_top_n=1)
        async with running(build(fewer)) as (runtime, client):
            run = await sync_once(client)
            assert "if-none-match" not in server.hits("/api/v1/models")[-1].headers
            assert (run["status"], run["selected"], run["removed"]) == ("succeeded", 1, 2)


HTML = b"<!DOCTYPE html><html><body>Cloudflare error 520</body></html>"
FAILURES: dict[str, tuple[Callable[[int], Reply | None], str]] = {
    "html error page": (lambda _: Reply(200, HTML, {"Content-Type": "text/html"}), "not JSON"),
    "truncated json": (lambda _: Reply(200, small()[:-30]), "not JSON"),
    "no data": (lambda _: Reply(200, b'{"error": {"code": 401}}'), "no `data`"),
    "empty data": (lambda _: Reply(200, b'{"data": []}'), "empty"),
    "5xx every time": (lambda _: Reply(503, b"upstream down"), "503"),
    "timeout": (lambda _: Reply(200, small(), delay=5), "no answer in time"),
    "connection cut": (
        lambda _: Reply(200, small()[:50], declared_length=5000),
        "RemoteProtocolError",
    ),
    "401": (lambda _: Reply(401, b'{"error": "bad key"}'), "401"),
}


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_failed_run_leaves_the_catalog_as_it_was(
    failure: str, infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    reply, message = FAILURES[failure]
    async with openrouter() as server:
        config = settings(infra, database_url, server.url, openrouter_timeout_s=0.3)
        async with running(build(config)) as (runtime, client):
            stream = Catalog(js)
            server.serve(small(*SMALL[:2]))
            await sync_once(client)
            await stream.new(runtime)
            before = await snapshot(runtime)
            listed = (await client.get("/v1/models")).json()

            attempts_before = len(server.hits("/api/v1/models"))
            server.catalog = small()
            server.failure = reply
            run = await sync_once(client)
            assert run["status"] == "failed"
            assert message in run["error"]
            assert await snapshot(runtime) == before
            assert (await client.get("/v1/models")).json() == listed
            [event] = await stream.new(runtime)
            assert (event["subject"], event["status"], event["error"]) == (
                "sync.completed",
                "failed",
                run["error"],
            )
            attempts = len(server.hits("/api/v1/models")) - attempts_before
            transient = failure in ("5xx every time", "timeout", "connection cut")
            assert attempts == (config.openrouter_retry_attempts if transient else 1)

            server.failure = lambda _: None  # the next good run applies normally
            assert (await sync_once(client))["added"] == 2  # the two the failed run left out


async def test_a_transient_5xx_is_retried_and_the_run_succeeds(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with synced_service(infra, database_url) as (server, _, client):
        server.serve(small())
        server.failure = lambda attempt: Reply(502) if attempt <= 2 else None
        run = await sync_once(client)
        assert (run["status"], run["added"]) == ("succeeded", 4)
        assert len(server.hits("/api/v1/models")) == 3


async def test_the_api_key_is_sent_and_never_logged(
    infra: Infra, database_url: str, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-or-v1-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    async with openrouter() as server:
        config = settings(infra, database_url, server.url, openrouter_api_key=secret)
        async with running(build(config)) as (_, client):
            server.serve(small())
            server.failure = lambda attempt: Reply(500) if attempt == 1 else None
            assert (await sync_once(client))["status"] == "succeeded"
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {secret}"}
    assert "fetched 5 models from OpenRouter" in caplog.text
    assert "kept the top 4 of 4 eligible models" in caplog.text
    assert secret not in caplog.text
    assert all(secret not in str(r.__dict__) for r in caplog.records)


async def test_runs_never_overlap(infra: Infra, database_url: str, js: JetStreamContext) -> None:
    async with synced_service(infra, database_url) as (server, _, client):
        server.serve(small())
        server.failure = lambda attempt: Reply(200, small(), delay=1.0)
        first = await client.post("/v1/sync/run")
        second = await client.post("/v1/sync/run")
        assert first.status_code == 202
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "sync_in_progress"
        assert second.headers["location"] == f"/v1/sync/runs/{first.json()['run_id']}"
        assert first.json()["run_id"] in second.json()["error"]["message"]
        server.failure = lambda attempt: None
        await eventually(
            lambda: _ended(client, first.json()["run_id"]), timeout=15, what="the first run"
        )
        assert (await sync_once(client))["status"] == "succeeded"
        assert len(server.hits("/api/v1/models")) == 2


async def _ended(client: httpx.AsyncClient, run_id: str) -> bool:
    return bool((await client.get(f"/v1/sync/runs/{run_id}")).json()["status"] != "running")


async def test_a_run_cut_off_by_a_dead_process_is_failed_by_the_next(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with synced_service(infra, database_url) as (server, runtime, client):
        stale = uuid.uuid4()
        async with runtime.pool.acquire() as conn:
            await conn.execute("INSERT INTO sync_runs (id, trigger) VALUES ($1, 'schedule')", stale)
        server.serve(small())
        assert (await sync_once(client))["status"] == "succeeded"
        old = (await client.get(f"/v1/sync/runs/{stale}")).json()
        assert old["status"] == "failed" and "interrupted" in old["error"]


async def test_runs_on_start_and_then_on_schedule(
    infra: Infra, database_url: str, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with openrouter() as server:
        server.serve(small())
        config = settings(
            infra,
            database_url,
            server.url,
            openrouter_sync_on_startup=True,
            openrouter_sync_interval=0.5 / 3600,  # half a second
        )
        async with running(build(config)) as (_, client):

            async def two_runs() -> bool:
                runs = (await client.get("/v1/sync/runs")).json()
                return len(runs) >= 2 and all(r["status"] != "running" for r in runs)

            await eventually(two_runs, timeout=15, what="a startup run and a scheduled one")
            runs = (await client.get("/v1/sync/runs")).json()
    assert [r["trigger"] for r in reversed(runs)][:2] == ["startup", "schedule"]
    assert [r["added"] for r in reversed(runs)][:2] == [4, 0]
    assert "running initial OpenRouter sync" in caplog.text
    assert "OpenRouter sync started (interval=" in caplog.text


# --- the HTTP API -------------------------------------------------------------------------


async def test_models_api_filters_and_refuses_bad_input(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    config = settings(
        infra,
        database_url,
        "",
        openrouter_max_price_per_1m=Decimal(40),
        openrouter_include_variable_price=True,
    )
    async with openrouter() as server:
        config.openrouter_base_url = server.url
        async with running(build(config)) as (_, client):
            server.serve(small())
            run = await sync_once(client)
            assert (run["fetched"], run["filtered"], run["selected"]) == (5, 4, 4)  # pricey > 40

            async def ids(**params: Any) -> list[str]:
                r = await client.get("/v1/models", params=params)
                assert r.status_code == 200, r.text
                return [m["model_id"] for m in r.json()]

            assert await ids() == [
                "openrouter/auto",
                "vendor/cheap",
                "vendor/free:free",
                "vendor/mid",
            ]
            assert await ids(max_price_per_1m="0.4") == ["vendor/cheap", "vendor/free:free"]
            assert await ids(max_price_per_1m="0") == ["vendor/free:free"]
            assert await ids(provider="ollama") == []
            assert await ids(available="false") == []

            auto = (await client.get("/v1/models/openrouter/auto")).json()
            assert auto["variable_price"] is True and auto["prompt_price_per_1m"] is None
            mid = (await client.get("/v1/models/vendor/mid")).json()
            assert (mid["prompt_price_per_1m"], mid["completion_price_per_1m"]) == ("3", "15")
            assert mid["raw"]["top_provider"]["max_completion_tokens"] is None
            assert mid["available"] is True and mid["device"] is None

            for path, params, status in [
                ("/v1/models", {"provider": "anthropic"}, 422),
                ("/v1/models", {"max_price_per_1m": "-1"}, 422),
                ("/v1/models", {"max_price_per_1m": "cheap"}, 422),
                ("/v1/models", {"available": "maybe"}, 422),
                ("/v1/models/vendor/nope", {}, 404),
                ("/v1/sync/runs/not-a-uuid", {}, 422),
                (f"/v1/sync/runs/{uuid.uuid4()}", {}, 404),
                ("/v1/sync/runs", {"limit": "0"}, 422),
            ]:
                r = await client.get(path, params=params)
                assert r.status_code == status, (path, params, r.text)
                assert r.json()["error"]["message"]

            metrics = (await client.get("/metrics")).text
            assert 'sync_runs_total{status="succeeded"}' in metrics
            assert 'sync_catalog_models{provider="openrouter",status="active"} 4.0' in metrics
            assert "sync_seconds_since_last_success" in metrics
            assert "sync_openrouter_fetch_seconds_count" in metrics


# --- what a model outputs, price tiers, how prices are written -----------------------------


async def test_prices_are_plain_decimal_strings_in_the_api_and_events(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with synced_service(infra, database_url) as (server, runtime, client):
        server.serve(listing("catalog-a"))
        await sync_once(client)
        events = {e["model_id"]: e for e in await Catalog(js).new(runtime, "model.synced")}
        listed = {m["model_id"]: m for m in (await client.get("/v1/models")).json()}
        for told in (events, listed):
            dear, cheap = told["harbor/dear-oracle"], told["harbor/nearly-free"]
            assert (dear["prompt_price_per_1m"], dear["completion_price_per_1m"]) == (
                "360000",
                "720000",
            )
            assert (cheap["prompt_price_per_1m"], cheap["completion_price_per_1m"]) == (
                "0.0000001",
                "0.0000002",
            )
            assert told["iris/long-context-pro"]["price_tiers"] == [
                {
                    "min_prompt_tokens": 200000,
                    "prompt_price_per_1m": "2.5",
                    "completion_price_per_1m": "15",
                }
            ]
        detail = (await client.get("/v1/models/harbor/dear-oracle")).json()
        assert detail["price_history"][0]["prompt_price_per_1m"] == "360000"
        for model in listed.values():  # no exponent anywhere a price is written
            prices = [model["prompt_price_per_1m"], model["completion_price_per_1m"]]
            prices += [p for t in model["price_tiers"] for p in t.values() if isinstance(p, str)]
            assert all(p is None or "E" not in p.upper() for p in prices), model


async def test_output_that_is_not_text_is_left_out_by_default(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    cheapest = dict(openrouter_rank_by="cheapest")  # and every model within the cap kept
    async with synced_service(infra, database_url, **cheapest) as (server, _, client):
        server.serve(listing("catalog-a"))
        await sync_once(client)
        listed = (await client.get("/v1/models")).json()
        assert {tuple(m["output_modalities"]) for m in listed} == {("text",)}
        free = {m["model_id"] for m in listed if m["prompt_price_per_1m"] == "0"}
        assert free == {"anvil/forge-mini:free", "bluebird/chirp-70b:free"}  # truly free only


async def test_output_kept_by_choice_carries_its_unit_prices_and_is_never_free(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    every = "text,image,video,embeddings,rerank,speech,transcription,audio"
    config = dict(
        openrouter_output_modalities=every,
        openrouter_rank_by="cheapest",
        openrouter_top_n=8,
        openrouter_max_price_per_1m=Decimal(0),
    )
    async with synced_service(infra, database_url, **config) as (server, runtime, client):
        server.serve(listing("catalog-a"))
        run = await sync_once(client)
        # a $0 cap: the two free text models, then models not priced per token, last by price
        listed = {m["model_id"]: m for m in (await client.get("/v1/models")).json()}
        assert run["selected"] == len(listed) == 8
        not_text = {k: m for k, m in listed.items() if m["output_modalities"] != ["text"]}
        assert len(not_text) == 6
        for m in not_text.values():
            assert m["prompt_price_per_1m"] is None and m["completion_price_per_1m"] is None
            assert m["unit_prices"] and m["variable_price"] is False
        events = {e["model_id"]: e for e in await Catalog(js).new(runtime, "model.synced")}
        assert events["pixel/canvas-gen"]["unit_prices"] == {
            "completion": "0",
            "image": "0.04",
            "prompt": "0",
        }
        assert events["pixel/canvas-gen"]["prompt_price_per_1m"] is None
        # a price filter cannot hold what has no per-token price: it is left out
        within = await client.get("/v1/models", params={"max_price_per_1m": "1000"})
        assert {m["model_id"] for m in within.json()} == {
            "anvil/forge-mini:free",
            "bluebird/chirp-70b:free",
        }


async def test_the_price_filter_holds_for_prompt_completion_and_every_tier(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with synced_service(infra, database_url) as (server, _, client):
        server.serve(listing("catalog-b"))
        await sync_once(client)
        stored = fixed_price_entries("catalog-b")
        for cap in ("0", "0.1", "0.15", "1", "2.5", "3", "1000000"):
            r = await client.get("/v1/models", params={"max_price_per_1m": cap})
            assert r.status_code == 200, r.text
            expected = {m for m, v in stored.items() if max(highest(v)) <= Decimal(cap)}
            assert {m["model_id"] for m in r.json()} == expected, cap
        within_one = {
            m["model_id"]
            for m in (await client.get("/v1/models", params={"max_price_per_1m": "1"})).json()
        }
        assert "cobalt/reasoner-lite" not in within_one  # prompt 0.8, completion 4
        assert "lark/prefill-heavy" not in within_one  # prompt 3, completion 0.5
        assert "iris/long-context-flash" not in within_one  # base 0.3/2.5
        assert "bluebird/chirp-7b" in within_one  # its tier is 0.1/0.2
        within_small = {
            m["model_id"]
            for m in (await client.get("/v1/models", params={"max_price_per_1m": "0.15"})).json()
        }
        assert "bluebird/chirp-7b" not in within_small  # base 0.05/0.1, its tier 0.1/0.2


async def test_a_catalog_that_trickles_in_fails_at_the_fetch_deadline(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with openrouter() as server:
        # each read comes well within the per-read timeout; the whole would take minutes
        config = settings(
            infra,
            database_url,
            server.url,
            openrouter_timeout_s=5.0,
            openrouter_fetch_deadline_s=1.0,
        )
        async with running(build(config)) as (runtime, client):
            server.serve(small(*SMALL[:2]))
            await sync_once(client)
            before = await snapshot(runtime)
            slow = listing("catalog-a")
            server.failure = lambda _: Reply(200, slow, trickle=0.2)
            run = await sync_once(client)
            assert run["status"] == "failed"
            assert "fetch deadline of 1s" in run["error"], run["error"]
            assert await snapshot(runtime) == before
            assert len(server.hits("/api/v1/models")) == 2  # the deadline is not retried
    # (the whole body would take over a minute: sync_once's 30 s wait holds the deadline)
    assert len(slow) / 64 * 0.2 > 60


# (httpx sends no URL over 64 KiB, so the longest values here are 60,000 characters)
BAD_INPUT = [
    ("/v1/models", {"provider": "anthropic"}),
    ("/v1/models", {"provider": "openrouter\x00"}),
    ("/v1/models", {"max_price_per_1m": "-1"}),
    ("/v1/models", {"max_price_per_1m": "cheap"}),
    ("/v1/models", {"max_price_per_1m": "NaN"}),
    ("/v1/models", {"max_price_per_1m": "nan"}),
    ("/v1/models", {"max_price_per_1m": "Infinity"}),
    ("/v1/models", {"max_price_per_1m": "1e999999"}),
    ("/v1/models", {"max_price_per_1m": "1e-999999"}),
    ("/v1/models", {"max_price_per_1m": "9" * 60_000}),
    ("/v1/models", {"max_price_per_1m": "1\x00"}),
    ("/v1/models", {"available": "maybe"}),
    ("/v1/models", {"available": "true\x00"}),
    ("/v1/models/vendor/a%00b", {}),  # a NUL, percent-encoded as a client sends it
    ("/v1/models/" + "m" * 60_000, {}),
    ("/v1/models/vendor/mid", {"device": "gpu\x00box"}),
    ("/v1/models/vendor/mid", {"device": "d" * 60_000}),
    ("/v1/sync/runs/not-a-uuid", {}),
    ("/v1/sync/runs/%00", {}),
    ("/v1/sync/runs", {"limit": "0"}),
    ("/v1/sync/runs", {"limit": "-5"}),
    ("/v1/sync/runs", {"limit": str(10**30)}),
    ("/v1/sync/runs", {"limit": "NaN"}),
    ("/v1/sync/runs", {"limit": "1\x00"}),
]


async def test_bad_input_is_a_clear_4xx_never_a_500(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with synced_service(infra, database_url) as (server, _, client):
        server.serve(small())
        await sync_once(client)
        for path, params in BAD_INPUT:
            r = await client.get(path, params=params)
            assert r.status_code == 422, (path[:80], {k: v[:80] for k, v in params.items()}, r.text)
            assert r.json()["error"]["code"] == "invalid_request"
        # the route takes no body: one with a NUL is refused (by the chassis) or ignored
        r = await client.post("/v1/sync/run", content=b'{"x": "\\u0000"}')
        assert r.status_code in (202, 409, 422), r.text
        # the catalog still answers
        assert (await client.get("/v1/models/vendor/mid")).status_code == 200
        unknown = await client.get("/v1/models/vendor/mid", params={"device": "laptop"})
        assert unknown.status_code == 404
