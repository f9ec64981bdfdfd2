"""Ollama device discovery: every configured device is asked for its version and models;
each pass writes the devices, their models' changes and the events of both in one
transaction. No message comes in here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import asyncpg

from services.runtime import outbox
from services.runtime.service import Runtime
from services.sync import db
from services.sync.clients import check_device
from services.sync.config import SyncSettings
from services.sync.domain import OLLAMA, DiscoveryOutcome, discovery_outcome
from services.sync.metrics import DEVICE_UP, refresh_metrics

log = logging.getLogger(__name__)


class DeviceDiscovery:
    """Checks every configured Ollama device; passes never overlap (a lock in this process,
    an advisory lock across instances)."""

    def __init__(self, settings: SyncSettings) -> None:
        self.settings = settings
        self._lock = asyncio.Lock()

    async def discovery_loop(self, runtime: Runtime[SyncSettings]) -> None:
        log.info(
            "Ollama discovery started (%d devices, interval=%gs)",
            len(self.settings.ollama_devices),
            self.settings.ollama_discovery_interval,
        )
        while True:
            await self.run(runtime.pool)
            await asyncio.sleep(self.settings.ollama_discovery_interval)

    async def run(self, pool: asyncpg.Pool) -> DiscoveryOutcome:
        s = self.settings
        async with self._lock:
            checks = await asyncio.gather(
                *(check_device(n, url, s.ollama_timeout_s) for n, url in s.ollama_devices.items())
            )
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await db.lock_discovery(conn)
                    stored = await db.stored_models(conn, OLLAMA)
                    outcome = discovery_outcome(
                        await db.device_status(conn),
                        {d: m for d, m in stored.items() if d is not None},
                        checks,
                        uuid.uuid4(),
                    )
                    await db.write_devices(conn, checks)
                    await db.forget_devices(conn, outcome.forgotten)
                    await db.write_models(conn, outcome.changes)
                    await db.add_price_history(conn, outcome.changes, None)
                    await outbox.add(conn, outcome.events)
                if outcome.changes:
                    await refresh_metrics(conn)
        for check in outcome.transitions:
            if check.error:
                log.warning(
                    "device %s (%s) offline: %s; its models are unavailable",
                    check.device,
                    check.base_url,
                    check.error,
                )
            else:
                log.info(
                    "device %s (%s) online: Ollama %s, %d models",
                    check.device,
                    check.base_url,
                    check.version,
                    len(check.models),
                )
        for check in checks:
            DEVICE_UP.labels(check.device).set(0 if check.error else 1)
        for device in outcome.forgotten:
            log.info("device %s is no longer configured; its models are removed", device)
            with contextlib.suppress(KeyError):
                DEVICE_UP.remove(device)
        return outcome
