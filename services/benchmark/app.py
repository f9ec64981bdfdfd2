"""benchmark: the one place its parts are put together."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from prometheus_client import Counter

from contracts.events import BenchmarkRequested, ModelSynced
from services.benchmark import api, db, handlers
from services.benchmark.config import BenchmarkSettings
from services.runtime.consumer import Consumer
from services.runtime.service import Runtime, ServiceSpec, Task

log = logging.getLogger(__name__)

JOBS_DELETED = Counter(
    "fleet_benchmark_jobs_deleted_total", "Benchmark jobs deleted after the retention period"
)


def job_cleanup(settings: BenchmarkSettings) -> Task:
    async def cleanup_jobs(runtime: Runtime) -> None:
        """At start, then every JOB_CLEANUP_INTERVAL hours."""
        while True:
            async with runtime.pool.acquire() as conn:
                deleted = await db.delete_jobs_created_before(
                    conn, settings.job_cleanup_retention_days
                )
            JOBS_DELETED.inc(deleted)
            log.info(
                "job cleanup: deleted %d jobs older than %g days",
                deleted,
                settings.job_cleanup_retention_days,
                extra={"deleted": deleted},
            )
            await asyncio.sleep(settings.job_cleanup_interval * 3600)

    return cleanup_jobs


def build(settings: BenchmarkSettings | None = None) -> ServiceSpec:
    settings = settings or BenchmarkSettings()
    worker = handlers.Worker(settings)
    return ServiceSpec(
        name="benchmark",
        settings=settings,
        description="Benchmark runs with a price guard and streaming measurements: TTFT, "
        "inter-token latency, time per output token, end-to-end latency, tokens/s and cost, "
        "with token counts from the server's usage.",
        migrations=Path(__file__).parent / "migrations",
        consumers=[
            Consumer(
                "benchmark-model-synced", ModelSynced, handlers.on_model_synced, batch_size=500
            ),
            Consumer(
                "benchmark-benchmark-requested",
                BenchmarkRequested,
                worker.on_benchmark_requested,
                batch_size=1,
            ),
        ],
        routers=[api.router],
        tasks=[job_cleanup(settings)],
        on_start=[worker.bind],
    )
