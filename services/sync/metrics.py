"""sync's Prometheus metrics, shared by catalog runs and device discovery."""

from __future__ import annotations

import math
import time

from prometheus_client import Counter, Gauge

from services.runtime.db import Connection
from services.sync import db
from services.sync.domain import OLLAMA, OPENROUTER

RUNS = Counter("sync_runs_total", "OpenRouter catalog runs by outcome", ["status"])
CATALOG_MODELS = Gauge(
    "sync_catalog_models", "Models in the catalog by provider and status", ["provider", "status"]
)
DEVICE_UP = Gauge("sync_device_up", "1 when an Ollama device answered its last check", ["device"])


class _LastSuccess:
    at: float | None = None  # unix time of the last successful (or not-modified) run


LAST_SUCCESS = _LastSuccess()
SECONDS_SINCE_SUCCESS = Gauge(
    "sync_seconds_since_last_success",
    "Seconds since the last OpenRouter run that succeeded or found nothing new (NaN: never)",
)
SECONDS_SINCE_SUCCESS.set_function(
    lambda: time.time() - LAST_SUCCESS.at if LAST_SUCCESS.at is not None else math.nan
)


async def refresh_metrics(conn: Connection) -> None:
    for provider in (OPENROUTER, OLLAMA):
        for status in ("active", "removed", "unavailable"):
            CATALOG_MODELS.labels(provider, status).set(0)
    for r in await db.provider_counts(conn):
        CATALOG_MODELS.labels(r["provider"], r["status"]).set(r["count"])
    if LAST_SUCCESS.at is None and (at := await db.last_success_at(conn)):
        LAST_SUCCESS.at = at.timestamp()
