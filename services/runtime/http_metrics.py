"""Every service's HTTP requests as Prometheus metrics (the seed's names):

    orchestrator_http_requests_total{method, path, status}
    orchestrator_http_request_duration_seconds{method, path}

`path` is the route's template (`/v1/plans/{plan_id}`), never the raw URL, so one series
stands for a route however many ids are asked for; a request no route matches counts as
`<unmatched>` (a scan of random URLs cannot grow the series). A plain ASGI middleware: it
wraps `send` to see the status and leaves the body alone (no buffering, streaming intact).

Each request also runs in a server span named by its route (`GET /v1/plans/{plan_id}`),
continuing the caller's trace when it sends a `traceparent` header: what the request logs
and the events it publishes carry that trace id, so its log lines and its consequences in
other services are found from one id. Probes and scrapes make none (telemetry's sampler).
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from prometheus_client import Counter, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.runtime.telemetry import context_from_headers

REQUESTS = Counter(
    "orchestrator_http_requests_total",
    "HTTP requests answered, by method, route template and status",
    ["method", "path", "status"],
)
DURATION = Histogram(
    "orchestrator_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template",
    ["method", "path"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

UNMATCHED = "<unmatched>"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope) -> str:
    """The template of the route that served the request (FastAPI leaves it in the scope),
    or of the first route whose path matches (a 405 has a path, not a handler)."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        match, _ = candidate.matches(scope)
        if match is not Match.NONE:
            found = getattr(candidate, "path_format", None) or getattr(candidate, "path", None)
            if isinstance(found, str):
                return found
    return UNMATCHED


class HttpMetrics:
    """ASGI middleware; added once, outermost, by `services.runtime.service.create_app`."""

    def __init__(self, app: ASGIApp, tracer_provider: TracerProvider | None = None) -> None:
        self.app = app
        # the process's provider (a proxy until setup_tracing installs it), or a test's
        self.tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before it starts a response
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self.tracer.start_as_current_span(
            f"{method} request",
            context=context_from_headers(headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, send_and_see)
            finally:
                path = route_template(scope)
                REQUESTS.labels(method, path, str(status)).inc()
                DURATION.labels(method, path).observe(time.perf_counter() - started)
                span.update_name(f"{method} {path}")
                span.set_attribute("http.route", path)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
