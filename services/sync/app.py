"""sync: the one place its parts are put together."""

from __future__ import annotations

from pathlib import Path

from services.runtime.service import ServiceSpec
from services.sync import api
from services.sync.catalog import CatalogSync
from services.sync.config import SyncSettings
from services.sync.discovery import DeviceDiscovery


def build(settings: SyncSettings | None = None) -> ServiceSpec[SyncSettings]:
    settings = settings or SyncSettings()
    catalog = CatalogSync(settings)
    discovery = DeviceDiscovery(settings)
    return ServiceSpec(
        name="sync",
        settings=settings,
        description="The model catalog: OpenRouter's models on a schedule and the models of "
        "local Ollama devices, with offline handling.",
        migrations=Path(__file__).parent / "migrations",
        routers=[api.build_router(catalog, discovery)],
        tasks=[catalog.openrouter_loop, discovery.discovery_loop],
    )
