"""The app factory: one FastAPI app per service, whose lifespan runs the whole service.

Start: logs and tracing, migrations (under an advisory lock), the database pool, NATS and
the streams, the consumers, the outbox relay, the heartbeat and the service's own loops.
Every service gets `/health/live`, `/health/ready`, `/metrics` and OpenAPI at `/docs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic

import asyncpg
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, generate_latest
from typing_extensions import TypeVar

from contracts.events import ServiceHeartbeat, utcnow
from services.runtime import auth, errors, outbox
from services.runtime.auth import Caller
from services.runtime.config import RuntimeSettings
from services.runtime.consumer import DEAD_LETTERED, Consumer, Subscription
from services.runtime.db import (
    RUNTIME_MIGRATIONS,
    Connection,
    Login,
    acting_for,
    create_pool,
    load_migrations,
    login_role,
    migrate,
)
from services.runtime.faults import backoff_seconds, describe
from services.runtime.http_metrics import HttpMetrics
from services.runtime.logs import setup_logging
from services.runtime.messaging import connect_nats, ensure_streams
from services.runtime.telemetry import setup_tracing

log = logging.getLogger(__name__)

READY = Gauge("fleet_ready", "1 when NATS and PostgreSQL answer")
DEAD_LETTER_REASONS = ("invalid", "rejected", "max_deliver")  # consumer.py's reasons
VERSION = "0.1.0"

# A service's settings class. A bare `Runtime` is one whose settings are only known to be
# RuntimeSettings; a bare `ServiceSpec` is any service's.
S = TypeVar("S", bound=RuntimeSettings, default=RuntimeSettings, covariant=True)
SpecSettings = TypeVar("SpecSettings", bound=RuntimeSettings, default=Any)


def instance_name() -> str:
    """This process, as heartbeats and leases name it."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Runtime(Generic[S]):
    """The running service: the one thing its loops and routes are given (loops as their
    argument, routes through their service's `RuntimeDep`), typed by its settings class."""

    name: str
    settings: S
    pool: asyncpg.Pool
    nc: Nats
    js: JetStreamContext
    relay: outbox.Relay
    login: Login
    subscriptions: list[Subscription] = field(default_factory=list)
    started_at: datetime = field(default_factory=utcnow)
    instance: str = field(default_factory=instance_name)

    def as_user(self, who: Caller) -> AbstractAsyncContextManager[Connection]:
        """A transaction acting for the caller, as row-level security policies see it."""
        return acting_for(self.pool, self.name, {"sub": who.user_id, "role": who.role})

    def transaction(self) -> AbstractAsyncContextManager[Connection]:
        """A transaction whose `outbox.add` events are published as soon as it commits
        (with the pool's plain transactions they wait for the relay loop)."""
        return self.relay.transaction()

    async def readiness(self, timeout: float = 1.0) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            if not self.nc.is_connected:
                raise ConnectionError("not connected")
            await asyncio.wait_for(self.js.account_info(), timeout)  # a real round trip
            checks["nats"] = "ok"
        except Exception as exc:
            checks["nats"] = f"error: {type(exc).__name__} {exc}".strip()
        try:
            async with asyncio.timeout(timeout):
                async with self.pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"error: {type(exc).__name__} {exc}".strip()
        # consuming and publishing: a durable consumer deleted under us, a paused consumer,
        # a relay that cannot publish (a deleted stream) are not ready either
        stuck = [f"{s.consumer.name}: {s.problem}" for s in self.subscriptions if s.problem]
        if self.relay.problem:
            stuck.append(f"outbox relay: {self.relay.problem}")
        checks["delivery"] = f"error: {'; '.join(stuck)}" if stuck else "ok"
        READY.set(all(v == "ok" for v in checks.values()))
        return checks


Task = Callable[[Runtime[S]], Awaitable[None]]


@dataclass
class ServiceSpec(Generic[SpecSettings]):
    """Everything that makes one service; built in its `app.py`."""

    name: str
    settings: SpecSettings
    migrations: Path | None = None
    consumers: Sequence[Consumer[Any]] = ()
    routers: Sequence[APIRouter] = ()  # every route needs a verified token (auth.caller)
    open_routers: Sequence[APIRouter] = ()  # routes for anyone: they show no user's data
    tasks: Sequence[Task[SpecSettings]] = ()  # long-running loops, restarted if they crash
    description: str = ""


def _runner(subscription: Subscription) -> Task:
    async def run(_: Runtime) -> None:
        await subscription.run()

    return run


async def _supervise(name: str, task: Task[Any], runtime: Runtime[Any]) -> None:
    """Run a loop for the life of the service; one that crashes is restarted with backoff
    (a full traceback the first time, one line for each further crash in a row)."""
    crashes = 0
    while True:
        started = time.monotonic()
        try:
            await task(runtime)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            crashes = 1 if time.monotonic() - started > 60 else crashes + 1
            delay = backoff_seconds(crashes, base=1.0, cap=30.0)
            if crashes == 1:
                log.exception("background task %s crashed; restarting in %.0fs", name, delay)
            else:
                log.error(
                    "background task %s crashed again (%d in a row): %s",
                    name,
                    crashes,
                    describe(exc),
                )
            await asyncio.sleep(delay)


async def _heartbeat(runtime: Runtime) -> None:
    url = f"http://{runtime.settings.http_host}:{runtime.settings.http_port}"
    while True:
        checks = await runtime.readiness()
        beat = ServiceHeartbeat(
            service=runtime.name,
            instance=runtime.instance,
            started_at=runtime.started_at,
            ready=all(v == "ok" for v in checks.values()),
            http_url=url,
        )
        if runtime.nc.is_connected:
            await runtime.nc.publish(beat.subject, beat.model_dump_json().encode())
        await asyncio.sleep(runtime.settings.heartbeat_interval_s)


async def _housekeeping(runtime: Runtime) -> None:
    while True:
        await outbox.purge(runtime.pool, sent_older_than_hours=24, inbox_older_than_days=7)
        await asyncio.sleep(600)


def health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/health/live", summary="The process is up")
    async def live() -> dict[str, str]:
        return {"status": "alive"}

    @router.get("/health/ready", summary="NATS connected and PostgreSQL answering")
    async def ready(request: Request) -> JSONResponse:
        runtime: Runtime | None = getattr(request.app.state, "runtime", None)
        if runtime is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        checks = await runtime.readiness()
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "service": runtime.name, "checks": checks},
            status_code=200 if ok else 503,
        )

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router


async def start_runtime(
    spec: ServiceSpec[SpecSettings],
) -> tuple[Runtime[SpecSettings], list[asyncio.Task[None]]]:
    s = spec.settings
    t0 = time.monotonic()
    dirs = [RUNTIME_MIGRATIONS] + ([spec.migrations] if spec.migrations else [])
    login = login_of(spec.name, s)
    if s.migrate_on_start:
        await migrate(s.database_url, spec.name, load_migrations(*dirs), login.user, login.password)
    pool = await create_pool(login, s.db_pool_size, application=spec.name)
    nats_password = s.nats_password.get_secret_value() if s.nats_password else None
    nc = await connect_nats(s.nats_url, spec.name, s.nats_user, nats_password)
    js = nc.jetstream()
    await ensure_streams(js)
    relay = outbox.Relay(
        pool,
        js,
        spec.name,
        poll_interval=s.outbox_poll_interval_s,
        ack_timeout_s=s.outbox_ack_timeout_s,
    )
    runtime = Runtime(spec.name, s, pool, nc, js, relay, login)
    loops: list[tuple[str, Task[Any]]] = [
        ("outbox-relay", lambda _: relay.run()),
        ("heartbeat", _heartbeat),
        ("housekeeping", _housekeeping),
    ]
    for consumer in spec.consumers:
        subscription = Subscription(
            consumer,
            nc,
            pool,
            relay,
            max_deliver=s.consumer_max_deliver,
            ack_wait_s=s.consumer_ack_wait_s,
        )
        await subscription.open()  # durable consumers exist before the service says ready
        # the series exist at 0 from the start, so an alert on increase() sees the first one
        for reason in DEAD_LETTER_REASONS:
            DEAD_LETTERED.labels(consumer.name, reason)
        runtime.subscriptions.append(subscription)
        loops.append((consumer.name, _runner(subscription)))
    loops += [(getattr(t, "__name__", "task"), t) for t in spec.tasks]
    tasks = [asyncio.create_task(_supervise(n, t, runtime), name=n) for n, t in loops]
    # what start-up made lives as long as the process: keep the cyclic collector from
    # scanning it again and again (a full collection of it paused the service for tens of ms)
    gc.collect()
    gc.freeze()
    log.info(
        "%s started in %.2fs",
        spec.name,
        time.monotonic() - t0,
        extra={"consumers": [c.name for c in spec.consumers]},
    )
    return runtime, tasks


async def stop_runtime(
    runtime: Runtime[Any], tasks: list[asyncio.Task[None]], grace_s: float = 5.0
) -> None:
    """Stop the loops, NATS and the pool; whatever does not stop within `grace_s` is left
    behind or cut off and logged, so a stop never hangs (a SIGTERM must end the process)."""
    for task in tasks:
        task.cancel()
    if tasks:
        done, stuck = await asyncio.wait(tasks, timeout=grace_s)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: a loop that failed while stopping is no news
        for task in stuck:
            log.warning("%s did not stop within %.0fs", task.get_name(), grace_s)
    with contextlib.suppress(Exception):
        await runtime.nc.close()  # not drain(): it waits out its timeout on pull requests
    try:
        # close() waits for every borrowed connection to come back
        await asyncio.wait_for(runtime.pool.close(), grace_s)
    except TimeoutError:
        log.warning("database connections still in use after %.0fs: cut off", grace_s)
        runtime.pool.terminate()


def login_of(service: str, settings: RuntimeSettings) -> Login:
    password = settings.db_password.get_secret_value() if settings.db_password else None
    return Login(settings.database_url, service, settings.db_user or login_role(service), password)


def create_app(spec: ServiceSpec[Any]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime, tasks = await start_runtime(spec)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await stop_runtime(runtime, tasks)

    app = FastAPI(
        title=f"LLM Fleet {spec.name}",
        version=VERSION,
        description=spec.description,
        lifespan=lifespan,
        responses=errors.ERROR_RESPONSES,
    )
    errors.install(app)
    app.add_middleware(HttpMetrics)  # outermost: it counts what the request checks refuse too
    app.state.verifier = auth.verifier_for(spec.settings)  # refuses production on dev secrets
    app.include_router(health_router(), responses={503: {"description": "Not ready"}})
    for router in spec.routers:  # every route of a service needs a verified token
        app.include_router(router, dependencies=[Depends(auth.caller)])
    for router in spec.open_routers:
        app.include_router(router)
    return app


def runtime_of(request: Request) -> Runtime[Any]:
    """FastAPI dependency: the running service's runtime. Each service names it with its
    settings' type, `RuntimeDep = Annotated[Runtime[Settings], Depends(runtime_of)]`."""
    runtime: Runtime[Any] = request.app.state.runtime
    return runtime


def serve(spec: ServiceSpec[Any]) -> None:
    """Run one service until SIGINT/SIGTERM."""
    setup_logging(spec.name, spec.settings.log_level)
    setup_tracing(spec.name)
    config = uvicorn.Config(
        create_app(spec),
        host=spec.settings.http_host,
        port=spec.settings.http_port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    uvicorn.Server(config).run()
