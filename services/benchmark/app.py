"""benchmark: the one place its parts are put together.

For now it runs the chassis only (schema, health, metrics, heartbeat); its features come
with its own issue.
"""

from __future__ import annotations

from services.benchmark.config import BenchmarkSettings
from services.runtime.service import ServiceSpec


def build(settings: BenchmarkSettings | None = None) -> ServiceSpec:
    return ServiceSpec(
        name="benchmark",
        settings=settings or BenchmarkSettings(),
        description="Benchmark runs with a price guard and streaming measurements.",
    )
