from __future__ import annotations

from services.runtime.config import RuntimeSettings


class PlannerSettings(RuntimeSettings):
    http_port: int = 8103
