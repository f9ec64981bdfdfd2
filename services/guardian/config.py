from __future__ import annotations

from services.runtime.config import RuntimeSettings


class GuardianSettings(RuntimeSettings):
    http_port: int = 8104
