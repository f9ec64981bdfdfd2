"""guardian: the one place its parts are put together.

For now it runs the chassis only (schema, health, metrics, heartbeat); its features come
with its own issue.
"""

from __future__ import annotations

from services.guardian.config import GuardianSettings
from services.runtime.service import ServiceSpec


def build(settings: GuardianSettings | None = None) -> ServiceSpec:
    return ServiceSpec(
        name="guardian",
        settings=settings or GuardianSettings(),
        description="Health of every service, restarts and escalation.",
    )
