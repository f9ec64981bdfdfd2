from __future__ import annotations

from services.runtime.config import RuntimeSettings


class SyncSettings(RuntimeSettings):
    http_port: int = 8101
