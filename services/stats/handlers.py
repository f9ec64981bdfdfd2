"""Subscribers of stats: read → decide → write, in the consumer's transaction."""

from __future__ import annotations

from contracts.events import ModelDismissed, ModelRewarded, ModelSynced, SubtaskCompleted
from services.runtime.consumer import DeadLetter
from services.runtime.db import Connection
from services.stats import db
from services.stats.domain import (
    Unacceptable,
    calls_to_price,
    from_call,
    from_dismissal,
    from_reward,
    price_at,
    price_call,
)


async def on_subtask_completed(conn: Connection, events: list[SubtaskCompleted]) -> None:
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
    await db.apply(conn, [from_call(e) for e in entries], entries)


async def on_model_rewarded(conn: Connection, events: list[ModelRewarded]) -> None:
    try:
        contributions = [from_reward(e) for e in events]
    except Unacceptable as exc:
        raise DeadLetter(str(exc)) from exc
    await db.apply(conn, contributions)


async def on_model_dismissed(conn: Connection, events: list[ModelDismissed]) -> None:
    await db.apply(conn, [from_dismissal(e) for e in events])


async def on_model_synced(conn: Connection, events: list[ModelSynced]) -> None:
    await db.add_prices(conn, events)
