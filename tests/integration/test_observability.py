"""What an operator relies on: one trace across producer and consumer, heartbeats, metrics."""

from __future__ import annotations

import json

from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from contracts.events import ServiceHeartbeat, SubtaskCompleted
from services.runtime.telemetry import current_trace_headers
from services.stats.app import build as build_stats
from services.stats.config import StatsSettings
from tests.conftest import Infra, bearer, eventually, running

EXPORTER = InMemorySpanExporter()


def tracer() -> trace.Tracer:
    """The process-wide provider can be set once; the first test to ask installs ours."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
    return trace.get_tracer("test")


async def test_the_consumer_continues_the_producers_trace(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    producer = tracer()
    settings = StatsSettings(nats_url=infra.nats_url, database_url=database_url, http_port=0)
    async with running(build_stats(settings)) as (_, client):
        event = SubtaskCompleted(
            plan_id="p", subtask_id="s", model_id="m", user_id="u", session_id="x"
        )
        with producer.start_as_current_span("agent finishes subtask") as span:
            headers = current_trace_headers()
            await js.publish(event.subject, event.model_dump_json().encode(), headers=headers)
            trace_id = span.get_span_context().trace_id

        async def counted() -> bool:
            r = await client.get("/v1/models/m/stats", headers=bearer("u"))
            return r.status_code == 200

        await eventually(counted, what="the event applied")
        metrics = (await client.get("/metrics")).text

    consumed = [s for s in EXPORTER.get_finished_spans() if s.name == "subtask.completed process"]
    assert consumed, [s.name for s in EXPORTER.get_finished_spans()]
    assert consumed[-1].context.trace_id == trace_id
    assert consumed[-1].kind == trace.SpanKind.CONSUMER
    assert 'fleet_events_applied_total{consumer="stats-subtask-completed"}' in metrics


async def test_every_service_sends_a_heartbeat_every_second(
    infra: Infra, database_url: str, nc: Nats, js: JetStreamContext
) -> None:
    beats = await nc.subscribe("service.heartbeat")
    settings = StatsSettings(
        nats_url=infra.nats_url, database_url=database_url, heartbeat_interval_s=0.2
    )
    async with running(build_stats(settings)) as (runtime, _):
        first = await beats.next_msg(timeout=5)
        second = await beats.next_msg(timeout=5)
    a = ServiceHeartbeat.model_validate(json.loads(first.data))
    b = ServiceHeartbeat.model_validate(json.loads(second.data))
    assert (a.service, a.instance, a.ready) == ("stats", runtime.instance, True)
    assert b.occurred_at > a.occurred_at
    stream_subjects = {s for info in await js.streams_info() for s in info.config.subjects or []}
    assert "service.heartbeat" not in stream_subjects  # core NATS: never stored
