"""guardian: the one place its parts are put together."""

from __future__ import annotations

from pathlib import Path

from services.guardian import api
from services.guardian.config import GuardianSettings
from services.guardian.watcher import Guardian
from services.runtime.service import ServiceSpec


def build(settings: GuardianSettings | None = None) -> ServiceSpec[GuardianSettings]:
    settings = settings or GuardianSettings()
    guardian = Guardian(settings)
    return ServiceSpec(
        name="guardian",
        settings=settings,
        description="Watches every service, NATS, PostgreSQL and the host; restarts a dead or "
        "hung service under `fleet up` with cooldown and backoff; escalates a crash loop into "
        "an incident report; the fleet's /api/health. Two replicas, one leader.",
        migrations=Path(__file__).parent / "migrations",
        routers=[api.build_router(guardian)],
        open_routers=[api.build_open_router(guardian)],
        tasks=[
            guardian.heartbeats,
            guardian.probes,
            guardian.exits,
            guardian.ticker,
            guardian.executor,
            guardian.leadership,
            guardian.smoke_schedule,
        ],
    )
