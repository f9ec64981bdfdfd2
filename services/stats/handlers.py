"""Subscribers of stats: read → decide → write, in the consumer's transaction."""

from __future__ import annotations

from contracts.events import SubtaskCompleted
from services.runtime.db import Connection
from services.stats import db
from services.stats.domain import response_deltas


async def on_subtask_completed(conn: Connection, events: list[SubtaskCompleted]) -> None:
    await db.add_responses(conn, response_deltas(events))
