"""Every SQL statement of benchmark."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import astuple, fields
from typing import Any

import asyncpg

from contracts.events import BenchmarkRequested, BenchmarkSummary, ModelSynced
from services.benchmark.domain import CatalogPrice, RunResult
from services.runtime.db import Connection

RUN_COLUMNS = tuple(f.name for f in fields(RunResult))
JOB_REQUEST_COLUMNS = (
    "job_id, provider, model, task_type, prompt, runs, warmup_runs, concurrency, max_tokens,"
    " timeout_s"
)


# --- prices ------------------------------------------------------------------------------


async def upsert_prices(conn: Connection, events: Sequence[ModelSynced]) -> None:
    """Apply catalog changes in the order they happened; an event older than what the
    table holds changes nothing. A removal keeps the last known price."""
    await conn.executemany(
        """
        INSERT INTO model_prices AS m (provider, model_id, name, status, prompt_price_per_1m,
            completion_price_per_1m, variable_price, synced_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (provider, model_id) DO UPDATE SET
            name = EXCLUDED.name,
            status = EXCLUDED.status,
            prompt_price_per_1m = CASE WHEN $9 THEN m.prompt_price_per_1m
                                       ELSE EXCLUDED.prompt_price_per_1m END,
            completion_price_per_1m = CASE WHEN $9 THEN m.completion_price_per_1m
                                           ELSE EXCLUDED.completion_price_per_1m END,
            variable_price = CASE WHEN $9 THEN m.variable_price
                                  ELSE EXCLUDED.variable_price END,
            synced_at = EXCLUDED.synced_at,
            updated_at = now()
        WHERE m.synced_at <= EXCLUDED.synced_at
        """,
        [
            (
                e.provider,
                e.model_id,
                e.name,
                e.status,
                e.prompt_price_per_1m,
                e.completion_price_per_1m,
                e.variable_price,
                e.occurred_at,
                e.change == "removed",
            )
            for e in sorted(events, key=lambda e: e.occurred_at)
        ],
    )


async def catalog_prices(conn: Connection, model_ids: Sequence[str]) -> list[CatalogPrice]:
    rows = await conn.fetch(
        "SELECT provider, model_id, prompt_price_per_1m, completion_price_per_1m, variable_price"
        " FROM model_prices WHERE model_id = ANY($1::text[])",
        list(model_ids),
    )
    return [CatalogPrice(*r) for r in rows]


# --- jobs --------------------------------------------------------------------------------


async def insert_job(conn: Connection, job: BenchmarkRequested) -> bool:
    """Store a new queued job; False when the id is taken."""
    status = await conn.execute(
        f"INSERT INTO jobs ({JOB_REQUEST_COLUMNS}, status, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'queued', $11)"
        " ON CONFLICT (job_id) DO NOTHING",
        job.job_id,
        job.provider,
        job.model,
        job.task_type,
        job.prompt,
        job.runs,
        job.warmup_runs,
        job.concurrency,
        job.max_tokens,
        job.timeout_s,
        job.occurred_at,
    )
    return bool(status == "INSERT 0 1")


async def claim_job(conn: Connection, job_id: uuid.UUID, worker: str) -> asyncpg.Record | None:
    """Take a queued job, or a running one whose worker stopped (its message came back):
    the attempt goes up, so the previous holder can no longer write. None when the job is
    finished (or unknown)."""
    return await conn.fetchrow(
        "UPDATE jobs SET status = 'running', attempt = attempt + 1, worker = $2,"
        " started_at = now() WHERE job_id = $1 AND status IN ('queued', 'running')"
        f" RETURNING attempt, {JOB_REQUEST_COLUMNS}, created_at AS occurred_at",
        job_id,
        worker,
    )


def _run_row(job_id: uuid.UUID, attempt: int, result: RunResult) -> tuple[Any, ...]:
    return (job_id, attempt, *astuple(result))


_RUN_VALUES = ", ".join(f"${i}" for i in range(1, len(RUN_COLUMNS) + 3))
_INSERT_RUN = (
    f"INSERT INTO job_runs (job_id, attempt, {', '.join(RUN_COLUMNS)}) VALUES ({_RUN_VALUES})"
    " ON CONFLICT (job_id, attempt, run_index) DO NOTHING"
)


async def add_run(conn: Connection, job_id: uuid.UUID, attempt: int, result: RunResult) -> bool:
    """Record one run as it finishes (progress); only while `attempt` holds the job."""
    async with conn.transaction():
        holds = await conn.fetchval(
            "SELECT 1 FROM jobs WHERE job_id = $1 AND attempt = $2 AND status = 'running'"
            " FOR SHARE",
            job_id,
            attempt,
        )
        if holds:
            await conn.execute(_INSERT_RUN, *_run_row(job_id, attempt, result))
    return bool(holds)


async def finish_job(
    conn: Connection,
    job_id: uuid.UUID,
    attempt: int,
    status: str,
    summary: BenchmarkSummary | None,
    error: str | None,
    results: Sequence[RunResult] = (),
) -> bool:
    """Write the final state, only if `attempt` still holds the running job; False when
    another worker took it over or it ended already."""
    finished = await conn.fetchval(
        "UPDATE jobs SET status = $3, summary = $4, error = $5, finished_at = now()"
        " WHERE job_id = $1 AND attempt = $2 AND status = 'running' RETURNING true",
        job_id,
        attempt,
        status,
        summary.model_dump(mode="json") if summary else None,
        error,
    )
    if finished and results:
        await conn.executemany(_INSERT_RUN, [_run_row(job_id, attempt, r) for r in results])
    return bool(finished)


async def job(conn: Connection, job_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)


async def job_runs(conn: Connection, job_id: uuid.UUID, attempt: int) -> list[RunResult]:
    rows = await conn.fetch(
        f"SELECT {', '.join(RUN_COLUMNS)} FROM job_runs WHERE job_id = $1 AND attempt = $2"
        " ORDER BY run_index",
        job_id,
        attempt,
    )
    return [RunResult(**dict(r)) for r in rows]


async def list_jobs(
    conn: Connection, model: str | None, status: str | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT job_id, provider, model, task_type, runs, status, attempt, error, summary,"
        " created_at, started_at, finished_at FROM jobs"
        " WHERE ($1::text IS NULL OR model = $1) AND ($2::text IS NULL OR status = $2)"
        " ORDER BY created_at DESC LIMIT $3",
        model,
        status,
        limit,
    )


async def latest_results(conn: Connection, model: str) -> list[asyncpg.Record]:
    """The latest completed job of `model` for each provider and task type."""
    return await conn.fetch(
        "SELECT DISTINCT ON (provider, task_type) job_id, provider, task_type, runs, summary,"
        " finished_at FROM jobs WHERE model = $1 AND status = 'completed'"
        " ORDER BY provider, task_type, finished_at DESC",
        model,
    )


async def delete_jobs_created_before(conn: Connection, days: float) -> int:
    """Delete jobs created more than `days` ago, except those a worker is running."""
    status = await conn.execute(
        "DELETE FROM jobs WHERE created_at < now() - make_interval(secs => $1)"
        " AND status <> 'running'",
        days * 86400,
    )
    return int(status.split()[-1])
