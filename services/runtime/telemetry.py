"""OpenTelemetry tracing: OTLP/HTTP export when OTEL_EXPORTER_OTLP_ENDPOINT is set, and
W3C trace context carried in NATS headers so one trace spans producer and consumer.

Health probes and metrics scrapes make no traces: guardian probes every service twice a
second and Prometheus scrapes each one, so their spans would bury the real ones (they were
most traces of a quiet minute). `QuietSampler` drops a trace whose root is a request for one
of `QUIET_PATHS`, whichever instrumentation (server or client side) starts it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from urllib.parse import urlsplit

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

_configured = False

QUIET_PATHS = frozenset(
    {"/health/live", "/health/ready", "/metrics", "/api/health", "/api/metrics"}
)
_PATH_ATTRIBUTES = ("http.route", "url.path", "http.target", "url.full", "http.url")


def is_quiet(name: str, attributes: Attributes) -> bool:
    """A span of a probe or a scrape: by its HTTP attributes, or by its name
    ("GET /health/ready", as ASGI instrumentation names server spans)."""
    for key in _PATH_ATTRIBUTES:
        value = (attributes or {}).get(key)
        if isinstance(value, str) and urlsplit(value).path in QUIET_PATHS:
            return True
    parts = name.split()
    return len(parts) >= 2 and parts[1].split("?")[0] in QUIET_PATHS


class QuietSampler(sampling.Sampler):
    """`inner` (the OTEL_TRACES_SAMPLER one, parent-based always-on by default) for every
    trace except those whose root span is a probe or a scrape; their children follow the
    root (parent-based), so nothing of them is recorded."""

    def __init__(self, inner: sampling.Sampler) -> None:
        self.inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> sampling.SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if not parent.is_valid and is_quiet(name, attributes):
            return sampling.SamplingResult(sampling.Decision.DROP)
        return self.inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"QuietSampler{{{self.inner.get_description()}}}"


def setup_tracing(service: str) -> None:
    """Install the tracer provider once per process; the OTEL_* variables configure it."""
    global _configured
    if _configured:
        return
    _configured = True
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(
        resource=resource, sampler=QuietSampler(sampling._get_from_env_or_default())
    )
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def current_trace_headers() -> dict[str, str]:
    """The current trace context as headers (traceparent, tracestate), to store or send."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from_headers(headers: dict[str, str] | None) -> Context:
    return propagate.extract(headers or {})
