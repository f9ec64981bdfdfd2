"""Bad input is a clear 4xx in one shape, failures are 500/503 without internal detail:
planner and stats on real NATS and PostgreSQL, and the chassis's mapping of exceptions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import nats.errors
import pytest
from fastapi import APIRouter

from services.runtime.config import RuntimeSettings
from services.runtime.errors import VALUE_PREFIX_CHARS
from services.runtime.service import ServiceSpec, create_app
from services.stats.app import build as build_stats
from services.stats.config import StatsSettings
from tests.conftest import Infra, bearer, running
from tests.integration.test_planner_flow import plan_body, planner, subtask


def error_of(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The error object of a refusal, after checking its status, code and shape."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "fields"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def raw_plan(text: str) -> dict[str, Any]:
    """A plan body given as JSON text, for what `json=` cannot send (NaN, NUL, …)."""
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


# --- planner: fields, limits, values PostgreSQL cannot take ---------------------------------


async def test_out_of_range_integers_name_the_field_and_the_boundary_is_accepted(
    infra: Infra, database_url: str
) -> None:
    async with planner(infra, database_url) as client:
        r = await client.post("/v1/plans", json=plan_body(subtask("a", sequence_number=2**31)))
        (field,) = error_of(r, 422, "invalid_request")["fields"]
        assert field["loc"] == ["body", "subtasks", 0, "sequence_number"]
        assert field["value_prefix"] == "2147483648"
        r = await client.post(
            "/v1/plans", json=plan_body(subtask("a", sequence_number=-(2**31) - 1))
        )
        error_of(r, 422, "invalid_request")
        for edge in (2**31 - 1, -(2**31)):
            r = await client.post("/v1/plans", json=plan_body(subtask("a", sequence_number=edge)))
            assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("field", "raw", "loc"),
    [
        ("timeout_s", "NaN", ["body", "subtasks", 0, "timeout_s"]),
        ("timeout_s", "-Infinity", ["body", "subtasks", 0, "timeout_s"]),
        ("timeout_s", "1e999999", ["body", "subtasks", 0, "timeout_s"]),
        ("description", '"a\\u0000b"', ["body", "subtasks", 0, "description"]),
        ("agent", '"x\\u0000"', ["body", "subtasks", 0, "agent"]),
    ],
)
async def test_nul_bytes_and_non_finite_numbers_in_a_body_are_422(
    infra: Infra, database_url: str, field: str, raw: str, loc: list[Any]
) -> None:
    async with planner(infra, database_url) as client:
        body = json.dumps(plan_body(subtask("a", **{field: "PLACEHOLDER"})))
        r = await client.post("/v1/plans", **raw_plan(body.replace('"PLACEHOLDER"', raw)))
        (refused,) = error_of(r, 422, "invalid_request")["fields"]
        assert refused["loc"] == loc
        assert (await client.get("/v1/plans")).json() == []


async def test_free_form_metadata_has_a_depth_and_a_size_limit(
    infra: Infra, database_url: str
) -> None:
    async with planner(infra, database_url) as client:
        for too_much in (nested(17), {"blob": "x" * 70_000}, nested(400)):
            r = await client.post("/v1/plans", json=plan_body(subtask("a"), metadata=too_much))
            (field,) = error_of(r, 422, "invalid_request")["fields"]
            assert field["loc"][:2] == ["body", "metadata"]
        bad_key = json.dumps(plan_body(subtask("a"), metadata={"ok": 1})).replace(
            '"ok"', '"o\\u0000k"'
        )
        error_of(await client.post("/v1/plans", **raw_plan(bad_key)), 422, "invalid_request")
        assert (await client.get("/v1/plans")).json() == []
        fits = {"deep": nested(15), "blob": "y" * 60_000}
        r = await client.post("/v1/plans", json=plan_body(subtask("a"), metadata=fits))
        assert r.status_code == 201, r.text[:300]
        assert r.json()["metadata"] == fits


async def test_huge_requests_get_small_answers(infra: Infra, database_url: str) -> None:
    async with planner(infra, database_url) as client:
        r = await client.post("/v1/plans", json=plan_body(subtask("a", agent="m" * 10_000_000)))
        error_of(r, 413, "too_large")
        assert len(r.content) < 500
        # within the body limit but far past the field's: the answer shows a prefix only
        r = await client.post("/v1/plans", json=plan_body(subtask("a", agent="m" * 900_000)))
        (field,) = error_of(r, 422, "invalid_request")["fields"]
        assert field["loc"] == ["body", "subtasks", 0, "agent"]
        assert field["value_prefix"] == "m" * VALUE_PREFIX_CHARS
        assert len(r.content) < 1000
        many = [subtask(f"s{i}", agent="") for i in range(5000)]
        r = await client.post("/v1/plans", json=plan_body(*many))
        error = error_of(r, 422, "invalid_request")
        assert 0 < len(error["fields"]) <= 20 and "more" in error["message"]
        assert len(r.content) < 10_000
        deep = "[" * 100_000 + "]" * 100_000  # deeper than Python's json can recurse
        error_of(await client.post("/v1/plans", **raw_plan(deep)), 422, "invalid_request")
        error_of(await client.post("/v1/plans", **raw_plan("{not json")), 422, "invalid_request")


async def test_nul_bytes_in_the_path_or_query_are_422(infra: Infra, database_url: str) -> None:
    async with planner(infra, database_url) as client:
        r = await client.get("/v1/plans/a%00b")
        assert error_of(r, 422, "invalid_request")["fields"][0]["loc"] == ["path"]
        r = await client.get("/v1/plans", params={"user_id": "a\x00b"})
        (field,) = error_of(r, 422, "invalid_request")["fields"]
        assert (field["loc"], field["value_prefix"]) == (["query", "user_id"], "a\x00b")
        r = await client.get("/v1/plans", params={"user_id": "u" * 513})
        error_of(r, 422, "invalid_request")


async def test_refusals_of_the_planner_share_the_shape(infra: Infra, database_url: str) -> None:
    async with planner(infra, database_url) as client:
        r = await client.post(
            "/v1/plans", json=plan_body(subtask("a"), subtask("b", "ghost"), subtask("c", "c"))
        )
        error = error_of(r, 422, "invalid_plan")
        assert "subtask b depends on unknown ghost" in error["message"]
        assert [(f["loc"], f["value_prefix"]) for f in error["fields"]] == [
            (["body", "subtasks", 1, "subtask_id"], "b"),
            (["body", "subtasks", 2, "subtask_id"], "c"),
        ]
        error = error_of(await client.get("/v1/plans/nope"), 404, "not_found")
        assert error == {"code": "not_found", "message": "no plan nope", "fields": []}
        body = plan_body(subtask("a"))
        assert (await client.post("/v1/plans", json=body)).status_code == 201
        other = {**body, "subtasks": [subtask("z")]}
        error_of(await client.post("/v1/plans", json=other), 409, "conflict")
        r = await client.post("/v1/plans", json={"task_id": "t"})
        fields = error_of(r, 422, "invalid_request")["fields"]
        assert ["body", "user_id"] in [f["loc"] for f in fields]
        assert all(f["value_prefix"] is None for f in fields)  # missing: nothing to show
        error_of(await client.delete("/v1/plans"), 405, "method_not_allowed")


# --- stats -------------------------------------------------------------------------------


async def test_stats_refuses_nul_bytes_and_answers_unknown_records_in_the_shape(
    infra: Infra, database_url: str
) -> None:
    settings = StatsSettings(nats_url=infra.nats_url, database_url=database_url, http_port=0)
    async with running(build_stats(settings)) as (_, client):
        r = await client.get("/v1/models/x/stats", params={"at": "a\x00b"})
        assert error_of(r, 422, "invalid_request")["fields"][0]["loc"] == ["query", "at"]
        error_of(await client.get("/v1/models/x%00y/stats"), 422, "invalid_request")
        r = await client.get("/v1/models/openai/gpt-4o/stats", headers=bearer("alice"))
        assert "openai/gpt-4o" in error_of(r, 404, "not_found")["message"]


# --- failures that are not the request's -------------------------------------------------


class Proxy:
    """A TCP proxy to PostgreSQL that can be cut: the database becomes unreachable for the
    service (open connections reset, new ones refused) while it stays up for others."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


@asynccontextmanager
async def through(proxy: Proxy, database_url: str) -> AsyncIterator[str]:
    await proxy.start()
    parts = urlsplit(database_url)
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc))
    finally:
        with contextlib.suppress(Exception):
            await proxy.cut()


async def test_while_postgres_is_unreachable_the_api_answers_503_then_recovers(
    infra: Infra, database_url: str
) -> None:
    parts = urlsplit(database_url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    async with through(proxy, database_url) as proxied:
        settings = StatsSettings(nats_url=infra.nats_url, database_url=proxied, http_port=0)
        async with running(build_stats(settings)) as (_, client):
            url = "/v1/models/m/stats"
            assert (await client.get(url)).status_code == 404
            await proxy.cut()
            for _ in range(3):  # pooled connections that died, then refused new ones
                r = await client.get(url)
                error_of(r, 503, "unavailable")
                assert r.headers["retry-after"].isdigit()
            await proxy.start()  # the same port again
            r = await client.get(url)
            assert r.status_code == 404, r.text


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (ConnectionRefusedError(111, "Connection refused"), 503),
        (TimeoutError(), 503),  # a pool acquire that timed out
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), 503),
        (asyncpg.CannotConnectNowError("the database system is starting up"), 503),
        (asyncpg.InterfaceError("connection is closed"), 503),
        (nats.errors.ConnectionClosedError(), 503),
        (nats.errors.NoRespondersError(), 503),
        (asyncpg.UniqueViolationError("duplicate key password=hunter2"), 500),
        (asyncpg.InterfaceError("another operation is in progress"), 500),
        (KeyError("password=hunter2"), 500),
    ],
)
async def test_failures_answer_503_or_500_without_internal_detail(
    exc: Exception, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    router = APIRouter()

    @router.get("/boom")
    async def boom() -> None:
        raise exc

    app = create_app(ServiceSpec(name="probe", settings=RuntimeSettings(), routers=[router]))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caplog.set_level(logging.INFO, logger="services.runtime.errors")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        r = await client.get(
            "/boom",
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", **bearer()},
        )
    if status == 503:
        error_of(r, 503, "unavailable")
        assert r.headers["retry-after"].isdigit()
    else:
        error = error_of(r, 500, "internal")
        assert "hunter2" not in r.text and trace_id in error["message"]
        (record,) = [r for r in caplog.records if r.exc_info]
        assert getattr(record, "trace_id", None) == trace_id
        assert record.exc_info is not None and record.exc_info[1] is exc


async def test_the_error_shape_is_documented_for_every_operation() -> None:
    app = create_app(build_stats(StatsSettings()))
    document = app.openapi()
    assert "ErrorResponse" in document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"4XX", "5XX"} <= set(responses), (method, path)
            assert "HTTPValidationError" not in json.dumps(responses)
