"""Every service's HTTP metrics (route templates, statuses, durations) and the sampler that
keeps probes and scrapes out of the traces."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, HTTPException
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import DEFAULT_ON
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from services.runtime.config import RuntimeSettings
from services.runtime.http_metrics import UNMATCHED
from services.runtime.service import ServiceSpec, create_app
from services.runtime.telemetry import QuietSampler, is_quiet
from tests.conftest import bearer


def requests(method: str, path: str, status: int) -> float:
    value = REGISTRY.get_sample_value(
        "orchestrator_http_requests_total", {"method": method, "path": path, "status": str(status)}
    )
    return value or 0.0


def observed(method: str, path: str) -> float:
    value = REGISTRY.get_sample_value(
        "orchestrator_http_request_duration_seconds_count", {"method": method, "path": path}
    )
    return value or 0.0


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # a unique prefix per test: the registry is the process's, other tests count too
    prefix = f"/t{uuid.uuid4().hex[:8]}"
    open_router, token_router = APIRouter(prefix=prefix), APIRouter(prefix=prefix)

    @open_router.get("/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        if thing_id == "gone":
            raise HTTPException(404, "gone")
        return {"thing": thing_id}

    @open_router.get("/boom")
    async def boom() -> None:
        raise RuntimeError("planted")

    @token_router.get("/mine")
    async def mine() -> dict[str, bool]:
        return {"ok": True}

    spec = ServiceSpec(
        name="metrics-test",
        settings=RuntimeSettings(),
        routers=[token_router],
        open_routers=[open_router],
    )
    app = create_app(spec)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        c.headers["X-Prefix"] = prefix
        yield c


async def test_requests_count_by_route_template_method_and_status(
    client: httpx.AsyncClient,
) -> None:
    p = client.headers["X-Prefix"]
    template = f"{p}/things/{{thing_id}}"
    for thing in ("1", "2", "x" * 1000, "gone"):
        await client.get(f"{p}/things/{thing}")
    assert requests("GET", template, 200) == 3  # one series however many ids
    assert requests("GET", template, 404) == 1
    assert observed("GET", template) == 4
    assert (
        REGISTRY.get_sample_value(
            "orchestrator_http_requests_total", {"method": "GET", "path": f"{p}/things/1"}
        )
        is None
    )  # never the raw URL


async def test_refusals_errors_and_unknown_urls_are_counted_without_new_series(
    client: httpx.AsyncClient,
) -> None:
    p = client.headers["X-Prefix"]
    assert (await client.get(f"{p}/mine")).status_code == 401
    assert (await client.get(f"{p}/mine", headers=bearer("ann", "user"))).status_code == 200
    assert requests("GET", f"{p}/mine", 401) == 1 and requests("GET", f"{p}/mine", 200) == 1

    assert (await client.post(f"{p}/things/1")).status_code == 405
    assert requests("POST", f"{p}/things/{{thing_id}}", 405) == 1

    assert (await client.get(f"{p}/boom")).status_code == 500
    assert requests("GET", f"{p}/boom", 500) == 1

    before = requests("GET", UNMATCHED, 404)
    for n in range(5):
        assert (await client.get(f"{p}/scan/{n}")).status_code == 404
    assert requests("GET", UNMATCHED, 404) == before + 5

    assert (await client.request("BREW", f"{p}/things/1")).status_code == 405
    assert requests("OTHER", f"{p}/things/{{thing_id}}", 405) == 1


async def test_the_health_routes_are_counted_too(client: httpx.AsyncClient) -> None:
    before = requests("GET", "/health/live", 200)
    assert (await client.get("/health/live")).status_code == 200
    assert requests("GET", "/health/live", 200) == before + 1
    metrics = (await client.get("/metrics")).text
    assert 'orchestrator_http_requests_total{method="GET",path="/health/live",status="200"}' in (
        metrics
    )


# --- no traces for probes and scrapes ------------------------------------------------------


def test_probes_and_scrapes_are_quiet_and_the_rest_is_not() -> None:
    assert is_quiet("GET /health/ready", {})
    assert is_quiet("GET", {"http.route": "/metrics"})
    assert is_quiet("GET", {"url.full": "http://stats:8105/health/ready"})
    assert is_quiet("GET /api/health http send", {})
    assert not is_quiet("GET /v1/plans/{plan_id}", {"http.route": "/v1/plans/{plan_id}"})
    assert not is_quiet("GET", {"url.full": "http://stats:8105/v1/health/readyish"})
    assert not is_quiet("consume subtask.completed", None)


def test_a_probe_makes_no_trace_and_a_real_request_does() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=QuietSampler(DEFAULT_ON))  # the default: parent-based
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    with (
        tracer.start_as_current_span(
            "GET /health/ready", kind=SpanKind.SERVER, attributes={"http.route": "/health/ready"}
        ),
        tracer.start_as_current_span("SELECT 1"),
    ):
        pass
    with tracer.start_as_current_span(
        "GET", kind=SpanKind.CLIENT, attributes={"url.full": "http://sync:8101/health/ready"}
    ):
        pass
    assert exporter.get_finished_spans() == ()

    # inside a real trace, a call to a health route stays part of it
    with (
        tracer.start_as_current_span("GET /v1/plans/{plan_id}", kind=SpanKind.SERVER),
        tracer.start_as_current_span("GET /health/ready", kind=SpanKind.CLIENT),
    ):
        pass
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["GET /health/ready", "GET /v1/plans/{plan_id}"]
