from __future__ import annotations

from pydantic import Field

from services.runtime.config import RuntimeSettings


class StatsSettings(RuntimeSettings):
    http_port: int = 8105
    stats_batch_size: int = Field(
        500,
        ge=1,
        le=5000,
        description="Events of one kind applied per transaction at most.",
    )
    stats_leaderboard_min_responses: int = Field(
        30,
        ge=1,
        description="Responses a model needs in the window to be ranked on a leaderboard; "
        "below it the model is listed as not having enough data.",
    )
    stats_global_fold_interval_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="How often the global per-model days appended by the consumers are "
        "folded into their aggregate (the global leaderboard is exact either way).",
    )
