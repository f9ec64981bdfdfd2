from __future__ import annotations

from services.runtime.config import RuntimeSettings


class BenchmarkSettings(RuntimeSettings):
    http_port: int = 8102
