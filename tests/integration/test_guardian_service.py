"""guardian on real NATS and PostgreSQL: incidents and their events, escalation into a report
through `fleet up`'s real restart channel (its processes faked), the operator's controls, and
two replicas with one leader whose stale epoch is refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from contracts.catalog import dead_letter_subject
from contracts.events import ServiceHeartbeat
from services.guardian import db
from services.guardian.app import build
from services.guardian.config import GuardianSettings
from services.guardian.domain import Reminded
from services.guardian.watcher import Guardian, SupervisorClient
from services.runtime.service import Runtime
from services.stack import RestartChannel
from tests.conftest import Infra, bearer, eventually, running

AUTH = bearer("ops", "operator")
A_USER = bearer("alice", "user")


class FakeService:
    """A watched service as guardian sees it: heartbeats on core NATS, 5 per second."""

    def __init__(self, nc: Nats, name: str) -> None:
        self.nc, self.name = nc, name
        self.instance = f"{name}-1"
        self.ready = True
        self.beating = False
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        started = datetime.now(UTC)
        while True:
            if self.beating:
                beat = ServiceHeartbeat(
                    service=self.name, instance=self.instance, started_at=started, ready=self.ready
                )
                await self.nc.publish(beat.subject, beat.model_dump_json().encode())
            await asyncio.sleep(0.2)

    def start(self) -> None:
        self.beating = True
        if self._task is None:
            self._task = asyncio.create_task(self._beat())

    def stop(self) -> None:
        self.beating = False

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class FakeProcesses:
    """What `fleet up` does for the channel, without processes: restarts are recorded."""

    def __init__(self) -> None:
        self.pids = 1000
        self.restarted: list[str] = []

    def restart(self, name: str) -> int:
        self.restarted.append(name)
        self.pids += 1
        return self.pids

    def alive(self) -> dict[str, bool]:
        return {"stats": True}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "logs").mkdir()
    return tmp_path


@pytest.fixture
def channel(home: Path) -> Iterator[tuple[RestartChannel, FakeProcesses]]:
    procs = FakeProcesses()
    ch = RestartChannel(home, procs.restart, procs.alive)
    yield ch, procs
    ch.close()


def settings(infra: Infra, database_url: str, home: Path, **extra: Any) -> GuardianSettings:
    values: dict[str, Any] = {
        "nats_url": infra.nats_url,
        "database_url": database_url,
        "fleet_home": home,
        "guardian_services": ["stats"],
        "guardian_heartbeat_timeout_s": 1.0,
        "guardian_hung_after_s": 1.0,
        "guardian_stable_after_s": 0.5,
        "guardian_restart_cooldown_s": 0.2,
        "guardian_restart_backoff_max_s": 0.5,
        "guardian_restart_timeout_s": 30.0,
        "guardian_startup_grace_s": 30.0,
        "guardian_leader_poll_s": 0.2,
        "guardian_min_free_disk_bytes": 0,
        **extra,
    }
    return GuardianSettings(**values)


@contextlib.asynccontextmanager
async def guardian(
    s: GuardianSettings,
) -> AsyncIterator[tuple[Guardian, Runtime, httpx.AsyncClient]]:
    spec = build(s)
    g = getattr(spec.tasks[0], "__self__", None)  # the Guardian whose loops the spec runs
    assert isinstance(g, Guardian)
    async with running(spec) as (runtime, client):
        yield g, runtime, client


async def events(js: JetStreamContext, subject: str) -> list[dict[str, Any]]:
    info = await js.stream_info("SERVICES")
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(Exception):
            msg = await js.get_msg("SERVICES", seq)
            if msg.subject == subject and msg.data is not None:
                found.append(json.loads(msg.data))
    return found


async def until_events(
    js: JetStreamContext, subject: str, n: int, timeout: float = 15
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def enough() -> bool:
        found[:] = await events(js, subject)
        return len(found) >= n

    await eventually(enough, timeout, f"{n} {subject}")
    return found


async def test_a_silent_service_goes_down_once_and_recovers_with_history_kept(
    infra: Infra, database_url: str, js: JetStreamContext, nc: Nats, home: Path
) -> None:
    stats = FakeService(nc, "stats")
    stats.start()
    s = settings(infra, database_url, home, guardian_mode="observe")
    try:
        async with guardian(s) as (g, _runtime, client):
            await eventually(lambda: _status(g, "stats", "up"), what="stats up")
            assert g.leader
            stats.stop()  # the process died: no more heartbeats
            downs = await until_events(js, "service.down", 1)
            assert downs[0]["service"] == "stats"
            assert downs[0]["reason"].startswith("no heartbeat for")
            assert downs[0]["last_seen_at"] is not None
            health = (await client.get("/api/health")).json()
            assert health["services"]["stats"]["status"] == "down"
            assert health["status"] == "unhealthy"  # every watched service is down
            assert (await client.get("/api/health")).status_code == 503
            stats.instance = "stats-2"
            stats.start()
            recovered = await until_events(js, "service.recovered", 1)
            assert recovered[0]["incident_id"] == downs[0]["incident_id"]
            assert recovered[0]["downtime_seconds"] > 0  # how long depends on the machine
            assert recovered[0]["restarts"] == 1  # a new instance: the orchestrator restarted it
            health_r = await client.get("/api/health")
            assert health_r.status_code == 200 and health_r.json()["status"] == "healthy"
            assert health_r.json()["services"]["stats"]["restarts"] == 1
            system = health_r.json()["system"]
            assert system["disk"]["free"] > 0 and system["memory"]["total"] > 0
            assert health_r.json()["nats"]["status"] == "ok"
            assert len(await events(js, "service.down")) == 1
        # history survives guardian's restart
        async with guardian(s) as (_, _runtime, client):
            listed = (await client.get("/api/guardian/incidents")).json()
            assert [i["incident_id"] for i in listed] == [downs[0]["incident_id"]]
            one = (await client.get(f"/api/guardian/incidents/{listed[0]['incident_id']}")).json()
            kinds = [t["kind"] for t in one["transitions"]]
            assert kinds[0] == "WentDown" and kinds[-1] == "Recovered"
            assert one["closed_at"] is not None
    finally:
        await stats.close()


async def test_flapping_is_one_incident(
    infra: Infra, database_url: str, js: JetStreamContext, nc: Nats, home: Path
) -> None:
    stats = FakeService(nc, "stats")
    stats.start()
    s = settings(infra, database_url, home, guardian_mode="observe", guardian_stable_after_s=3.0)
    try:
        async with guardian(s) as (g, runtime, _client):
            await eventually(lambda: _status(g, "stats", "up"), what="stats up")
            for _ in range(4):  # ready toggles every second
                stats.ready = False
                await eventually(lambda: _status(g, "stats", "down"), what="down")
                stats.ready = True
                await eventually(lambda: _status(g, "stats", "up"), what="up")
            recovered = await until_events(js, "service.recovered", 1)
            assert len(await events(js, "service.down")) == 1
            assert len(recovered) == 1
            async with runtime.pool.acquire() as conn:
                flaps = await conn.fetchval("SELECT flaps FROM incidents")
            assert flaps >= 3
    finally:
        await stats.close()


async def test_a_crash_loop_gets_three_restarts_then_one_report_and_an_operator_reset(
    infra: Infra,
    database_url: str,
    js: JetStreamContext,
    nc: Nats,
    home: Path,
    channel: tuple[RestartChannel, FakeProcesses],
) -> None:
    ch, procs = channel
    trace = uuid.uuid4().hex
    lines = [json.dumps({"level": "info", "msg": f"log line {i}"}) for i in range(79)]
    lines.append(json.dumps({"level": "error", "msg": "cannot start", "trace_id": trace}))
    (home / "logs" / "stats.log").write_text("\n".join(lines) + "\n")
    await js.publish(
        dead_letter_subject("subtask.completed"),
        b'{"bad": true}',
        headers={"Fleet-Dead-Reason": "invalid"},
    )
    stats = FakeService(nc, "stats")
    stats.start()
    s = settings(
        infra,
        database_url,
        home,
        guardian_supervisor_socket=ch.socket,
        guardian_supervisor_token_file=ch.token_file,
    )
    try:
        async with guardian(s) as (g, _runtime, client):
            assert g.policy.mode == "supervise"
            await eventually(lambda: _status(g, "stats", "up"), what="stats up")
            stats.stop()
            ch.exited("stats", 999, 1)
            for n in range(1, 4):  # every new process dies at start

                async def restarted(n: int = n) -> bool:
                    return len(procs.restarted) >= n

                await eventually(restarted, what=f"restart {n}")
                ch.exited("stats", 1000 + n, 1)
            escalated = await until_events(js, "service.escalated", 1)
            report = escalated[0]["report"]
            assert escalated[0]["restarts"] == 3
            assert "log line 30" in report and "log line 29" not in report  # the last 50
            assert "cannot start" in report and trace in report
            assert "deadletter.subtask.completed" in report and "invalid" in report
            assert '"nats"' in report and '"postgres"' in report and '"system"' in report
            assert report.count("| guardian |") == 3
            files = list((home / "reports").glob("BUG-*.md"))
            assert [f.name for f in files] == [escalated[0]["report_name"]]
            assert files[0].read_text() == report
            assert [r["epoch"] for r in ch.restarts] == [g.epoch] * 3
            assert procs.restarted == ["stats"] * 3  # no fourth
            status = (await client.get("/api/guardian/status")).json()
            assert status["services"]["stats"]["held"] is True

            incident = escalated[0]["incident_id"]
            url = f"/api/guardian/incidents/{incident}/report"
            assert (await client.get(url, headers={"Authorization": ""})).status_code == 401
            assert (
                await client.get(url, headers={"Authorization": "Bearer wrong"})
            ).status_code == 401
            assert (await client.get(url, headers=A_USER)).status_code == 403
            got = await client.get(url, headers=AUTH)
            assert got.status_code == 200 and got.text == report
            assert got.headers["content-type"].startswith("text/markdown")

            reset = {"action": "reset", "service": "stats"}
            no_token = {"Authorization": ""}
            assert (
                await client.post("/api/guardian/control", json=reset, headers=no_token)
            ).status_code == 401
            assert (
                await client.post("/api/guardian/control", json=reset, headers=A_USER)
            ).status_code == 403
            r = await client.post("/api/guardian/control", json=reset, headers=AUTH)
            assert r.status_code == 200, r.text

            async def fourth() -> bool:
                return len(procs.restarted) == 4

            await eventually(fourth, what="a restart after the reset")
            again = await client.post("/api/guardian/control", json=reset, headers=AUTH)
            assert again.status_code == 409  # no longer escalated
            unknown = {"action": "reset", "service": "nope\x00" * 3}
            assert (
                await client.post("/api/guardian/control", json=unknown, headers=AUTH)
            ).status_code in (404, 422)
            smoke = await client.post("/api/guardian/run-smoke", headers=AUTH)
            # no address known for the other services here: the canary fails, and says so
            assert smoke.status_code == 200 and smoke.json()["ok"] is False
    finally:
        await stats.close()


async def test_pause_stops_actions_and_resume_takes_up_what_happened_meanwhile(
    infra: Infra, database_url: str, js: JetStreamContext, nc: Nats, home: Path
) -> None:
    stats = FakeService(nc, "stats")
    stats.start()
    s = settings(infra, database_url, home, guardian_mode="observe")
    try:
        async with guardian(s) as (g, _runtime, client):
            await eventually(lambda: _status(g, "stats", "up"), what="stats up")
            pause = {"action": "pause"}
            r = await client.post("/api/guardian/control", json=pause, headers=AUTH)
            assert r.status_code == 200

            async def paused() -> bool:
                return g.paused

            await eventually(paused, what="paused")
            stats.stop()
            await eventually(lambda: _status(g, "stats", "down"), what="seen down")
            assert await events(js, "service.down") == []  # paused: no event
            r = await client.post("/api/guardian/control", json={"action": "resume"}, headers=AUTH)
            assert r.status_code == 200
            downs = await until_events(js, "service.down", 1)
            assert downs[0]["service"] == "stats"
    finally:
        await stats.close()


async def test_the_standby_takes_over_and_the_old_leaders_epoch_is_refused(
    infra: Infra,
    database_url: str,
    js: JetStreamContext,
    nc: Nats,
    home: Path,
    channel: tuple[RestartChannel, FakeProcesses],
) -> None:
    ch, procs = channel
    stats = FakeService(nc, "stats")
    stats.start()
    s = settings(
        infra,
        database_url,
        home,
        guardian_supervisor_socket=ch.socket,
        guardian_supervisor_token_file=ch.token_file,
    )
    try:
        async with guardian(s) as (a, a_runtime, _a_client):
            await eventually(lambda: _leads(a), what="a leads")
            old_epoch = a.epoch
            assert old_epoch is not None
            async with guardian(s) as (b, _b_runtime, b_client):
                await eventually(lambda: _status(b, "stats", "up"), what="b sees stats")
                assert not b.leader
                standby = (await b_client.get("/api/guardian/status")).json()
                assert standby["leader"] is False and standby["leadership"]["epoch"] == old_epoch
                stats.stop()
                ch.exited("stats", 999, 1)

                async def restarted_once() -> bool:
                    return procs.restarted == ["stats"]

                await eventually(restarted_once, what="the leader's restart")
                # the leader dies; its lock goes with its connection
                await _kill_leader(a_runtime)
                await eventually(lambda: _leads(b), timeout=5, what="b takes over")
                assert b.epoch == old_epoch + 1
                # b carries on a's incident: its restart is in progress, not done again
                await eventually(lambda: _adopted(b), what="b adopts the incident")
                ticks = b.watch.services["stats"]
                assert ticks.incident is not None and len(ticks.incident.attempts) == 1
                assert procs.restarted == ["stats"]
                # a's late actions are refused, in the database and by fleet up
                async with a_runtime.pool.acquire() as conn:
                    before = await conn.fetchval("SELECT count(*) FROM transitions")
                now = datetime.now(UTC)
                assert ticks.incident is not None
                late = Reminded("stats", now, ticks.incident.incident_id, 1.0, 0)
                with pytest.raises(db.StaleEpoch):
                    async with a_runtime.transaction() as tx:
                        await db.check_epoch(tx, old_epoch)
                        await db.record(tx, late, old_epoch)
                async with a_runtime.pool.acquire() as conn:
                    assert await conn.fetchval("SELECT count(*) FROM transitions") == before
                assert s.guardian_supervisor_socket and s.guardian_supervisor_token_file
                client = SupervisorClient(
                    s.guardian_supervisor_socket, s.guardian_supervisor_token_file
                )
                await client.restart("stats", b.epoch, "the new leader")  # b's epoch is news
                with pytest.raises(db.StaleEpoch):
                    await client.restart("stats", old_epoch, "a deposed leader")
                assert procs.restarted == ["stats", "stats"]
    finally:
        await stats.close()


async def test_the_restart_channel_wants_its_token(
    channel: tuple[RestartChannel, FakeProcesses],
) -> None:
    ch, procs = channel
    transport = httpx.AsyncHTTPTransport(uds=str(ch.socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet-up") as client:
        body = {"service": "stats", "epoch": 1, "reason": "x"}
        assert (await client.post("/restart", json=body)).status_code == 401
        wrong = {"Authorization": "Bearer " + "x" * 10_000}
        assert (await client.post("/restart", json=body, headers=wrong)).status_code == 401
        auth = {"Authorization": f"Bearer {ch.token}"}
        bad = await client.post("/restart", content=b"\x00{not json", headers=auth)
        assert bad.status_code == 400
        huge = {"service": "stats", "epoch": 10**40, "reason": "x"}
        assert (await client.post("/restart", json=huge, headers=auth)).status_code == 200
    assert procs.restarted == ["stats"]
    assert ch.socket.stat().st_mode & 0o777 == 0o600
    assert ch.token_file.stat().st_mode & 0o777 == 0o600


# --- helpers ------------------------------------------------------------------------------


async def _status(g: Guardian, service: str, status: str) -> bool:
    return g.watch.services[service].status == status


async def _leads(g: Guardian) -> bool:
    return g.leader


async def _adopted(g: Guardian) -> bool:
    return g.watch.services["stats"].incident is not None


async def _kill_leader(runtime: Runtime) -> None:
    """What a SIGKILL does to the leader's lock: its connection ends. Its other loops stop."""
    for task in asyncio.all_tasks():
        if task.get_name() in ("leadership", "executor", "ticker", "exits") and _owned(
            task, runtime
        ):
            task.cancel()


def _owned(task: asyncio.Task[Any], runtime: Runtime) -> bool:
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    return frame is not None and frame.f_locals.get("runtime") is runtime
