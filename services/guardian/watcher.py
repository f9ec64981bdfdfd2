"""guardian's imperative shell: it feeds the watch (domain.Watch) with heartbeats, readiness
probes, process exits and the clock, and carries out what the watch decides, in order:
transitions and events in one transaction fenced by the leader's epoch, restarts through
`fleet up`'s channel, escalation reports under FLEET_HOME/reports/.

Only the replica holding the leader lock (a PostgreSQL advisory lock on a connection of its
own) acts; the other keeps its watch current so that it can take over within a poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from contracts.catalog import DEAD_LETTER_STREAM
from contracts.events import (
    Event,
    ServiceDown,
    ServiceEscalated,
    ServiceHeartbeat,
    ServiceRecovered,
)
from services.guardian import db
from services.guardian.config import GuardianSettings
from services.guardian.domain import (
    SMOKE,
    Action,
    AttemptFinished,
    CanaryWatch,
    Escalated,
    Recovered,
    Reminded,
    RestartObserved,
    RestartRequested,
    Watch,
    WentDown,
    human_duration,
    overall_status,
    render_report,
    report_name,
    smoke_verdict,
)
from services.guardian.smoke import Canary
from services.runtime import outbox
from services.runtime.service import Runtime

log = logging.getLogger(__name__)

Service = Runtime[GuardianSettings]

RESTARTS = Counter("guardian_restarts_total", "Restarts guardian asked for or saw", ["service"])
INCIDENTS = Counter("guardian_incidents_total", "Incidents opened (service.down)", ["service"])
ESCALATIONS = Counter("guardian_escalations_total", "Escalations with a report", ["service"])
SERVICE_UP = Gauge("orchestrator_service_up", "1 while the service is up", ["service"])
CHECK_DURATION = Histogram(
    "guardian_health_check_duration_seconds",
    "Readiness probes of the watched services",
    ["service"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CHECKS = Counter(
    "guardian_health_checks_total", "Readiness probes by result (ok, failed)", ["service", "result"]
)
RECOVERY = Histogram(
    "guardian_recovery_duration_seconds",
    "From an incident's opening to its service ready again (service.recovered's downtime)",
    ["service"],
    buckets=(0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0),
)
LAST_CHECK = Gauge("guardian_last_check_timestamp", "Unix time of the last readiness probe")
DISK_FREE = Gauge("orchestrator_disk_free_bytes", "Free bytes on FLEET_HOME's disk")
IS_LEADER = Gauge("guardian_is_leader", "1 while this replica holds the leader lock")
EPOCH = Gauge("guardian_leader_epoch", "The epoch of this replica's leadership (0: standby)")
SMOKE_RUNS = Counter("guardian_smoke_runs_total", "Smoke canary runs by result", ["result"])
SMOKE_SECONDS = Histogram(
    "guardian_smoke_duration_seconds",
    "A smoke canary run, end to end",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
SMOKE_STEP_SECONDS = Gauge(
    "guardian_smoke_step_seconds",
    "The last run's time of each step (after the event: since it was published)",
    ["step", "service"],
)
SMOKE_LAST_SUCCESS = Gauge(
    "guardian_smoke_last_success_timestamp", "Unix time of the last passing smoke canary run"
)
for _result in ("passed", "failed"):  # both series exist from the start (alerts, rates)
    SMOKE_RUNS.labels(_result)


def utcnow() -> datetime:
    return datetime.now(UTC)


def tail(path: Path, lines: int, max_bytes: int = 4 << 20) -> list[str]:
    """The last `lines` lines of a file, reading at most its last `max_bytes`."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    return list(deque(text.splitlines(), maxlen=lines))


def host_stats(data_dir: Path) -> dict[str, Any]:
    """Free disk of the data directory, memory, uptime (Linux /proc; plain numbers in bytes
    and seconds, with the seed's human uptime beside)."""
    path = data_dir if data_dir.exists() else Path("/")
    disk = shutil.disk_usage(path)
    memory: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        info = dict(
            (k, int(v.split()[0]) * 1024)
            for k, _, v in (
                line.partition(":") for line in Path("/proc/meminfo").read_text().splitlines()
            )
            if v.strip()
        )
        memory = {"used": info["MemTotal"] - info["MemAvailable"], "total": info["MemTotal"]}
    uptime = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    return {
        "disk": {"path": str(path), "free": disk.free, "total": disk.total},
        "memory": memory,
        "uptime": human_duration(uptime),
        "uptime_seconds": round(uptime),
    }


class SupervisorClient:
    """guardian's end of `fleet up`'s restart channel (services/stack.py RestartChannel)."""

    def __init__(self, socket: Path, token_file: Path) -> None:
        self.socket = socket
        self.token_file = token_file
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            token = self.token_file.read_text().strip()
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                base_url="http://fleet-up",
                headers={"Authorization": f"Bearer {token}"},
                timeout=httpx.Timeout(10.0, read=40.0),
            )
        return self._client

    async def exits(self, after: int, wait: float) -> dict[str, Any]:
        r = await self.client().get("/exits", params={"after": after, "wait": wait})
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    async def restart(self, service: str, epoch: int, reason: str) -> int:
        r = await self.client().post(
            "/restart", json={"service": service, "epoch": epoch, "reason": reason}
        )
        if r.status_code == 409:
            raise db.StaleEpoch(r.json().get("detail", "stale epoch"))
        r.raise_for_status()
        pid: int = r.json()["pid"]
        return pid


class Guardian:
    def __init__(self, settings: GuardianSettings) -> None:
        self.settings = settings
        self.policy = settings.policy()
        self.watch = Watch(settings.guardian_services, self.policy, utcnow())
        self.canary = CanaryWatch()
        self.last_smoke: dict[str, Any] | None = None
        self._smoke_lock = asyncio.Lock()
        for name in [*settings.guardian_services, SMOKE]:  # series at 0 from the start
            for counter in (RESTARTS, INCIDENTS, ESCALATIONS):
                counter.labels(name)
        for name in settings.guardian_services:
            for result in ("ok", "failed"):
                CHECKS.labels(name, result)
        self.epoch: int | None = None  # set while this replica leads
        self.paused = False
        self._ticking = False  # the ticker has started once
        self.replicas: dict[str, datetime] = {}  # guardian instances by their last heartbeat
        self.last_probe: dict[str, dict[str, Any]] = {}
        self._queue: asyncio.Queue[Action] = asyncio.Queue()
        self.supervisor: SupervisorClient | None = None
        if settings.mode == "supervise":
            socket, token = (
                settings.guardian_supervisor_socket,
                settings.guardian_supervisor_token_file,
            )
            if socket is None or token is None:
                raise ValueError(
                    "GUARDIAN_MODE=supervise needs GUARDIAN_SUPERVISOR_SOCKET and "
                    "GUARDIAN_SUPERVISOR_TOKEN_FILE (fleet up sets them)"
                )
            self.supervisor = SupervisorClient(socket, token)

    @property
    def leader(self) -> bool:
        return self.epoch is not None

    def feed(self, actions: list[Action]) -> None:
        for action in actions:
            self._queue.put_nowait(action)

    # --- inputs --------------------------------------------------------------------------

    async def heartbeats(self, runtime: Service) -> None:
        async def on_beat(msg: Msg) -> None:
            try:
                beat = ServiceHeartbeat.model_validate_json(msg.data)
            except ValidationError:
                return
            now = utcnow()
            if beat.service == "guardian":
                self.replicas[beat.instance] = now
                return
            self.feed(
                self.watch.heartbeat(
                    beat.service, beat.instance, beat.started_at, beat.ready, beat.http_url, now
                )
            )

        sub = await runtime.nc.subscribe(ServiceHeartbeat.subject, cb=on_beat)
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def probes(self, runtime: Service) -> None:
        """Each watched service's /health/ready, on its own cadence (a hung one does not slow
        the others); where no URL is known, the newest heartbeat's ready flag is the sample."""
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per probe
        async with httpx.AsyncClient(timeout=self.settings.guardian_probe_timeout_s) as client:
            await asyncio.gather(*(self._probe_loop(client, s) for s in self.watch.services))

    async def _probe_loop(self, client: httpx.AsyncClient, service: str) -> None:
        while True:
            await self.probe_once(client, service)
            await asyncio.sleep(self.settings.guardian_probe_interval_s)

    def probe_url(self, service: str) -> str | None:
        url = self.settings.guardian_probe_urls.get(service)
        if url:
            return url
        watched = self.watch.services.get(service)
        instances = watched.instances.values() if watched else ()
        newest = max(instances, key=lambda i: i.last_seen_at, default=None)
        url = newest.http_url if newest else None
        # a service listening on every interface announces 0.0.0.0: not an address to call
        if url is None or urlsplit(url).hostname in ("0.0.0.0", "::"):
            return None
        return url

    async def probe_once(self, client: httpx.AsyncClient, service: str) -> None:
        url = self.probe_url(service)
        state = self.watch.services[service]
        if url is None:
            newest = max(state.instances.values(), key=lambda i: i.last_seen_at, default=None)
            if newest is not None:
                self.feed(self.watch.sample(service, newest.ready, "not ready", utcnow()))
            return
        t0 = time.perf_counter()
        try:
            r = await client.get(f"{url}/health/ready")
            ok, detail = r.status_code == 200, f"HTTP {r.status_code}"
        except httpx.TimeoutException:
            ok, detail = False, f"no answer in {self.settings.guardian_probe_timeout_s}s"
        except httpx.HTTPError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:300]
        took = time.perf_counter() - t0
        CHECK_DURATION.labels(service).observe(took)
        CHECKS.labels(service, "ok" if ok else "failed").inc()
        LAST_CHECK.set_to_current_time()
        self.last_probe[service] = {"ok": ok, "detail": detail, "seconds": round(took, 4)}
        self.feed(self.watch.sample(service, ok, detail, utcnow()))

    async def exits(self, runtime: Service) -> None:
        """fleet up tells of each process exit as it happens (a long poll); the first answer
        also says which processes are dead right now (guardian may start after a crash)."""
        if self.supervisor is None:
            return
        after: int | None = None
        while True:
            try:
                body = await self.supervisor.exits(after or 0, 0 if after is None else 25)
            except (httpx.HTTPError, OSError, ValueError) as exc:
                log.warning("fleet up's restart channel: %s", exc)
                await asyncio.sleep(1)
                continue
            now = utcnow()
            if after is None:
                for name, alive in body.get("alive", {}).items():
                    if not alive:
                        self.feed(self.watch.exited(name, None, now))
            else:
                for e in body["exits"]:
                    self.feed(self.watch.exited(e["service"], e["code"], now))
            after = int(body["last"])

    async def ticker(self, runtime: Service) -> None:
        """The clock of the watch; its first tick starts the start-up grace (services started
        with guardian are given time to come up from here, not from the spec's building)."""
        if not self._ticking:
            self._ticking = True
            self.watch.started_at = utcnow()
        while True:
            trusted = runtime.nc.is_connected
            self.feed(self.watch.tick(utcnow(), heartbeats_trusted=trusted))
            for name, s in self.watch.services.items():
                SERVICE_UP.labels(name).set(1 if s.status == "up" else 0)
            await asyncio.sleep(self.settings.guardian_tick_s)

    # --- leadership ----------------------------------------------------------------------

    async def leadership(self, runtime: Service) -> None:
        """Try the leader lock every poll; once held, take over, then watch the lock's
        connection and the operator's requests (pause, reset) stored in the database."""
        poll = self.settings.guardian_leader_poll_s
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await runtime.login.connect("guardian-leader")
                while not await db.try_leader_lock(conn):
                    await self.follow_requests(conn)
                    await asyncio.sleep(poll)
                epoch = await db.take_leadership(conn, runtime.instance)
                await self.become_leader(epoch, conn)
                while self.epoch == epoch:
                    await asyncio.sleep(poll)
                    await asyncio.wait_for(self.follow_requests(conn), timeout=max(poll * 4, 2))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("leadership: %s", exc)
            finally:
                self.step_down()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 1)
                    conn.terminate()
            await asyncio.sleep(poll)

    async def become_leader(self, epoch: int, conn: asyncpg.Connection) -> None:
        self.epoch = epoch
        IS_LEADER.set(1)
        EPOCH.set(epoch)
        self.paused = bool(await conn.fetchval("SELECT paused FROM leadership"))
        log.info("guardian leads with epoch %d", epoch, extra={"epoch": epoch})
        if not self.paused:
            await self.take_over(conn)

    async def take_over(self, conn: asyncpg.Connection) -> None:
        stored = await db.open_incidents(conn)
        held = await db.held_services(conn)
        self.canary.take_over(stored)
        self.feed(self.watch.take_over(stored, held, utcnow()))

    def step_down(self) -> None:
        if self.epoch is not None:
            log.warning("guardian no longer leads (epoch %d)", self.epoch)
        self.epoch = None
        IS_LEADER.set(0)
        EPOCH.set(0)
        self.watch.step_down()
        self.canary.step_down()
        while not self._queue.empty():  # a standby's decisions are not carried out
            self._queue.get_nowait()

    async def follow_requests(self, conn: asyncpg.Connection) -> None:
        """Operators' requests may reach any replica; they are stored, and the leader
        carries them out here."""
        paused, resets = await db.requests(conn)
        if self.epoch is None:
            self.paused = paused
            return
        if paused and not self.paused:
            self.paused = True
            self.watch.step_down()
            self.canary.step_down()
            log.warning("guardian paused: watching goes on, no action is taken")
        elif not paused and self.paused:
            self.paused = False
            await self.take_over(conn)
            log.warning("guardian resumed")
        for service, by in resets:
            if service in self.watch.services and not self.paused:
                self.feed(self.watch.reset(service, by, utcnow()))
            await db.clear_reset_request(conn, service)

    # --- carrying out ------------------------------------------------------------------

    async def executor(self, runtime: Service) -> None:
        while True:
            action = await self._queue.get()
            if self.epoch is None or self.paused:
                continue
            await self.perform(runtime, action, self.epoch)

    async def perform(self, runtime: Service, action: Action, epoch: int) -> None:
        try:
            if isinstance(action, Escalated):
                await self.escalate(runtime, action, epoch)
                return
            async with runtime.transaction() as conn:
                await db.check_epoch(conn, epoch)
                await db.record(conn, action, epoch)
                event = self.event_of(action)
                if event is not None:
                    await outbox.add(conn, [event])
            self.log_action(action)
            if isinstance(action, RestartRequested):
                await self.restart(action, epoch)
        except db.StaleEpoch as exc:
            log.warning("action refused: %s", exc)
            self.epoch = None  # the leadership loop sees it and steps down
        except Exception:
            log.exception("could not carry out %s of %s", action.kind, action.service)

    async def restart(self, action: RestartRequested, epoch: int) -> None:
        RESTARTS.labels(action.service).inc()
        assert self.supervisor is not None
        try:
            pid = await self.supervisor.restart(action.service, epoch, action.reason)
            log.info("%s restarted (pid %d)", action.service, pid, extra={"epoch": epoch})
        except db.StaleEpoch:
            raise
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            detail = f"{type(exc).__name__}: {exc}"[:500]
            self.feed(self.watch.restart_failed(action.service, action.attempt, detail, utcnow()))

    def event_of(self, action: Action) -> Event | None:
        incident = action.incident_id
        if isinstance(action, WentDown):
            INCIDENTS.labels(action.service).inc()
            return ServiceDown(
                event_id=uuid.uuid5(incident or uuid.UUID(int=0), "service.down"),
                service=action.service,
                reason=action.reason,
                last_seen_at=action.last_seen_at,
                incident_id=incident,
            )
        if isinstance(action, Recovered):
            RECOVERY.labels(action.service).observe(action.downtime_s)
            return ServiceRecovered(
                event_id=uuid.uuid5(incident or uuid.UUID(int=0), "service.recovered"),
                service=action.service,
                down_since=action.down_since,
                downtime_seconds=action.downtime_s,
                restarts=action.restarts,
                incident_id=incident,
            )
        return None

    def log_action(self, action: Action) -> None:
        extra = {"guardian_service": action.service, "kind": action.kind, **action.detail()}
        if isinstance(action, WentDown | Reminded):
            log.warning("%s %s", action.service, action.kind, extra=extra)
        elif isinstance(action, RestartRequested | RestartObserved | AttemptFinished):
            if isinstance(action, RestartObserved):
                RESTARTS.labels(action.service).inc()
            log.warning("%s %s", action.service, action.kind, extra=extra)
        else:
            log.info("%s %s", action.service, action.kind, extra=extra)

    async def escalate(self, runtime: Service, action: Escalated, epoch: int) -> None:
        assert action.incident_id is not None
        incident = action.incident_id
        logs = self.settings.fleet_home.resolve() / "logs" / f"{action.service}.log"
        lines = tail(logs, self.settings.guardian_log_lines)
        source = str(logs) if lines else f"{logs} (absent: under an orchestrator read its logs)"
        opened = self.watch.services[action.service].incident
        report = render_report(
            service=action.service,
            at=action.at,
            reason=action.reason,
            incident_id=incident,
            opened_at=opened.opened_at if opened else action.at,
            attempts=action.attempts,
            log_lines=lines,
            log_source=source,
            health=await self.health(runtime),
            dead_letters=await self.dead_letters(runtime),
        )
        async with runtime.transaction() as conn:
            await db.check_epoch(conn, epoch)
            await db.record(conn, action, epoch)
            path = self.write_report(action.at, report)
            await db.save_report(conn, incident, action.at, path.name, report)
            await outbox.add(
                conn,
                [
                    ServiceEscalated(
                        event_id=uuid.uuid5(incident, "service.escalated"),
                        service=action.service,
                        restarts=len(action.attempts),
                        reason=action.reason,
                        report=report,
                        report_name=path.name,
                        incident_id=incident,
                    )
                ],
            )
        ESCALATIONS.labels(action.service).inc()
        log.error(
            "%s escalated: %s; report %s",
            action.service,
            action.reason,
            path,
            extra={"guardian_service": action.service, "incident_id": str(incident)},
        )

    def write_report(self, at: datetime, report: str) -> Path:
        """FLEET_HOME/reports/BUG-YYYYMMDD-HHMM.md; a second one within the minute gets -2."""
        folder = self.settings.fleet_home.resolve() / "reports"
        folder.mkdir(parents=True, exist_ok=True)
        name = report_name(at)
        for n in range(1, 1000):
            path = folder / (name if n == 1 else name.replace(".md", f"-{n}.md"))
            try:
                with path.open("x", encoding="utf-8") as out:
                    out.write(report)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"too many reports named {name} in {folder}")

    async def dead_letters(self, runtime: Service, count: int = 10) -> list[dict[str, Any]]:
        """The newest messages of the DEADLETTER stream, with the reason from their headers."""
        js = runtime.js
        found: list[dict[str, Any]] = []
        try:
            info = await asyncio.wait_for(js.stream_info(DEAD_LETTER_STREAM.name), 2)
            last, first = info.state.last_seq, info.state.first_seq
            for seq in range(last, max(first, last - count + 1) - 1, -1):
                with contextlib.suppress(Exception):
                    msg = await asyncio.wait_for(js.get_msg(DEAD_LETTER_STREAM.name, seq), 2)
                    headers = msg.headers or {}
                    found.append(
                        {
                            "subject": msg.subject,
                            "seq": seq,
                            "time": getattr(msg, "time", None),
                            "reason": headers.get("Fleet-Dead-Reason", ""),
                        }
                    )
        except Exception as exc:
            found.append({"subject": "(unavailable)", "seq": None, "reason": str(exc)[:200]})
        return found

    # --- the smoke canary --------------------------------------------------------------

    async def smoke_schedule(self, runtime: Service) -> None:
        """The leader runs the canary every GUARDIAN_SMOKE_INTERVAL_S (standbys do not: one
        run per interval for the fleet)."""
        interval = self.settings.guardian_smoke_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if self.leader and not self.paused:
                await self.run_smoke(runtime, "schedule", None)

    async def run_smoke(self, runtime: Service, trigger: str, by: str | None) -> dict[str, Any]:
        """One canary run (one at a time per replica), stored; a failure opens the `smoke`
        incident and the next passing run closes it (the leader's to act on)."""
        async with self._smoke_lock:
            started_at, t0 = utcnow(), time.perf_counter()
            steps = await Canary(self.settings, runtime, self.probe_url).run()
            took = time.perf_counter() - t0
            ok, reason = smoke_verdict(steps)
            finished_at = utcnow()
            run: dict[str, Any] = {
                "run_id": uuid.uuid4(),
                "started_at": started_at,
                "finished_at": finished_at,
                "trigger": trigger,
                "requested_by": by,
                "instance": runtime.instance,
                "ok": ok,
                "seconds": round(took, 4),
                "steps": [step.__dict__ for step in steps],
                "reason": reason or None,
            }
            SMOKE_RUNS.labels("passed" if ok else "failed").inc()
            SMOKE_SECONDS.observe(took)
            for step in steps:
                SMOKE_STEP_SECONDS.labels(step.step, step.service).set(step.seconds)
            if ok:
                SMOKE_LAST_SUCCESS.set_to_current_time()
            async with runtime.pool.acquire() as conn:
                await db.save_smoke_run(conn, run)
            self.last_smoke = run
            if self.leader and not self.paused:
                self.feed(self.canary.result(ok, reason, finished_at))
            log_at = logging.INFO if ok else logging.ERROR
            log.log(
                log_at,
                "smoke canary %s in %.2fs%s",
                "passed" if ok else "failed",
                took,
                f": {reason}" if reason else "",
                extra={"trigger": trigger},
            )
            return run

    # --- what users read ---------------------------------------------------------------

    async def health(self, runtime: Service) -> dict[str, Any]:
        """The seed's /api/health body."""
        t0 = time.perf_counter()
        checks = await runtime.readiness()
        took = round(time.perf_counter() - t0, 4)
        nats_ok, pg_ok = checks.get("nats") == "ok", checks.get("postgres") == "ok"
        system = host_stats(self.settings.fleet_home.resolve())
        DISK_FREE.set(system["disk"]["free"])
        services: dict[str, Any] = {}
        for name, s in self.watch.services.items():
            services[name] = {
                "status": s.status,
                "instances": len(s.instances),
                "last_seen": s.last_seen_at.isoformat() if s.last_seen_at else None,
                "restarts": s.restarts,
                "reason": s.reason or None,
                "held": s.held,
                "probe": self.last_probe.get(name),
            }
        disk_low = system["disk"]["free"] < self.settings.guardian_min_free_disk_bytes
        status = overall_status(
            {n: s.status for n, s in self.watch.services.items()}, nats_ok, pg_ok, disk_low
        )
        return {
            "status": status,
            "timestamp": utcnow().isoformat(),
            "services": services,
            "nats": {"status": "ok" if nats_ok else "down", "detail": checks.get("nats")},
            "postgres": {"status": "ok" if pg_ok else "down", "detail": checks.get("postgres")},
            "checks_took_s": took,
            "system": system,
        }

    async def status(self, runtime: Service) -> dict[str, Any]:
        leadership: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            async with runtime.pool.acquire() as conn:
                leadership = await db.leadership(conn)
        now = utcnow()
        return {
            "instance": runtime.instance,
            "mode": self.policy.mode,
            "leader": self.leader,
            "epoch": self.epoch,
            "leadership": leadership,
            "paused": self.paused,
            "watching_since": self.watch.started_at.isoformat(),
            "replicas": {
                name: round((now - seen).total_seconds(), 1)
                for name, seen in self.replicas.items()
                if (now - seen).total_seconds() < 60
            },
            "services": {
                name: {
                    "status": s.status,
                    "since": s.changed_at.isoformat() if s.changed_at else None,
                    "reason": s.reason or None,
                    "instances": sorted(s.instances),
                    "restarts": s.restarts,
                    "held": s.held,
                    "exited": s.exited,
                    "incident": str(s.incident.incident_id) if s.incident else None,
                }
                for name, s in self.watch.services.items()
            },
            "policy": self.policy.__dict__,
        }
