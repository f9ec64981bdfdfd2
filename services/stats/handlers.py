"""Subscribers of stats: read → decide → write, and its own loop (the global fold).

The consumers of completions, rewards and dismissals claim their inbox themselves: a batch
is one statement (db.apply) that records the events in the inbox and adds only those
recorded now, so it needs no transaction of its own (see `Consumer.claims_inbox`). Their
batches go through the service's one `Writer` (app.py gives it to them), which writes
together those that arrive while a write is under way: one statement and one commit
instead of three, and no consumer waiting for another's row locks (the three add to the
same users' rows)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from contracts.events import ModelDismissed, ModelRewarded, ModelSynced, SubtaskCompleted
from services.runtime.consumer import DeadLetter
from services.runtime.db import Connection
from services.runtime.faults import describe, unavailable
from services.runtime.service import Runtime
from services.stats import db
from services.stats.config import StatsSettings
from services.stats.domain import (
    Batch,
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


@dataclass
class _Queued:
    batch: Batch
    applied: asyncio.Future[int]


class Writer:
    """Group commit for the consumers' batches, never a wait for company: a batch is written
    at once when no write is under way; otherwise it is written with every batch queued
    meanwhile, by the first of their consumers to get its turn, on its connection. When a
    write of several fails for a reason other than PostgreSQL being away, each batch is
    written again alone, so only the one at fault fails (and only its consumer retries)."""

    def __init__(self) -> None:
        self._queue: list[_Queued] = []
        self._turn = asyncio.Lock()  # first come, first served

    async def apply(self, conn: Connection, batch: Batch) -> int:
        if conn.is_in_transaction():  # a retried event: alone, in its consumer's transaction
            return (await db.apply(conn, [batch])).get(batch.consumer, 0)
        mine = _Queued(batch, asyncio.get_running_loop().create_future())
        self._queue.append(mine)
        async with self._turn:
            if not mine.applied.done():  # not written by the previous turn: write the queue
                queued, self._queue = self._queue, []
                try:
                    await self._write(conn, queued)
                except BaseException:  # cancelled mid-write (stopping): the others try again
                    lost = ConnectionAbortedError("written with a consumer that was stopped")
                    for q in queued:
                        _settle(q.applied, lost)
                    raise
        return mine.applied.result()

    async def _write(self, conn: Connection, queued: list[_Queued]) -> None:
        try:
            applied = await db.apply(conn, [q.batch for q in queued])
        except Exception as exc:
            if len(queued) == 1 or unavailable(exc):
                for q in queued:
                    _settle(q.applied, exc)
                return
            for q in queued:
                try:
                    alone = await db.apply(conn, [q.batch])
                except Exception as one:
                    _settle(q.applied, one)
                else:
                    _settle(q.applied, alone.get(q.batch.consumer, 0))
            return
        for q in queued:
            _settle(q.applied, applied.get(q.batch.consumer, 0))


def _settle(future: asyncio.Future[int], outcome: int | Exception) -> None:
    if future.done():  # its consumer was cancelled (stopping): its messages come again
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


async def on_subtask_completed(
    writer: Writer, conn: Connection, events: list[SubtaskCompleted]
) -> int:
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
    ids = [e.event_id for e in events]
    return await writer.apply(
        conn, Batch(SUBTASK_COMPLETED, ids, [from_call(e) for e in entries], entries)
    )


async def on_model_rewarded(writer: Writer, conn: Connection, events: list[ModelRewarded]) -> int:
    try:
        contributions = [from_reward(e) for e in events]
    except Unacceptable as exc:
        raise DeadLetter(str(exc)) from exc
    return await writer.apply(
        conn, Batch(MODEL_REWARDED, [e.event_id for e in events], contributions)
    )


async def on_model_dismissed(writer: Writer, conn: Connection, events: list[ModelDismissed]) -> int:
    contributions = [from_dismissal(e) for e in events]
    return await writer.apply(
        conn, Batch(MODEL_DISMISSED, [e.event_id for e in events], contributions)
    )


async def on_model_synced(conn: Connection, events: list[ModelSynced]) -> None:
    await db.add_prices(conn, events)


async def fold_global_days(runtime: Runtime[StatsSettings]) -> None:
    """Keep the global per-model days' pending rows few (every instance may run this: a
    fold takes only rows no other fold has taken)."""
    while True:
        await asyncio.sleep(runtime.settings.stats_global_fold_interval_s)
        try:
            async with runtime.pool.acquire(timeout=5) as conn:
                await db.fold_global_days(conn)
        except Exception as exc:
            if not unavailable(exc):
                raise
            # PostgreSQL away: the consumers say so; the pending rows wait for the next fold
            log.debug("global fold skipped: %s", describe(exc))
