"""stats: the one place its parts are put together."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from contracts.events import ModelDismissed, ModelRewarded, ModelSynced, SubtaskCompleted
from services.runtime.consumer import Consumer
from services.runtime.faults import describe, unavailable
from services.runtime.service import Runtime, ServiceSpec
from services.stats import api, db, handlers
from services.stats.config import StatsSettings

log = logging.getLogger(__name__)


def build(settings: StatsSettings | None = None) -> ServiceSpec:
    settings = settings or StatsSettings()
    return ServiceSpec(
        name="stats",
        settings=settings,
        description="Each model's work record per user and session.",
        migrations=Path(__file__).parent / "migrations",
        consumers=[
            Consumer(
                "stats-subtask-completed",
                SubtaskCompleted,
                handlers.on_subtask_completed,
                batch_size=settings.stats_batch_size,
            ),
            Consumer(
                "stats-model-rewarded",
                ModelRewarded,
                handlers.on_model_rewarded,
                batch_size=settings.stats_batch_size,
            ),
            Consumer(
                "stats-model-dismissed",
                ModelDismissed,
                handlers.on_model_dismissed,
                batch_size=settings.stats_batch_size,
            ),
            Consumer(
                "stats-model-synced",
                ModelSynced,
                handlers.on_model_synced,
                batch_size=settings.stats_batch_size,
            ),
        ],
        routers=[api.router],
        tasks=[fold_global_days],
    )


async def fold_global_days(runtime: Runtime) -> None:
    """Keep the global per-model days' pending rows few (every instance may run this: a
    fold takes only rows no other fold has taken)."""
    settings = runtime.settings
    interval = settings.stats_global_fold_interval_s if isinstance(settings, StatsSettings) else 1
    while True:
        await asyncio.sleep(interval)
        try:
            async with runtime.pool.acquire(timeout=5) as conn:
                await db.fold_global_days(conn)
        except Exception as exc:
            if not unavailable(exc):
                raise
            # PostgreSQL away: the consumers say so; the pending rows wait for the next fold
            log.debug("global fold skipped: %s", describe(exc))
