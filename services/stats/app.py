"""stats: the one place its parts are put together."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from contracts.events import ModelDismissed, ModelRewarded, ModelSynced, SubtaskCompleted
from services.runtime.consumer import Consumer
from services.runtime.service import ServiceSpec
from services.stats import api, handlers
from services.stats.config import StatsSettings


def build(settings: StatsSettings | None = None) -> ServiceSpec[StatsSettings]:
    settings = settings or StatsSettings()
    writer = handlers.Writer()  # the three consumers' batches, written together
    return ServiceSpec(
        name="stats",
        settings=settings,
        description="Each model's work record per user and session.",
        migrations=Path(__file__).parent / "migrations",
        consumers=[
            # the work record's three consumers claim their inbox in the statement that
            # writes a batch, through this instance's one writer (group commit)
            *(
                Consumer(
                    name,
                    event,
                    partial(handle, writer),
                    batch_size=settings.stats_batch_size,
                    claims_inbox=True,
                )
                for name, event, handle in (
                    (handlers.SUBTASK_COMPLETED, SubtaskCompleted, handlers.on_subtask_completed),
                    (handlers.MODEL_REWARDED, ModelRewarded, handlers.on_model_rewarded),
                    (handlers.MODEL_DISMISSED, ModelDismissed, handlers.on_model_dismissed),
                )
            ),
            Consumer(
                handlers.MODEL_SYNCED,
                ModelSynced,
                handlers.on_model_synced,
                batch_size=settings.stats_batch_size,
            ),
        ],
        routers=[api.build_router()],
        tasks=[handlers.fold_global_days],
    )
