"""Subscribers of benchmark: the price table from `model.synced`, and the workers that run
the jobs of `benchmark.requested`.

A worker and a job
------------------
The chassis applies `benchmark.requested` inside a transaction, acknowledges the message
when the handler returns, and tells JetStream the message is in progress while it runs, so
a job of any length is not handed to another worker meanwhile. A worker:

1. claims the job through the pool, in its own short transaction: queued (or running under
   a worker that stopped) → running, attempt + 1, its worker id. A finished job is not
   claimed: a redelivered message for it changes nothing.
2. applies the price guard again (prices may have changed since the job was accepted, and
   any client may publish `benchmark.requested`), and gives up on a job that
   `BENCHMARK_MAX_ATTEMPTS` workers started without finishing.
3. streams the runs outside any database work: warm-up runs (not counted), then the
   measured runs, `concurrency` at a time; each finished run is recorded for progress
   while the attempt still holds the job.
4. writes the final state, every run and `benchmark.completed`/`benchmark.failed` in the
   consumer's transaction, only if the job is still running under its attempt.

If the worker dies, its transaction is rolled back and the message is not acknowledged;
JetStream delivers it again once the in-progress signals stop, and the next worker claims
the job under a new attempt and runs it from the start. Whatever happens, the job reaches
one final state once, and its final event has an id derived from the job's. (A redelivery
of the same message waits on the inbox row the first worker's open transaction holds; a
second request for the job under a new event id, which a retry must not make, would
restart a running job and drop the first worker's results.)
"""

from __future__ import annotations

import logging
import uuid

import asyncpg
from pydantic import SecretStr

from contracts.events import BenchmarkFailed, BenchmarkRequested, ModelSynced
from services.benchmark import db
from services.benchmark.config import BenchmarkSettings
from services.benchmark.domain import (
    Policy,
    Price,
    RunResult,
    Stream,
    Verdict,
    catalog_ids,
    check_price,
    measure,
    outcome,
    refused,
    start_refusal,
)
from services.benchmark.providers import Endpoint, Prompt, stream_runs
from services.runtime import outbox
from services.runtime.db import Connection
from services.runtime.service import Runtime

log = logging.getLogger(__name__)


async def on_model_synced(conn: Connection, events: list[ModelSynced]) -> None:
    await db.upsert_prices(conn, events)


def policy_of(settings: BenchmarkSettings) -> Policy:
    return Policy(
        max_price_per_1m=settings.benchmark_max_price_per_1m,
        allow_variable_price=settings.benchmark_allow_variable_price,
        allow_unknown_models=settings.benchmark_allow_unknown_models,
    )


async def price_verdict(
    conn: Connection, settings: BenchmarkSettings, provider: str, model: str
) -> Verdict:
    catalog = await db.catalog_prices(conn, catalog_ids(provider, model))
    return check_price(provider, model, catalog, policy_of(settings))


def endpoint_of(settings: BenchmarkSettings, provider: str) -> Endpoint:
    if provider == "ollama":
        return Endpoint("ollama", settings.ollama_base_url)
    if provider == "openrouter":
        key = settings.openrouter_api_key
        return Endpoint("openrouter", settings.openrouter_base_url, _secret(key))
    return Endpoint("openai", settings.openai_base_url, _secret(settings.openai_api_key))


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


class Worker:
    """Runs benchmark jobs; `bind` (called at start) hands it the running service's pool,
    which it needs for writes outside the consumer's transaction."""

    def __init__(self, settings: BenchmarkSettings) -> None:
        self.settings = settings
        self._pool: asyncpg.Pool | None = None
        self.worker_id = ""

    def bind(self, runtime: Runtime) -> None:
        self._pool = runtime.pool
        self.worker_id = f"{runtime.instance}-{uuid.uuid4().hex[:6]}"

    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "bind() is called before any job arrives"
        return self._pool

    async def on_benchmark_requested(
        self, conn: Connection, events: list[BenchmarkRequested]
    ) -> None:
        for event in events:
            await self.run_job(conn, event)

    async def run_job(self, conn: Connection, event: BenchmarkRequested) -> None:
        pool = self.pool()
        async with pool.acquire() as own:
            await db.insert_job(own, event)  # a client may publish without the API
            claimed = await db.claim_job(own, event.job_id, self.worker_id)
            if claimed is None:
                log.info("job %s is finished already; nothing to do", event.job_id)
                return
            attempt: int = claimed["attempt"]
            job = BenchmarkRequested(**{k: v for k, v in claimed.items() if k != "attempt"})
            verdict = await price_verdict(own, self.settings, job.provider, job.model)
        refusal = start_refusal(attempt, self.settings.benchmark_max_attempts, verdict)
        if refusal is not None:
            if await db.finish_job(conn, job.job_id, attempt, "failed", None, refusal):
                await outbox.add(conn, [refused(job, refusal)])
            log.warning("job %s not run: %s", job.job_id, refusal)
            return
        log.info(
            "job %s attempt %d: %d runs of %s via %s",
            job.job_id,
            attempt,
            job.runs,
            job.model,
            job.provider,
            extra={"worker": self.worker_id},
        )
        results = await self.run_all(pool, job, attempt, verdict.price)
        end = outcome(job, results)
        status, error = (
            ("failed", end.error) if isinstance(end, BenchmarkFailed) else ("completed", None)
        )
        if await db.finish_job(conn, job.job_id, attempt, status, end.summary, error, results):
            await outbox.add(conn, [end])
            log.info("job %s %s", job.job_id, status, extra={"summary": end.summary})
        else:
            log.warning(
                "job %s was taken over by another worker; results of attempt %d dropped",
                job.job_id,
                attempt,
            )

    async def run_all(
        self, pool: asyncpg.Pool, job: BenchmarkRequested, attempt: int, price: Price | None
    ) -> list[RunResult]:
        results: list[RunResult] = []

        async def measured(index: int, stream: Stream) -> None:
            result = measure(index, stream, price)
            results.append(result)
            await self.record(pool, job.job_id, attempt, result)

        await stream_runs(
            endpoint_of(self.settings, job.provider),
            [Prompt(job.model, job.task_type, job.prompt, job.max_tokens)] * job.runs,
            concurrency=job.concurrency,
            warmup_runs=job.warmup_runs,
            timeout_s=job.timeout_s,
            on_stream=measured,
        )
        return sorted(results, key=lambda r: r.run_index)

    async def record(
        self, pool: asyncpg.Pool, job_id: uuid.UUID, attempt: int, result: RunResult
    ) -> None:
        """Progress only: the final transaction writes every run again, so a failure here
        loses nothing."""
        try:
            async with pool.acquire() as conn:
                await db.add_run(conn, job_id, attempt, result)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("progress of job %s not recorded: %s", job_id, exc)
