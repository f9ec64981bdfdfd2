"""Transactional outbox: events are rows written in the same transaction as the state change;
they are published to JetStream with `Nats-Msg-Id = event_id` and then marked sent.

A transaction opened with `Relay.transaction()` (consumers always use one) hands its rows to
NATS as soon as it commits and marks them sent once their PubAcks arrive. The relay loop,
woken by NOTIFY and by a fallback poll, publishes whatever else is unsent: rows of other
transactions, and rows whose publishing at commit failed or whose PubAck did not come within
`ack_timeout_s` (NATS died or froze with them in flight). A crash after commit and before
publish loses nothing (the row stays unsent); a crash after publish and before mark-sent
republishes with the same `Nats-Msg-Id`: JetStream drops the copy within its duplicate window
(120 s), and past it the consumers' inboxes do (they keep applied ids for 7 days).

Replicas of a service share its outbox: each loop takes unsent rows `FOR UPDATE SKIP
LOCKED`, so a row is in one loop's batch at a time, and a row that one replica publishes at
commit while another's loop finds it unsent goes out twice with one `Nats-Msg-Id`, which
JetStream stores once. A publish that gets "no responders" or no PubAck (a stream electing
its leader, a node lost) is simply published again by the loop, with the same id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import asyncpg
import nats.errors
from asyncpg.pool import PoolConnectionProxy
from nats.js import JetStreamContext
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from contracts import Event
from contracts.catalog import stream_for
from services.runtime.db import Connection, usable
from services.runtime.faults import backoff_seconds, describe
from services.runtime.messaging import ensure_streams
from services.runtime.telemetry import context_from_headers, current_trace_headers

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

PUBLISHED = Counter(
    "fleet_outbox_published_total", "Events published by the outbox relay", ["subject"]
)
PENDING = Gauge("fleet_outbox_pending", "Outbox rows not yet published")


Row = Mapping[str, Any]  # event_id, subject, payload, headers: an outbox row to publish
_written: ContextVar[list[Row] | None] = ContextVar("outbox_written", default=None)


async def add(conn: Connection, events: Iterable[Event]) -> None:
    """Record events to publish; call inside the transaction that changes the state.
    An event whose id is already recorded is ignored, so retried writes stay single.
    Outside a `Relay.transaction()` the insert also wakes the relay loop at commit
    (NOTIFY); inside one the rows are published at commit and the loop is left alone."""
    headers = current_trace_headers()
    by_id = {e.event_id: (e.subject, e.model_dump_json().encode()) for e in events}
    if not by_id:
        return
    written = _written.get()
    wake = "" if written is not None else ", pg_notify(current_schema() || '_outbox', '')"
    inserted = await conn.fetch(
        "INSERT INTO outbox (event_id, subject, payload, headers)"
        " SELECT id, subject, payload, $4::jsonb"
        " FROM unnest($1::uuid[], $2::text[], $3::bytea[]) AS t(id, subject, payload)"
        f" ON CONFLICT (event_id) DO NOTHING RETURNING event_id{wake}",
        list(by_id),
        [subject for subject, _ in by_id.values()],
        [payload for _, payload in by_id.values()],
        headers,
    )
    if written is not None:
        for r in inserted:
            subject, payload = by_id[r["event_id"]]
            written.append(
                {
                    "event_id": r["event_id"],
                    "subject": subject,
                    "payload": payload,
                    "headers": headers,
                }
            )


class Relay:
    """Publishes outbox rows: those of its `transaction()`s as soon as they commit, and in
    its loop (woken by NOTIFY and by a fallback poll) every other unsent row, in id order."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        js: JetStreamContext,
        schema: str,
        poll_interval: float = 0.5,
        batch_size: int = 500,
        mark_delay_s: float = 0.05,
        ack_timeout_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.js = js
        self.channel = f"{schema}_outbox"
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self._wake = asyncio.Event()
        self.mark_delay_s = mark_delay_s
        self.ack_timeout_s = ack_timeout_s
        self.problem: str | None = None  # why the relay loop cannot publish, while it cannot
        self.in_flight: set[uuid.UUID] = set()  # being published at commit: not the loop's
        self._confirming: set[asyncio.Task[None]] = set()
        self._published: list[uuid.UUID] = []  # confirmed by PubAck, not yet marked sent
        self._marker: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def transaction(self, conn: Connection | None = None) -> AsyncIterator[Connection]:
        """A transaction whose outbox rows are handed to NATS as soon as it commits, on
        `conn` or on a connection of the pool. The PubAcks are awaited in the background;
        a row whose publishing fails goes back to the relay loop."""
        if conn is None:
            async with self.pool.acquire() as pooled, self.transaction(pooled) as tx:
                yield tx
            return
        written: list[Row] = []
        token = _written.set(written)
        try:
            async with conn.transaction():
                yield conn
                # claimed before the commit makes them visible: the loop never takes them
                self.in_flight.update(r["event_id"] for r in written)
        except BaseException:
            self.in_flight.difference_update(r["event_id"] for r in written)
            raise
        finally:
            _written.reset(token)
        if written:
            await self._publish_committed(written)

    async def _publish_committed(self, rows: list[Row]) -> None:
        ids = [r["event_id"] for r in rows]
        try:
            acks = await self.send(rows, link=False)
        except BaseException as exc:
            self._give_back(ids, exc)
            if not isinstance(exc, Exception):
                raise
            return
        task = asyncio.create_task(self._confirm(rows, acks))
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    async def _confirm(self, rows: list[Row], acks: list[asyncio.Future[Any]]) -> None:
        ids = [r["event_id"] for r in rows]
        try:
            await self._acknowledged(acks)
        except Exception as exc:
            self._give_back(ids, exc)
            return
        _count(rows)
        self._published.extend(ids)
        if self._marker is None or self._marker.done():
            self._marker = asyncio.create_task(self._mark_published())

    def _give_back(self, ids: list[uuid.UUID], exc: BaseException) -> None:
        self.in_flight.difference_update(ids)  # the loop's to publish now
        self._wake.set()
        log.warning("publishing at commit failed, the relay will retry: %s", describe(exc))

    async def _mark_published(self) -> None:
        """Mark rows published at commit as sent, many transactions' rows per statement."""
        while self._published:
            await asyncio.sleep(self.mark_delay_s)  # let more transactions' rows gather
            ids, self._published = self._published, []
            # One round trip: a simple-protocol string runs as one implicit transaction, and
            # uuid.UUID renders only hex digits and dashes, so the literals are safe.
            listed = ",".join(f"'{event_id}'" for event_id in ids)
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute(
                        "SET LOCAL synchronous_commit = off;"
                        f" UPDATE outbox SET sent_at = now() WHERE event_id IN ({listed})"
                    )
            except Exception as exc:  # the loop publishes them again; JetStream drops copies
                log.warning("marking published outbox rows failed: %s", exc)
            finally:
                self.in_flight.difference_update(ids)

    async def run(self) -> None:
        listener: PoolConnectionProxy | None = None  # receives the NOTIFYs of `add`

        def wake(*_: object) -> None:
            self._wake.set()

        failures = 0
        try:
            while True:
                try:
                    if not usable(listener):  # new, or PostgreSQL went away
                        await self._release(listener)
                        listener = None
                        listener = await self.pool.acquire(timeout=self.ack_timeout_s)
                        await listener.add_listener(self.channel, wake)
                    sent = await self.relay_once()
                except Exception as exc:  # NATS or PostgreSQL away: one line, then retry
                    failures += 1
                    await self._failed(exc, failures)
                    continue
                if failures:
                    log.info("outbox relay publishing again after %d failed tries", failures)
                    failures, self.problem = 0, None
                if sent == self.batch_size:
                    continue  # more waiting
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                self._wake.clear()
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.remove_listener(self.channel, wake)
            await self._release(listener)

    async def _release(self, conn: PoolConnectionProxy | None) -> None:
        if conn is not None:
            with contextlib.suppress(Exception):
                await self.pool.release(conn)

    async def _failed(self, exc: Exception, failures: int) -> None:
        self.problem = describe(exc)
        if failures == 1:
            log.warning("outbox relay cannot publish, retrying with backoff: %s", self.problem)
        if isinstance(exc, nats.errors.NoRespondersError):
            # nobody stores the subject: the stream was deleted; declare the streams again
            with contextlib.suppress(Exception):
                await ensure_streams(self.js)
        # at most 2 s: a stream's leader election is over in about 5 s, and every second
        # the relay waits beyond it is a second more of events held back
        await asyncio.sleep(backoff_seconds(failures, base=self.poll_interval, cap=2.0))

    async def relay_once(self) -> int:
        """Publish one batch of unsent rows and mark them sent; returns how many."""
        async with self.pool.acquire(timeout=self.ack_timeout_s) as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, event_id, subject, payload, headers FROM outbox"
                " WHERE sent_at IS NULL AND event_id <> ALL($2::uuid[])"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self.batch_size,
                list(self.in_flight),
            )
            # a transaction may commit between reading `in_flight` and the query's snapshot
            rows = [r for r in rows if r["event_id"] not in self.in_flight]
            if not rows:
                PENDING.set(0)
                return 0
            await self.publish(rows)
            await self.mark_sent(conn, [r["id"] for r in rows])
        return len(rows)

    async def publish(self, rows: Sequence[Row] | Sequence[asyncpg.Record]) -> None:
        """Publish and wait for every PubAck (at most `ack_timeout_s`)."""
        await self._acknowledged(await self.send(rows))
        _count(rows)

    async def _acknowledged(self, acks: list[asyncio.Future[Any]]) -> None:
        """Wait for the PubAcks; raise TimeoutError when they do not all come in time. The
        futures are then cancelled: nats-py never fails them when the connection is lost,
        and each one holds a slot of its limited number of pending publishes."""
        try:
            await asyncio.wait_for(asyncio.gather(*acks), self.ack_timeout_s)
        except BaseException:
            for ack in acks:
                ack.cancel()
            raise

    async def send(
        self, rows: Sequence[Row] | Sequence[asyncpg.Record], *, link: bool = True
    ) -> list[asyncio.Future[Any]]:
        """Hand rows to NATS in outbox order (publish_async keeps it on the wire); returns
        the PubAcks to wait for. Each message carries the trace context stored with its row,
        so its consumer continues the trace of the transaction that wrote it; the batch gets
        one span (a span per row would cost more than the sending), linked to those traces
        if `link` (at commit it is a child of that transaction's span already)."""
        links = [
            trace.Link(
                trace.get_current_span(context_from_headers(r["headers"])).get_span_context()
            )
            for r in (rows[:32] if link else ())
        ]
        with tracer.start_as_current_span(
            "outbox publish",
            kind=trace.SpanKind.PRODUCER,
            links=links,
            attributes={"messaging.system": "nats", "messaging.batch.message_count": len(rows)},
        ):
            acks = [
                await self.js.publish_async(
                    row["subject"],
                    bytes(row["payload"]),
                    headers={**row["headers"], "Nats-Msg-Id": str(row["event_id"])},
                    stream=stream_for(row["subject"]).name,
                )
                for row in rows
            ]
        return acks

    async def mark_sent(self, conn: Connection, ids: list[int]) -> None:
        # Losing this on a crash only republishes rows JetStream then drops as duplicates,
        # so the commit need not wait for the disk.
        await conn.execute("SET LOCAL synchronous_commit = off")
        await conn.execute("UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", ids)


def _count(rows: Sequence[Row] | Sequence[asyncpg.Record]) -> None:
    for subject, n in collections.Counter(row["subject"] for row in rows).items():
        PUBLISHED.labels(subject).inc(n)


async def purge(
    pool: asyncpg.Pool, sent_older_than_hours: float, inbox_older_than_days: float
) -> bool:
    """Housekeeping: drop published outbox rows, and inbox ids and try counts far past any
    redelivery. Every replica of a service calls it each interval; the one that gets the
    schema's purge lock does it (a transaction-level try-lock: no waiting, let go at commit),
    the others skip the round. Returns whether this call purged."""
    async with pool.acquire() as conn, conn.transaction():
        locked = await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext('fleet-outbox-purge:' || current_schema()))"
        )
        if not locked:
            return False
        await conn.execute(
            "DELETE FROM outbox WHERE sent_at < now() - make_interval(secs => $1)",
            sent_older_than_hours * 3600,
        )
        await conn.execute(
            "DELETE FROM inbox WHERE applied_at < now() - make_interval(secs => $1)",
            inbox_older_than_days * 86400,
        )
        await conn.execute(
            "DELETE FROM delivery_attempts WHERE last_at < now() - make_interval(secs => $1)",
            inbox_older_than_days * 86400,
        )
        PENDING.set(await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))
    return True
