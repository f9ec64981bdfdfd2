from __future__ import annotations

from pydantic import Field

from services.runtime.config import RuntimeSettings


class StatsSettings(RuntimeSettings):
    http_port: int = 8105
    stats_batch_size: int = Field(
        500,
        ge=1,
        le=5000,
        description="subtask.completed events applied per transaction at most.",
    )
