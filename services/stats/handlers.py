"""Subscribers of stats: read → decide → write, and its own loop (the global fold).

The consumers of completions, rewards and dismissals claim their inbox themselves: each
batch is one statement (db.apply) that records the events in the inbox and adds only those
recorded now, so it needs no transaction of its own (see `Consumer.claims_inbox`)."""

from __future__ import annotations

import asyncio
import logging

from contracts.events import ModelDismissed, ModelRewarded, ModelSynced, SubtaskCompleted
from services.runtime.consumer import DeadLetter
from services.runtime.db import Connection
from services.runtime.faults import describe, unavailable
from services.runtime.service import Runtime
from services.stats import db
from services.stats.config import StatsSettings
from services.stats.domain import (
    Unacceptable,
    calls_to_price,
    from_call,
    from_dismissal,
    from_reward,
    price_at,
    price_call,
)

log = logging.getLogger(__name__)

# the durable consumers' names, which are also their inbox's
SUBTASK_COMPLETED = "stats-subtask-completed"
MODEL_REWARDED = "stats-model-rewarded"
MODEL_DISMISSED = "stats-model-dismissed"
MODEL_SYNCED = "stats-model-synced"


async def on_subtask_completed(conn: Connection, events: list[SubtaskCompleted]) -> int:
    """Each completed subtask is one response and one call in the cost ledger, priced by
    the event's cost, else by the catalog price in force when it completed."""
    spans = calls_to_price(events)
    histories = await db.price_histories(conn, spans) if spans else {}
    try:
        entries = [
            price_call(e, price_at(histories.get(e.model_id, ()), e.completed_at)) for e in events
        ]
    except Unacceptable as exc:
        raise DeadLetter(str(exc)) from exc
    return await db.apply(
        conn,
        SUBTASK_COMPLETED,
        [e.event_id for e in events],
        [from_call(e) for e in entries],
        entries,
    )


async def on_model_rewarded(conn: Connection, events: list[ModelRewarded]) -> int:
    try:
        contributions = [from_reward(e) for e in events]
    except Unacceptable as exc:
        raise DeadLetter(str(exc)) from exc
    return await db.apply(conn, MODEL_REWARDED, [e.event_id for e in events], contributions)


async def on_model_dismissed(conn: Connection, events: list[ModelDismissed]) -> int:
    return await db.apply(
        conn, MODEL_DISMISSED, [e.event_id for e in events], [from_dismissal(e) for e in events]
    )


async def on_model_synced(conn: Connection, events: list[ModelSynced]) -> None:
    await db.add_prices(conn, events)


async def fold_global_days(runtime: Runtime) -> None:
    """Keep the global per-model days' pending rows few (every instance may run this: a
    fold takes only rows no other fold has taken)."""
    settings = runtime.settings
    interval = settings.stats_global_fold_interval_s if isinstance(settings, StatsSettings) else 1
    while True:
        await asyncio.sleep(interval)
        try:
            async with runtime.pool.acquire(timeout=5) as conn:
                await db.fold_global_days(conn)
        except Exception as exc:
            if not unavailable(exc):
                raise
            # PostgreSQL away: the consumers say so; the pending rows wait for the next fold
            log.debug("global fold skipped: %s", describe(exc))
