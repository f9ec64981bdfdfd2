"""OpenRouter catalog runs, on a schedule and on request: fetch, then read the stored
catalog, decide (domain.py) and write the changes with their events and the finished run in
one transaction; events leave only through the outbox. No message comes in here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from opentelemetry import trace

from contracts.events import SyncCompleted, SyncCounts, plain_decimal
from services.runtime import outbox
from services.runtime.db import Connection
from services.runtime.service import Runtime
from services.sync import db
from services.sync.clients import describe, fetch_catalog
from services.sync.config import SyncSettings
from services.sync.domain import (
    OPENROUTER,
    SelectionRules,
    change_counts,
    diff,
    model_synced,
    parse_catalog,
    select,
)
from services.sync.metrics import LAST_SUCCESS, RUNS, refresh_metrics

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


def selection_rules(settings: SyncSettings) -> SelectionRules:
    return SelectionRules(
        max_price_per_1m=settings.openrouter_max_price_per_1m,
        top_n=settings.openrouter_top_n,
        rank_by=settings.openrouter_rank_by,
        include_variable_price=settings.openrouter_include_variable_price,
        output_modalities=settings.openrouter_output_modalities,
    )


def _completed(
    run_id: uuid.UUID, status: str, counts: SyncCounts, error: str | None = None
) -> SyncCompleted:
    return SyncCompleted.model_validate(
        dict(
            counts.model_dump(),
            event_id=uuid.uuid5(run_id, "sync.completed"),
            run_id=run_id,
            status=status,
            error=error,
        )
    )


async def apply_catalog(
    conn: Connection,
    run_id: uuid.UUID,
    body: bytes,
    rules: SelectionRules,
    etag: str | None = None,
) -> SyncCounts:
    """Parse, filter, rank, and write what changed with its events and the finished run, in
    one transaction. A body that is not the catalog raises before anything is written."""
    parsed = parse_catalog(body)
    run = {"run_id": str(run_id)}
    log.info("fetched %d models from OpenRouter", parsed.fetched, extra=run)
    if parsed.skipped:
        log.warning(
            "skipped %d OpenRouter entries that cannot be read: %s",
            len(parsed.skipped),
            "; ".join(f"{s.model_id}: {s.reason}" for s in parsed.skipped[:5]),
            extra=run,
        )
    filtered, selected = select(parsed.models, rules)
    log.info(
        "%d of %d models output only %s and are within the price cap (%s USD per 1M)",
        len(filtered),
        len(parsed.models),
        "+".join(sorted(rules.output_modalities)),
        plain_decimal(rules.max_price_per_1m),
        extra=run,
    )
    async with conn.transaction():
        current = (await db.stored_models(conn, OPENROUTER)).get(None, {})
        changes = diff(current, selected)
        told = change_counts(changes)
        counts = SyncCounts(
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
        "kept the top %d of %d eligible models (OPENROUTER_TOP_N=%d): %d added, %d changed, "
        "%d removed",
        len(selected),
        len(filtered),
        rules.top_n,
        told["added"],
        told["changed"],
        told["removed"],
        extra={"run_id": str(run_id), "rows_written": len(changes)},
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
                    active.conn, [_completed(r, "failed", SyncCounts(), INTERRUPTED) for r in stale]
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
        """Carry out a begun run; whatever fails, the run is recorded and the lock let go.
        A run is a trace of its own: its log lines and its events carry the run's trace id."""
        run = {"run_id": str(active.run_id), "trigger": active.trigger}
        with tracer.start_as_current_span("sync run", attributes=run):
            log.info(
                "OpenRouter sync run %s started (%s)", active.run_id, active.trigger, extra=run
            )
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
            log.info(
                "OpenRouter catalog not modified since the last run",
                extra={"etag": etag, "run_id": str(run_id)},
            )
            async with conn.transaction():
                await db.finish_run(
                    conn, run_id, "not_modified", SyncCounts(), etag=etag, selection=self.rules.key
                )
                await outbox.add(conn, [_completed(run_id, "not_modified", SyncCounts())])
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
                await db.finish_run(active.conn, active.run_id, "failed", SyncCounts(), error=error)
                await outbox.add(
                    active.conn, [_completed(active.run_id, "failed", SyncCounts(), error)]
                )
        except Exception:  # the next run fails this record as interrupted
            log.exception("could not record the failure of run %s", active.run_id)

    async def openrouter_loop(self, runtime: Runtime[SyncSettings]) -> None:
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
