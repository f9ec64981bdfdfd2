"""The work of sync: OpenRouter catalog runs and Ollama discovery passes. Each reads the
stored catalog, decides (domain.py) and writes its changes and their events in one
transaction; events leave only through the outbox."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from prometheus_client import Counter, Gauge

from contracts.events import SyncCompleted
from services.runtime import outbox
from services.runtime.db import Connection
from services.runtime.service import Runtime
from services.sync import db
from services.sync.clients import check_device, describe, fetch_catalog
from services.sync.config import SyncSettings
from services.sync.db import RunCounts
from services.sync.domain import (
    OLLAMA,
    OPENROUTER,
    DiscoveryOutcome,
    SelectionRules,
    change_counts,
    diff,
    discovery_outcome,
    model_synced,
    parse_catalog,
    select,
)

log = logging.getLogger(__name__)

RUNS = Counter("sync_runs_total", "OpenRouter catalog runs by outcome", ["status"])
CATALOG_MODELS = Gauge(
    "sync_catalog_models", "Models in the catalog by provider and status", ["provider", "status"]
)
DEVICE_UP = Gauge("sync_device_up", "1 when an Ollama device answered its last check", ["device"])


class _LastSuccess:
    at: float | None = None  # unix time of the last successful (or not-modified) run


LAST_SUCCESS = _LastSuccess()
SECONDS_SINCE_SUCCESS = Gauge(
    "sync_seconds_since_last_success",
    "Seconds since the last OpenRouter run that succeeded or found nothing new (NaN: never)",
)
SECONDS_SINCE_SUCCESS.set_function(
    lambda: time.time() - LAST_SUCCESS.at if LAST_SUCCESS.at is not None else math.nan
)


async def refresh_metrics(conn: Connection) -> None:
    for provider in (OPENROUTER, OLLAMA):
        for status in ("active", "removed", "unavailable"):
            CATALOG_MODELS.labels(provider, status).set(0)
    for r in await db.provider_counts(conn):
        CATALOG_MODELS.labels(r["provider"], r["status"]).set(r["count"])
    if LAST_SUCCESS.at is None and (at := await db.last_success_at(conn)):
        LAST_SUCCESS.at = at.timestamp()


def selection_rules(settings: SyncSettings) -> SelectionRules:
    return SelectionRules(
        max_price_per_1m=settings.openrouter_max_price_per_1m,
        top_n=settings.openrouter_top_n,
        rank_by=settings.openrouter_rank_by,
        include_variable_price=settings.openrouter_include_variable_price,
    )


def _completed(
    run_id: uuid.UUID, status: str, counts: RunCounts, error: str | None = None
) -> SyncCompleted:
    return SyncCompleted.model_validate(
        dict(
            event_id=uuid.uuid5(run_id, "sync.completed"),
            run_id=run_id,
            status=status,
            fetched=counts.fetched,
            filtered=counts.filtered,
            selected=counts.selected,
            added=counts.added,
            changed=counts.changed,
            removed=counts.removed,
            error=error,
        )
    )


async def apply_catalog(
    conn: Connection,
    run_id: uuid.UUID,
    body: bytes,
    rules: SelectionRules,
    etag: str | None = None,
) -> RunCounts:
    """Parse, filter, rank, and write what changed with its events and the finished run, in
    one transaction. A body that is not the catalog raises before anything is written."""
    parsed = parse_catalog(body)
    log.info("fetched %d models from OpenRouter", parsed.fetched)
    if parsed.skipped:
        log.warning(
            "skipped %d OpenRouter entries that cannot be read: %s",
            len(parsed.skipped),
            "; ".join(f"{s.model_id}: {s.reason}" for s in parsed.skipped[:5]),
        )
    filtered, selected = select(parsed.models, rules)
    log.info("filtered to %d models (price <= %s)", len(filtered), f"{rules.max_price_per_1m:.2f}")
    log.info("selected top %d models", len(selected))
    async with conn.transaction():
        current = (await db.stored_models(conn, OPENROUTER)).get(None, {})
        changes = diff(current, selected)
        told = change_counts(changes)
        counts = RunCounts(
            fetched=parsed.fetched,
            filtered=len(filtered),
            selected=len(selected),
            added=told["added"],
            changed=told["changed"],
            removed=told["removed"],
            skipped=len(parsed.skipped),
        )
        await db.write_models(conn, changes)
        await db.add_price_history(conn, changes, run_id)
        await db.finish_run(conn, run_id, "succeeded", counts, etag=etag, selection=rules.key)
        await outbox.add(
            conn, [*model_synced(changes, run_id), _completed(run_id, "succeeded", counts)]
        )
    log.info(
        "synced %d/%d models",
        len(selected),
        len(selected),
        extra={"run_id": str(run_id), "rows_written": len(changes), **dict(told.items())},
    )
    return counts


INTERRUPTED = "interrupted: the service stopped during the run"


class SyncInProgress(Exception):
    def __init__(self, run_id: uuid.UUID | None) -> None:
        super().__init__("an OpenRouter sync is already running")
        self.run_id = run_id


@dataclass
class ActiveRun:
    """A run that holds the run lock, on the connection that holds it."""

    run_id: uuid.UUID
    trigger: str
    pool: asyncpg.Pool
    conn: PoolConnectionProxy

    async def release(self) -> None:
        # the pool resets a returned connection, which lets go of its advisory locks
        await self.pool.release(self.conn)


class CatalogSync:
    """OpenRouter catalog runs, on a schedule and on request. Runs never overlap, across
    every instance: a run holds a PostgreSQL advisory lock from its record's creation to its
    end, and a run record left `running` by a dead process is failed by the next run."""

    def __init__(self, settings: SyncSettings) -> None:
        self.settings = settings
        self.rules = selection_rules(settings)
        self._requested: asyncio.Queue[ActiveRun] = asyncio.Queue()
        self._due: float | None = None  # loop time of the next scheduled run

    async def begin(self, pool: asyncpg.Pool, trigger: str) -> ActiveRun | None:
        """Take the run lock and record a new run; None when another run holds the lock."""
        active = ActiveRun(uuid.uuid4(), trigger, pool, await pool.acquire())
        try:
            if not await db.try_lock_runs(active.conn):
                await active.release()
                return None
            async with active.conn.transaction():
                stale = await db.interrupt_running_runs(active.conn, INTERRUPTED)
                await outbox.add(
                    active.conn, [_completed(r, "failed", RunCounts(), INTERRUPTED) for r in stale]
                )
                await db.insert_run(active.conn, active.run_id, trigger)
        except BaseException:
            await active.release()
            raise
        return active

    async def request_run(self, pool: asyncpg.Pool) -> uuid.UUID:
        """Start a run now (the schedule loop carries it out); raises SyncInProgress."""
        active = await self.begin(pool, "api")
        if active is None:
            async with pool.acquire() as conn:
                raise SyncInProgress(await db.running_run(conn))
        self._requested.put_nowait(active)
        return active.run_id

    async def execute(self, active: ActiveRun) -> None:
        """Carry out a begun run; whatever fails, the run is recorded and the lock let go."""
        try:
            await self._fetch_and_apply(active)
        except Exception as exc:
            await self._fail(active, exc)
        else:
            with contextlib.suppress(Exception):  # metrics must not fail a finished run
                await refresh_metrics(active.conn)
        finally:
            await active.release()

    async def _fetch_and_apply(self, active: ActiveRun) -> None:
        conn, run_id = active.conn, active.run_id
        good = await db.last_good_run(conn)
        # a 304 says the response is the same, not that the kept set is: trust it only when
        # the catalog was built by the rules in force now
        etag = good["etag"] if good and good["selection"] == self.rules.key else None
        response = await fetch_catalog(self.settings, etag)
        if response.not_modified:
            log.info("OpenRouter catalog not modified since the last run", extra={"etag": etag})
            async with conn.transaction():
                await db.finish_run(
                    conn, run_id, "not_modified", RunCounts(), etag=etag, selection=self.rules.key
                )
                await outbox.add(conn, [_completed(run_id, "not_modified", RunCounts())])
            status = "not_modified"
        else:
            await apply_catalog(conn, run_id, response.body, self.rules, response.etag)
            status = "succeeded"
        RUNS.labels(status).inc()
        LAST_SUCCESS.at = time.time()

    async def _fail(self, active: ActiveRun, exc: Exception) -> None:
        error = describe(exc)
        RUNS.labels("failed").inc()
        log.error(
            "OpenRouter sync failed, the catalog is unchanged: %s",
            error,
            extra={"run_id": str(active.run_id)},
        )
        try:
            async with active.conn.transaction():
                await db.finish_run(active.conn, active.run_id, "failed", RunCounts(), error=error)
                await outbox.add(
                    active.conn, [_completed(active.run_id, "failed", RunCounts(), error)]
                )
        except Exception:  # the next run fails this record as interrupted
            log.exception("could not record the failure of run %s", active.run_id)

    async def openrouter_loop(self, runtime: Runtime) -> None:
        """Runs every OPENROUTER_SYNC_INTERVAL hours (and at start when asked), and every
        run requested through the API."""
        s = self.settings
        loop = asyncio.get_running_loop()
        interval = s.openrouter_sync_interval * 3600
        trigger = "schedule"
        if self._due is None:  # first start, not a restart after a crash
            log.info("OpenRouter sync started (interval=%gh)", s.openrouter_sync_interval)
            self._due = loop.time() + (0 if s.openrouter_sync_on_startup else interval)
            if s.openrouter_sync_on_startup:
                trigger = "startup"
                log.info("running initial OpenRouter sync")
        async with runtime.pool.acquire() as conn:
            await refresh_metrics(conn)
        try:
            while True:
                active: ActiveRun | None = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(self._due):
                        active = await self._requested.get()
                if active is None:
                    self._due = loop.time() + interval
                    try:
                        active = await self.begin(runtime.pool, trigger)
                    except (asyncpg.PostgresError, OSError) as exc:
                        log.warning("scheduled OpenRouter sync could not start: %s", exc)
                        self._due = loop.time() + min(interval, 60)
                        continue
                    trigger = "schedule"
                    if active is None:
                        log.info("scheduled OpenRouter sync skipped: a run is in progress")
                        continue
                await self.execute(active)
        finally:
            while not self._requested.empty():
                await self._requested.get_nowait().release()


class DeviceDiscovery:
    """Checks every configured Ollama device; passes never overlap (a lock in this process,
    an advisory lock across instances)."""

    def __init__(self, settings: SyncSettings) -> None:
        self.settings = settings
        self._lock = asyncio.Lock()

    async def discovery_loop(self, runtime: Runtime) -> None:
        log.info(
            "Ollama discovery started (%d devices, interval=%gs)",
            len(self.settings.ollama_devices),
            self.settings.ollama_discovery_interval,
        )
        while True:
            await self.run(runtime.pool)
            await asyncio.sleep(self.settings.ollama_discovery_interval)

    async def run(self, pool: asyncpg.Pool) -> DiscoveryOutcome:
        s = self.settings
        async with self._lock:
            checks = await asyncio.gather(
                *(check_device(n, url, s.ollama_timeout_s) for n, url in s.ollama_devices.items())
            )
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await db.lock_discovery(conn)
                    stored = await db.stored_models(conn, OLLAMA)
                    outcome = discovery_outcome(
                        await db.device_status(conn),
                        {d: m for d, m in stored.items() if d is not None},
                        checks,
                        uuid.uuid4(),
                    )
                    await db.write_devices(conn, checks)
                    await db.forget_devices(conn, outcome.forgotten)
                    await db.write_models(conn, outcome.changes)
                    await db.add_price_history(conn, outcome.changes, None)
                    await outbox.add(conn, outcome.events)
                if outcome.changes:
                    await refresh_metrics(conn)
        for check in outcome.transitions:
            if check.error:
                log.warning(
                    "device %s (%s) offline: %s; its models are unavailable",
                    check.device,
                    check.base_url,
                    check.error,
                )
            else:
                log.info(
                    "device %s (%s) online: Ollama %s, %d models",
                    check.device,
                    check.base_url,
                    check.version,
                    len(check.models),
                )
        for check in checks:
            DEVICE_UP.labels(check.device).set(0 if check.error else 1)
        for device in outcome.forgotten:
            log.info("device %s is no longer configured; its models are removed", device)
            with contextlib.suppress(KeyError):
                DEVICE_UP.remove(device)
        return outcome
