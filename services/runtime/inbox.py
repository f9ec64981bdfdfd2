"""Inbox: the ids of applied events, recorded in the same transaction as their effect."""

from __future__ import annotations

import uuid

from services.runtime.db import Connection


async def claim(conn: Connection, consumer: str, event_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Record `event_ids` as applied by `consumer`; returns those not applied before.
    Must run in the transaction that applies them, so both commit or neither does."""
    rows = await conn.fetch(
        "INSERT INTO inbox (consumer, event_id) SELECT $1, unnest($2::uuid[])"
        " ON CONFLICT DO NOTHING RETURNING event_id",
        consumer,
        event_ids,
    )
    return {r["event_id"] for r in rows}
