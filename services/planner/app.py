"""planner: the one place its parts are put together.

For now it runs the chassis only (schema, health, metrics, heartbeat); its features come
with its own issue.
"""

from __future__ import annotations

from services.planner.config import PlannerSettings
from services.runtime.service import ServiceSpec


def build(settings: PlannerSettings | None = None) -> ServiceSpec:
    return ServiceSpec(
        name="planner",
        settings=settings or PlannerSettings(),
        description="Execution plans of subtasks with dependencies.",
    )
