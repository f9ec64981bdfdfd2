"""sync: the one place its parts are put together.

For now it runs the chassis only (schema, health, metrics, heartbeat); its features come
with its own issue.
"""

from __future__ import annotations

from services.runtime.service import ServiceSpec
from services.sync.config import SyncSettings


def build(settings: SyncSettings | None = None) -> ServiceSpec:
    return ServiceSpec(
        name="sync",
        settings=settings or SyncSettings(),
        description="The model catalog (OpenRouter and local Ollama devices).",
    )
