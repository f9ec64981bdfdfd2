"""benchmark: the one place its parts are put together."""

from __future__ import annotations

from pathlib import Path

from contracts.events import BenchmarkRequested, ModelSynced
from services.benchmark import api, handlers
from services.benchmark.config import BenchmarkSettings
from services.benchmark.worker import Worker, cleanup_jobs
from services.runtime.consumer import Consumer
from services.runtime.service import ServiceSpec


def build(settings: BenchmarkSettings | None = None) -> ServiceSpec[BenchmarkSettings]:
    settings = settings or BenchmarkSettings()
    worker = Worker(settings)
    return ServiceSpec(
        name="benchmark",
        settings=settings,
        description="Benchmark runs with a price guard and streaming measurements: TTFT, "
        "inter-token latency per chunk and per token, time per output token, end-to-end "
        "latency, tokens/s and cost, with token counts from the server's usage.",
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
        routers=[api.build_router()],
        tasks=[worker.work, cleanup_jobs],
    )
