"""Every service's HTTP requests as Prometheus metrics (the seed's names):

    orchestrator_http_requests_total{method, path, status}
    orchestrator_http_request_duration_seconds{method, path}

`path` is the route's template (`/v1/plans/{plan_id}`), never the raw URL, so one series
stands for a route however many ids are asked for; a request no route matches counts as
`<unmatched>` (a scan of random URLs cannot grow the series). A plain ASGI middleware: it
wraps `send` to see the status and leaves the body alone (no buffering, streaming intact).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before it starts a response

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
            path = route_template(scope)
            REQUESTS.labels(method, path, str(status)).inc()
            DURATION.labels(method, path).observe(time.perf_counter() - started)
