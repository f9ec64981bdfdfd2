"""guardian's smoke canary through the real services (sync, benchmark, planner, stats served
over HTTP in this process, on real NATS and PostgreSQL): a run passes through each and is
stored; with stats gone the run fails and opens the `smoke` incident, which the next passing
run closes; the schedule runs it; the status page shows it to anyone, without user data."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from services.benchmark.app import build as build_benchmark
from services.benchmark.config import BenchmarkSettings
from services.guardian.app import build as build_guardian
from services.guardian.config import GuardianSettings
from services.guardian.smoke import CANARY_MODEL, CANARY_USER
from services.guardian.watcher import Guardian
from services.planner.app import build as build_planner
from services.planner.config import PlannerSettings
from services.runtime.service import ServiceSpec, create_app, start_runtime, stop_runtime
from services.stats.app import build as build_stats
from services.stats.config import StatsSettings
from services.sync.app import build as build_sync
from services.sync.config import SyncSettings
from tests.conftest import Infra, bearer, eventually, running

OPERATOR = bearer("ops", "operator")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Served:
    """A service on a real port, its lifespan run here; stop() takes it away entirely."""

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop: Any = None
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        app = create_app(self.spec)
        runtime, tasks = await start_runtime(self.spec)
        app.state.runtime = runtime
        self.tasks = tasks
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            lifespan="off",
            log_config=None,
            timeout_graceful_shutdown=2,  # a kept-alive client must not hold the stop
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())

        async def started() -> bool:
            return server.started

        await eventually(started, 10, f"{self.spec.name} listening")

        async def stop() -> None:
            server.should_exit = True
            await task
            await stop_runtime(runtime, tasks)

        self._stop = stop

    async def stop(self) -> None:
        if self._stop is not None:
            stop, self._stop = self._stop, None
            await stop()


@pytest.fixture
async def fleet(infra: Infra, database_url: str) -> AsyncIterator[dict[str, Served]]:
    common: dict[str, Any] = {"nats_url": infra.nats_url, "database_url": database_url}
    served = {
        "sync": Served(build_sync(SyncSettings(**common, openrouter_sync_on_startup=False))),
        "benchmark": Served(build_benchmark(BenchmarkSettings(**common))),
        "planner": Served(build_planner(PlannerSettings(**common))),
        "stats": Served(build_stats(StatsSettings(**common))),
    }
    for s in served.values():  # one at a time: migrations of a fresh database
        await s.start()
    try:
        yield served
    finally:
        for s in served.values():
            await s.stop()


def guardian_settings(
    infra: Infra, database_url: str, home: Path, fleet: dict[str, Served], **extra: Any
) -> GuardianSettings:
    values: dict[str, Any] = {
        "nats_url": infra.nats_url,
        "database_url": database_url,
        "fleet_home": home,
        "guardian_mode": "observe",
        "guardian_services": list(fleet),
        "guardian_probe_urls": {name: s.url for name, s in fleet.items()},
        "guardian_smoke_interval_s": 0,
        "guardian_smoke_timeout_s": 3,
        "guardian_leader_poll_s": 0.2,
        "guardian_min_free_disk_bytes": 0,
        "guardian_grafana_url": "http://grafana.example:3000",
        **extra,
    }
    return GuardianSettings(**values)


def guardian_of(spec: ServiceSpec) -> Guardian:
    """The Guardian whose loops the spec runs."""
    owner = getattr(spec.tasks[0], "__self__", None)
    assert isinstance(owner, Guardian)
    return owner


async def smoke_events(js: JetStreamContext, subject: str) -> list[dict[str, Any]]:
    sub = await js.subscribe(subject, ordered_consumer=True)
    found = []
    with contextlib.suppress(TimeoutError):
        while True:
            msg = await sub.next_msg(timeout=0.5)
            body = json.loads(msg.data)
            if body["service"] == "smoke":
                found.append(body)
    await sub.unsubscribe()
    return found


async def test_the_canary_goes_through_every_service_and_a_failure_is_an_incident(
    infra: Infra, database_url: str, tmp_path: Path, fleet: dict[str, Served], js: JetStreamContext
) -> None:
    spec = build_guardian(guardian_settings(infra, database_url, tmp_path, fleet))
    guardian = guardian_of(spec)
    async with running(spec) as (_, client):

        async def leading() -> bool:
            return guardian.leader

        await eventually(leading, 10, "guardian leads")
        before = REGISTRY.get_sample_value("guardian_smoke_runs_total", {"result": "passed"}) or 0

        refused = await client.post("/api/guardian/run-smoke", headers=bearer("ann-7f3", "user"))
        assert refused.status_code == 403

        r = await client.post("/api/guardian/run-smoke", headers=OPERATOR)
        assert r.status_code == 200, r.text
        run = r.json()
        assert run["ok"] is True, run
        steps = {(s["step"], s["service"]): s for s in run["steps"]}
        assert set(steps) == {
            ("catalog", "sync"),
            ("jobs", "benchmark"),
            ("plan", "planner"),
            ("publish", "guardian"),
            ("plan completed", "planner"),
            ("counted", "stats"),
        }
        assert all(s["ok"] and s["seconds"] >= 0 for s in steps.values())
        assert run["trigger"] == "operator" and run["requested_by"] == "ops"
        after = REGISTRY.get_sample_value("guardian_smoke_runs_total", {"result": "passed"})
        assert after == before + 1

        # the canary's record is the canary's own: a user asking for the model finds none
        stats = fleet["stats"].url
        async with httpx.AsyncClient() as raw:
            mine = await raw.get(
                f"{stats}/v1/models/{CANARY_MODEL}/stats", headers=bearer("ann-7f3", "user")
            )
            assert mine.status_code == 404
            canary = await raw.get(
                f"{stats}/v1/models/{CANARY_MODEL}/stats", headers=bearer(CANARY_USER, "user")
            )
            assert canary.json()["response_count"] == 1

        # stats answers but consumes nothing: the run fails at stats (the record it finds is
        # the previous run's), and one incident of `smoke` opens
        (consumer,) = [t for t in fleet["stats"].tasks if t.get_name() == "stats-subtask-completed"]
        consumer.cancel()
        failed = (await client.post("/api/guardian/run-smoke", headers=OPERATOR)).json()
        assert failed["ok"] is False
        bad = [s for s in failed["steps"] if not s["ok"]]
        assert [(s["step"], s["service"], s["detail"]) for s in bad] == [
            ("counted", "stats", "not done in 3s")
        ]
        assert "counted (stats)" in failed["reason"]
        # stats gone altogether: still the same incident
        await fleet["stats"].stop()
        failed_again = (await client.post("/api/guardian/run-smoke", headers=OPERATOR)).json()
        assert failed_again["ok"] is False

        async def smoke_incident_open() -> bool:
            found = await client.get("/api/guardian/incidents", params={"open": True})
            return any(i["service"] == "smoke" for i in found.json())

        await eventually(smoke_incident_open, 10, "the smoke incident")
        downs = await smoke_events(js, "service.down")
        assert len(downs) == 1 and "counted (stats)" in downs[0]["reason"]

        # stats back (a new process, the same database): the next run passes and closes it
        await fleet["stats"].start()
        passed = (await client.post("/api/guardian/run-smoke", headers=OPERATOR)).json()
        assert passed["ok"] is True, passed

        async def smoke_incident_closed() -> bool:
            found = await client.get("/api/guardian/incidents", params={"service": "smoke"})
            return [i["closed_at"] is not None for i in found.json()] == [True]

        await eventually(smoke_incident_closed, 10, "the smoke incident closed")
        assert len(await smoke_events(js, "service.recovered")) == 1

        runs = (await client.get("/api/guardian/smoke")).json()
        assert [r["ok"] for r in runs] == [True, False, False, True]

        # the status page: open, the last run and each service, and no user's data
        page = await client.get("/", headers={"Authorization": ""})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        for name in fleet:
            assert f'id="service-{name}"' in html
        assert 'id="run-smoke"' in html and "http://grafana.example:3000" in html
        assert 'data-ok="true"' in html and f"{fleet['planner'].url}/docs" in html
        assert CANARY_USER not in html
        assert "ann-7f3" not in html
        live = await client.get("/status/live", headers={"Authorization": ""})
        assert live.status_code == 200 and 'id="services"' in live.text


async def test_the_leader_runs_the_canary_on_its_schedule(
    infra: Infra, database_url: str, tmp_path: Path, fleet: dict[str, Served]
) -> None:
    settings = guardian_settings(
        infra, database_url, tmp_path, fleet, guardian_smoke_interval_s=0.5
    )
    async with running(build_guardian(settings)) as (_, client):

        async def scheduled() -> bool:
            runs = (await client.get("/api/guardian/smoke")).json()
            return any(r["trigger"] == "schedule" and r["ok"] for r in runs)

        await eventually(scheduled, 30, "a scheduled run that passed")
