"""Every SQL statement of benchmark."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import astuple, fields
from decimal import Decimal
from typing import Any

import asyncpg

from contracts.events import BenchmarkRequested, BenchmarkSummary, ModelSynced
from services.benchmark.domain import CatalogPrice, RunResult, Tier
from services.runtime.db import Connection

RUN_COLUMNS = tuple(f.name for f in fields(RunResult))
JOB_REQUEST_COLUMNS = (
    "job_id, provider, model, task_type, prompt, runs, warmup_runs, concurrency, max_tokens,"
    " timeout_s"
)


# --- prices ------------------------------------------------------------------------------


def _highest(base: Decimal | None, tiers: Sequence[Decimal]) -> Decimal | None:
    return None if base is None else max([base, *tiers])


async def upsert_prices(conn: Connection, events: Sequence[ModelSynced]) -> None:
    """Apply catalog changes in the order they happened; an event older than what the
    table holds changes nothing. A removal keeps the last known price."""
    await conn.executemany(
        """
        INSERT INTO model_prices AS m (provider, model_id, name, status, prompt_price_per_1m,
            completion_price_per_1m, variable_price, synced_at, highest_prompt_price_per_1m,
            highest_completion_price_per_1m, priced_per_token, price_tiers)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $10, $11, $12, $13::jsonb)
        ON CONFLICT (provider, model_id) DO UPDATE SET
            name = EXCLUDED.name,
            status = EXCLUDED.status,
            prompt_price_per_1m = CASE WHEN $9 THEN m.prompt_price_per_1m
                                       ELSE EXCLUDED.prompt_price_per_1m END,
            completion_price_per_1m = CASE WHEN $9 THEN m.completion_price_per_1m
                                           ELSE EXCLUDED.completion_price_per_1m END,
            variable_price = CASE WHEN $9 THEN m.variable_price
                                  ELSE EXCLUDED.variable_price END,
            highest_prompt_price_per_1m = CASE WHEN $9 THEN m.highest_prompt_price_per_1m
                                   ELSE EXCLUDED.highest_prompt_price_per_1m END,
            highest_completion_price_per_1m = CASE WHEN $9
                                   THEN m.highest_completion_price_per_1m
                                   ELSE EXCLUDED.highest_completion_price_per_1m END,
            priced_per_token = CASE WHEN $9 THEN m.priced_per_token
                                    ELSE EXCLUDED.priced_per_token END,
            price_tiers = CASE WHEN $9 THEN m.price_tiers ELSE EXCLUDED.price_tiers END,
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
                _highest(e.prompt_price_per_1m, [t.prompt_price_per_1m for t in e.price_tiers]),
                _highest(
                    e.completion_price_per_1m, [t.completion_price_per_1m for t in e.price_tiers]
                ),
                not e.unit_prices and "text" in e.output_modalities,
                [  # jsonb (the pool's codec), prices as plain decimal strings
                    {
                        "min_prompt_tokens": t.min_prompt_tokens,
                        "prompt_price_per_1m": f"{t.prompt_price_per_1m:f}",
                        "completion_price_per_1m": f"{t.completion_price_per_1m:f}",
                    }
                    for t in e.price_tiers
                ],
            )
            for e in sorted(events, key=lambda e: e.occurred_at)
        ],
    )


async def catalog_prices(conn: Connection, model_ids: Sequence[str]) -> list[CatalogPrice]:
    rows = await conn.fetch(
        "SELECT provider, model_id, prompt_price_per_1m, completion_price_per_1m, variable_price,"
        " highest_prompt_price_per_1m, highest_completion_price_per_1m, priced_per_token,"
        " price_tiers"
        " FROM model_prices WHERE model_id = ANY($1::text[])",
        list(model_ids),
    )
    return [
        CatalogPrice(
            r["provider"],
            r["model_id"],
            r["prompt_price_per_1m"],
            r["completion_price_per_1m"],
            r["variable_price"],
            r["highest_prompt_price_per_1m"],
            r["highest_completion_price_per_1m"],
            r["priced_per_token"],
            _tiers(r["price_tiers"]),
        )
        for r in rows
    ]


def _tiers(value: list[dict[str, Any]]) -> tuple[Tier, ...]:
    return tuple(
        Tier(
            t["min_prompt_tokens"],
            Decimal(t["prompt_price_per_1m"]),
            Decimal(t["completion_price_per_1m"]),
        )
        for t in value
    )


# --- jobs --------------------------------------------------------------------------------


async def insert_job(conn: Connection, job: BenchmarkRequested) -> bool:
    """Store a new queued job; False when the id is taken."""
    status = await conn.execute(
        f"INSERT INTO jobs ({JOB_REQUEST_COLUMNS}, user_id, status, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'queued', $12)"
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
        job.user_id,
        job.occurred_at,
    )
    return bool(status == "INSERT 0 1")


async def lock_user_quota(conn: Connection, user_id: str) -> int:
    """Inside a transaction: serialize the user's submissions (so two at once cannot both
    pass the quota) and return how many of their jobs are queued or running."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('benchmark-quota:' || $1))", user_id)
    count: int = await conn.fetchval(
        "SELECT count(*) FROM jobs WHERE user_id = $1 AND status IN ('queued', 'running')",
        user_id,
    )
    return count


# Every clock below is clock_timestamp(): when the statement ran, not when its transaction
# began. A claim also returns the seconds left until the job's deadline, on the database's
# clock, so workers need not agree with it on the time.
_CLAIMED = (
    f"RETURNING attempt, {JOB_REQUEST_COLUMNS}, user_id, created_at AS occurred_at,"
    " extract(epoch FROM deadline_at - clock_timestamp())::float8 AS seconds_left,"
    " cancel_requested_at IS NOT NULL AS cancel_requested"
)
_CLAIM_SET = (
    "SET status = 'running', attempt = attempt + 1, worker = $2,"
    " lease_expires_at = clock_timestamp() + make_interval(secs => $3),"
    " started_at = clock_timestamp(),"
    " deadline_at = coalesce(deadline_at, clock_timestamp() + make_interval(secs => $4))"
)
_CLAIMABLE = "(status = 'queued' OR (status = 'running' AND lease_expires_at < clock_timestamp()))"


async def claim_job(
    conn: Connection, job_id: uuid.UUID, worker: str, lease_s: float, max_job_s: float
) -> asyncpg.Record | None:
    """Take the job if it is queued, or running under a lease that ran out (its worker
    stopped): the attempt goes up, so the previous holder can no longer write. None when
    it is finished, unknown, or held by a living worker. In a transaction, the claim also
    holds the job's advisory lock until it ends, for `renew_lease(..., first=True)`."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _job_lock(job_id))
    return await conn.fetchrow(
        f"UPDATE jobs {_CLAIM_SET} WHERE job_id = $1 AND {_CLAIMABLE} {_CLAIMED}",
        job_id,
        worker,
        lease_s,
        max_job_s,
    )


async def claim_next(
    conn: Connection, worker: str, lease_s: float, max_job_s: float, limit: int
) -> list[asyncpg.Record]:
    """Take up to `limit` jobs that may be taken (oldest first), skipping those another
    worker is taking right now."""
    return await conn.fetch(
        f"WITH next AS (SELECT job_id FROM jobs WHERE {_CLAIMABLE} ORDER BY created_at"
        " LIMIT $1 FOR UPDATE SKIP LOCKED)"
        f" UPDATE jobs {_CLAIM_SET} WHERE job_id IN (SELECT job_id FROM next) {_CLAIMED}",
        limit,
        worker,
        lease_s,
        max_job_s,
    )


def _job_lock(job_id: uuid.UUID) -> int:
    """The advisory lock key of a job (a collision only makes a claim wait a moment)."""
    return int.from_bytes(job_id.bytes[:8], "big", signed=True)


async def renew_lease(
    conn: Connection, job_id: uuid.UUID, attempt: int, lease_s: float, *, first: bool = False
) -> bool | None:
    """Extend the lease of the attempt that holds the job. None when it does not hold it
    (another worker took it over, or the claim was never committed); else whether the
    job's cancelling was asked for. `first`: wait until the transaction that claimed the
    job has ended (its advisory lock), so its outcome is seen."""
    async with conn.transaction():
        if first:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _job_lock(job_id))
        held: bool | None = await conn.fetchval(
            "UPDATE jobs SET lease_expires_at = clock_timestamp() + make_interval(secs => $3)"
            " WHERE job_id = $1 AND attempt = $2 AND status = 'running'"
            " RETURNING cancel_requested_at IS NOT NULL",
            job_id,
            attempt,
            lease_s,
        )
    return held


async def release_leases(conn: Connection, worker: str) -> int:
    """A worker stopping: its running jobs may be taken over at once."""
    status = await conn.execute(
        "UPDATE jobs SET lease_expires_at = clock_timestamp()"
        " WHERE worker = $1 AND status = 'running'",
        worker,
    )
    return int(status.split()[-1])


async def request_cancel(
    conn: Connection, job_id: uuid.UUID, owner: str | None, reason: str
) -> asyncpg.Record | None:
    """Cancel a queued job of `owner` (None: anyone's) at once, or ask its worker to stop a
    running one. Returns the job's status afterwards with its request fields; None when
    the job is not theirs, unknown, or finished already."""
    return await conn.fetchrow(
        "UPDATE jobs SET"
        " cancel_requested_at = coalesce(cancel_requested_at, clock_timestamp()),"
        " status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,"
        " error = CASE WHEN status = 'queued' THEN $3 ELSE error END,"
        " finished_at = CASE WHEN status = 'queued' THEN clock_timestamp() ELSE finished_at END"
        " WHERE job_id = $1 AND ($2::text IS NULL OR user_id = $2)"
        " AND status IN ('queued', 'running')"
        f" RETURNING status, {JOB_REQUEST_COLUMNS}, user_id, created_at AS occurred_at",
        job_id,
        owner,
        reason,
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
        "UPDATE jobs SET status = $3, summary = $4, error = $5,"
        " finished_at = clock_timestamp(), lease_expires_at = NULL"
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


async def job(conn: Connection, job_id: uuid.UUID, owner: str | None) -> asyncpg.Record | None:
    """The job, if it is `owner`'s (None: anyone's)."""
    return await conn.fetchrow(
        "SELECT * FROM jobs WHERE job_id = $1 AND ($2::text IS NULL OR user_id = $2)",
        job_id,
        owner,
    )


async def job_runs(conn: Connection, job_id: uuid.UUID, attempt: int) -> list[RunResult]:
    rows = await conn.fetch(
        f"SELECT {', '.join(RUN_COLUMNS)} FROM job_runs WHERE job_id = $1 AND attempt = $2"
        " ORDER BY run_index",
        job_id,
        attempt,
    )
    return [RunResult(**dict(r)) for r in rows]


async def list_jobs(
    conn: Connection, owner: str | None, model: str | None, status: str | None, limit: int
) -> list[asyncpg.Record]:
    """The jobs of `owner` (None: everyone's), newest first."""
    return await conn.fetch(
        "SELECT job_id, provider, model, task_type, runs, status, attempt, error, summary,"
        " created_at, started_at, finished_at FROM jobs"
        " WHERE ($1::text IS NULL OR model = $1) AND ($2::text IS NULL OR status = $2)"
        " AND ($4::text IS NULL OR user_id = $4)"
        " ORDER BY created_at DESC LIMIT $3",
        model,
        status,
        limit,
        owner,
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
    """Delete jobs created more than `days` ago, except queued and running ones."""
    status = await conn.execute(
        "DELETE FROM jobs WHERE created_at < now() - make_interval(secs => $1)"
        " AND status NOT IN ('queued', 'running')",
        days * 86400,
    )
    return int(status.split()[-1])
