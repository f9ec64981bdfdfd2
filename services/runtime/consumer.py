"""Consumers: durable JetStream pull consumers with explicit acks, inbox deduplication,
bounded retries with backoff and a dead-letter subject.

A batch of messages is validated, then applied in one transaction together with the inbox
rows of its event ids, then acknowledged. What does not validate is dead-lettered at once.
When a batch fails, each of its messages is retried alone, so one poison message cannot hold
back the others; a message that still fails is redelivered with exponential backoff and,
after `max_deliver` tries, dead-lettered. A redelivered message is applied alone too, so one
that crashes the process takes only itself to the dead-letter stream. While PostgreSQL or
NATS is unavailable the consumer pauses instead: no message pays for an outage. Nothing is
dropped without a trace: every dead letter is stored on `deadletter.<subject>` with the
reason in its headers, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
import nats.js.errors
from asyncpg.pool import PoolConnectionProxy
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from contracts import Event, dead_letter_subject
from contracts.catalog import DEAD_LETTER_STREAM, STREAMS, stream_for
from services.runtime import inbox
from services.runtime.db import Connection, usable
from services.runtime.faults import backoff_seconds, describe, permanent, unavailable
from services.runtime.messaging import ensure_streams
from services.runtime.outbox import Relay
from services.runtime.pull import Puller
from services.runtime.telemetry import context_from_headers

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

E = TypeVar("E", bound=Event)
T = TypeVar("T")
# a handler of a consumer that `claims_inbox` returns how many events it applied
Handler = Callable[[Connection, list[E]], Awaitable[int | None]]
Transaction = Callable[[], AbstractAsyncContextManager[Connection]]

APPLIED = Counter("fleet_events_applied_total", "Events applied by a consumer", ["consumer"])
DUPLICATES = Counter(
    "fleet_events_duplicate_total", "Redelivered events skipped by the inbox", ["consumer"]
)
RETRIED = Counter(
    "fleet_events_retried_total", "Deliveries that failed and were retried", ["consumer"]
)
BATCH_SECONDS = Histogram(
    "fleet_consumer_batch_seconds", "Time to apply and ack one batch", ["consumer"]
)
DEAD_LETTERED = Counter(
    "fleet_dead_letters_total", "Messages parked on the dead-letter subject", ["consumer", "reason"]
)
PAUSED = Gauge(
    "fleet_consumer_paused",
    "1 while a consumer waits for PostgreSQL or NATS, or cannot pull from its durable consumer",
    ["consumer"],
)


@dataclass(frozen=True)
class Consumer(Generic[E]):
    """What a service consumes: one event type, applied by `handle` in a transaction.

    `handle` receives only events not applied before, at most `batch_size` at a time.

    With `claims_inbox`, `handle` records the events' ids in the inbox itself, in the one
    statement that applies them, applies only those it recorded, and returns how many: it
    receives events possibly applied before (never the same one twice in a batch), and a
    fresh batch runs as that statement alone, outside an explicit transaction: no BEGIN, no
    separate claim, no COMMIT round trip (what a batch's latency was made of under load)."""

    name: str  # the durable consumer's name, e.g. "stats-subtask-completed"
    event: type[E]
    handle: Handler[E]
    batch_size: int = 1
    claims_inbox: bool = False


class DeadLetter(Exception):
    """Raised by a handler for a message that can never be applied (no retry helps)."""


class Processor(Generic[E]):
    """Applies what one durable consumer delivers: validate, dedupe, apply, acknowledge.

    Whose fault a failure is decides what happens to the message:
    - the message's (it does not validate, the handler raises `DeadLetter`, or PostgreSQL
      refuses its values): parked on the dead-letter stream at once;
    - the handler's (any other exception): retried with backoff, parked after `max_deliver`
      tries;
    - a dependency's (PostgreSQL or NATS unavailable, see `faults.unavailable`): nothing is
      counted against the message; the consumer pauses, keeps its messages in progress, and
      tries again with backoff until the dependency is back.

    Tries are counted by the consumer (`delivery_attempts`), not read from JetStream's
    delivery count, which also grows with redeliveries of messages never tried."""

    def __init__(
        self,
        consumer: Consumer[E],
        js: JetStreamContext,
        transaction: Transaction,
        max_deliver: int,
        ack_wait_s: float,
        max_pause_s: float = 1.0,
        connection: Transaction | None = None,
    ) -> None:
        self.consumer = consumer
        self.js = js
        self.transaction = transaction  # one whose outbox events go out at commit
        # outside a transaction: for the one statement of a consumer that claims_inbox
        self.connection = connection or transaction
        self.max_deliver = max_deliver
        self.ack_wait_s = ack_wait_s
        self.max_pause_s = max_pause_s
        self.problem: str | None = None  # why it is paused, while it is

    async def process(self, msgs: list[Msg]) -> None:
        fresh: list[tuple[Msg, E]] = []
        again: list[tuple[Msg, E]] = []
        for msg in msgs:
            try:
                event = self.consumer.event.from_wire(msg.data)
            except ValidationError as exc:
                await self.dead_letter(msg, "invalid", _short(exc))
                continue
            (fresh if msg.metadata.num_delivered == 1 else again).append((msg, event))
        if not fresh and not again:
            return
        keepalive = asyncio.create_task(self._keep_alive([m for m, _ in fresh + again]))  # noqa: RUF006
        try:
            if fresh:
                await self._apply_batch(fresh)
            for msg, event in again:  # tried before: alone, so it cannot fail the others
                await self._apply_one(msg, event, redelivered=True)
        finally:
            keepalive.cancel()

    async def _keep_alive(self, msgs: list[Msg]) -> None:
        """A slow handler, or a pause while PostgreSQL is away, must not see its messages
        redelivered meanwhile: tell the server they are in progress, well within the ack
        wait (this does not count as a delivery)."""
        while True:
            await asyncio.sleep(self.ack_wait_s / 3)
            for msg in msgs:
                if not msg._ackd:
                    with contextlib.suppress(Exception):  # NATS away: redelivery is harmless
                        await msg.in_progress()

    async def _apply_batch(self, items: list[tuple[Msg, E]]) -> None:
        try:
            await self._while_unavailable(lambda: self.apply([e for _, e in items]))
        except Exception as exc:
            if len(items) == 1:
                await self.failed(items[0][0], exc, tries=1)
                return
            log.warning(
                "batch of %d failed, applying one by one: %s",
                len(items),
                describe(exc),
                extra={"consumer": self.consumer.name},
            )
            for msg, event in items:
                await self._apply_one(msg, event, redelivered=False)
            return
        for msg, _ in items:
            await _settle(msg.ack())

    async def _apply_one(self, msg: Msg, event: E, *, redelivered: bool) -> None:
        tries = 1
        if redelivered:
            counted = await self._while_unavailable(lambda: self._count_try(event))
            if counted is None:  # applied before; only its acknowledgement was lost
                DUPLICATES.labels(self.consumer.name).inc()
                await _settle(msg.ack())
                return
            tries = counted
            if tries > self.max_deliver:  # tried that often without an outcome: it crashes us
                await self.dead_letter(msg, "max_deliver", f"tried {tries - 1} times")
                return
        try:
            await self._while_unavailable(lambda: self.apply([event], retried=redelivered))
        except Exception as exc:
            await self.failed(msg, exc, tries)
            return
        await _settle(msg.ack())

    async def _while_unavailable(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run `step`, and run it again for as long as it fails because PostgreSQL or NATS
        is unavailable (backoff up to `max_pause_s`; one log line when pausing, one when
        resuming). Any other failure is raised."""
        failures = 0
        paused_at = 0.0
        while True:
            try:
                result = await step()
            except Exception as exc:
                if not unavailable(exc):
                    raise
                failures += 1
                self.problem = describe(exc)
                if failures == 1:
                    paused_at = time.monotonic()
                    PAUSED.labels(self.consumer.name).set(1)
                    log.warning(
                        "consumer paused, a dependency is unavailable: %s",
                        self.problem,
                        extra={"consumer": self.consumer.name},
                    )
                if isinstance(exc, NoRespondersError):  # a stream was deleted under us
                    with contextlib.suppress(Exception):
                        await ensure_streams(self.js)
                await asyncio.sleep(backoff_seconds(failures, base=0.1, cap=self.max_pause_s))
                continue
            if failures:
                self.problem = None
                PAUSED.labels(self.consumer.name).set(0)
                log.info(
                    "consumer resumed after %.1fs paused",
                    time.monotonic() - paused_at,
                    extra={"consumer": self.consumer.name},
                )
            return result

    async def apply(self, events: list[E], *, retried: bool = False) -> None:
        if self.consumer.claims_inbox and not retried:  # one statement: atomic by itself
            async with self.connection() as conn:
                applied = await self._handle_claiming(conn, events)
        else:
            async with self.transaction() as conn:
                if self.consumer.claims_inbox:
                    applied = await self._handle_claiming(conn, events)
                else:
                    applied = await self._claim_and_handle(conn, events)
                if retried:
                    await conn.execute(
                        "DELETE FROM delivery_attempts WHERE consumer = $1 AND event_id = ANY($2)",
                        self.consumer.name,
                        [e.event_id for e in events],
                    )
        APPLIED.labels(self.consumer.name).inc(applied)
        if applied < len(events):
            DUPLICATES.labels(self.consumer.name).inc(len(events) - applied)

    async def _claim_and_handle(self, conn: Connection, events: list[E]) -> int:
        fresh_ids = await inbox.claim(conn, self.consumer.name, [e.event_id for e in events])
        fresh: list[E] = []
        for e in events:
            if e.event_id in fresh_ids:
                fresh.append(e)
                fresh_ids.discard(e.event_id)  # the same event twice in one batch: once
        if fresh:
            await self.consumer.handle(conn, fresh)
        return len(fresh)

    async def _handle_claiming(self, conn: Connection, events: list[E]) -> int:
        once = list({e.event_id: e for e in events}.values())  # the same event twice: once
        applied = await self.consumer.handle(conn, once)
        if applied is None:
            raise TypeError(f"{self.consumer.name} claims its inbox: its handler must say how many")
        return applied

    async def _count_try(self, event: E) -> int | None:
        """Count one more try of a redelivered event (its first delivery counts as the first
        try); None when it was applied already."""
        async with self.transaction() as conn:
            tries: int | None = await conn.fetchval(
                "INSERT INTO delivery_attempts (consumer, event_id, tries)"
                " SELECT $1, $2, 2 WHERE NOT EXISTS"
                "  (SELECT 1 FROM inbox WHERE consumer = $1 AND event_id = $2)"
                " ON CONFLICT (consumer, event_id) DO UPDATE"
                " SET tries = delivery_attempts.tries + 1, last_at = now()"
                " RETURNING tries",
                self.consumer.name,
                event.event_id,
            )
        return tries

    async def failed(self, msg: Msg, exc: Exception, tries: int) -> None:
        if isinstance(exc, DeadLetter) or permanent(exc):
            await self.dead_letter(msg, "rejected", describe(exc))
        elif tries >= self.max_deliver:
            await self.dead_letter(msg, "max_deliver", describe(exc))
        else:
            delay = backoff_seconds(tries)
            log.warning(
                "try %d of %s failed, retry in %.1fs: %s",
                tries,
                msg.subject,
                delay,
                describe(exc),
                extra={"consumer": self.consumer.name},
            )
            RETRIED.labels(self.consumer.name).inc()
            await _settle(msg.nak(delay=delay))

    async def dead_letter(self, msg: Msg, reason: str, detail: str) -> None:
        """Park `msg` on the dead-letter stream (stored before the original is terminated,
        so it is never lost in between). What is parked always fits the server's payload
        limit: a body too large for the added headers is cut, and the headers say so and
        where the whole message stays (its stream keeps it until the stream's max age)."""
        seq = msg.metadata.sequence.stream
        stream = msg.metadata.stream
        ours = {
            "Nats-Msg-Id": f"{self.consumer.name}:{stream}:{seq}",
            "Fleet-Dead-Reason": reason,
            "Fleet-Dead-Detail": _one_line(detail)[:1000],
            "Fleet-Consumer": self.consumer.name,
            "Fleet-Original-Subject": msg.subject,
            "Fleet-Original-Stream": stream,
            "Fleet-Original-Sequence": str(seq),
            "Fleet-Delivered": str(msg.metadata.num_delivered),
        }
        limit: int = self.js._nc.max_payload
        original = dict(msg.headers or {})
        if _header_bytes(original) > limit // 4:  # keep what links it to its trace only
            original = {k: v for k, v in original.items() if k == "traceparent"}
        headers = {**original, **ours}
        body = msg.data
        room = limit - _header_bytes(headers) - 200  # the truncation header below
        if len(body) > room:
            headers["Fleet-Dead-Truncated"] = (
                f"body of {len(body)} bytes cut to {room}; the whole message is"
                f" sequence {seq} of stream {stream}"
            )
            body = body[:room]
        await self._while_unavailable(
            lambda: self.js.publish(
                dead_letter_subject(msg.subject),
                body,
                headers=headers,
                stream=DEAD_LETTER_STREAM.name,
            )
        )
        await _settle(msg.term())
        DEAD_LETTERED.labels(self.consumer.name, reason).inc()
        log.error(
            "dead-lettered %s #%d (%s): %s",
            msg.subject,
            seq,
            reason,
            _one_line(detail)[:1000],
            extra={"consumer": self.consumer.name},
        )


async def _settle(acknowledgement: Awaitable[None]) -> None:
    """Ack, nak or term: when NATS is away the message is simply redelivered later (and the
    inbox recognises it), so such a failure is not worth more than a debug line."""
    try:
        await acknowledgement
    except Exception as exc:
        if not unavailable(exc):
            raise
        log.debug("acknowledgement not sent: %s", describe(exc))


def _header_bytes(headers: dict[str, str]) -> int:
    """Size of `headers` as NATS frames them (`NATS/1.0` line, `key: value` lines, blank)."""
    return 12 + sum(len(k.encode()) + len(str(v).encode()) + 4 for k, v in headers.items())


def _one_line(text: str) -> str:
    return " ".join(text.split())  # a header value must not hold a line break


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors()[:5]
    )


class BatchSummary:
    """One INFO line per consumer per second at most, for the batches applied since the
    last one: how many, how many messages, their mean and longest time, and the trace of
    the latest (a line per batch would be hundreds a second under load). A batch after a
    quiet spell is logged at once."""

    def __init__(self, consumer: str, every_s: float = 1.0) -> None:
        self.consumer = consumer
        self.every_s = every_s
        self.logged_at = -every_s
        self.batches = self.messages = 0
        self.seconds = self.longest = 0.0

    def add(self, messages: int, seconds: float, span: trace.SpanContext) -> None:
        self.batches += 1
        self.messages += messages
        self.seconds += seconds
        self.longest = max(self.longest, seconds)
        now = time.monotonic()
        if now - self.logged_at < self.every_s:
            return
        extra: dict[str, object] = {
            "consumer": self.consumer,
            "batches": self.batches,
            "messages": self.messages,
            "mean_ms": round(self.seconds / self.batches * 1000, 1),
            "max_ms": round(self.longest * 1000, 1),
        }
        if span.is_valid:
            extra["trace_id"] = format(span.trace_id, "032x")  # the latest batch's
        log.info(
            "%s: %d batches, %d messages processed (mean %.1f ms, max %.1f ms)",
            self.consumer,
            self.batches,
            self.messages,
            extra["mean_ms"],
            extra["max_ms"],
            extra=extra,
        )
        self.logged_at = now
        self.batches = self.messages = 0
        self.seconds = self.longest = 0.0


async def declare(js: JetStreamContext, consumer: Consumer[Any], ack_wait_s: float) -> None:
    """Create or update a consumer's durable JetStream consumer (and its stream, if it is
    gone): what a service does at start, and `fleet declare` at deploy time."""
    stream = stream_for(consumer.event.subject)
    config = ConsumerConfig(
        durable_name=consumer.name,
        filter_subject=consumer.event.subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        max_deliver=-1,  # the processor dead-letters at its own limit, with a reason
        ack_wait=ack_wait_s,
        max_ack_pending=max(1000, 4 * consumer.batch_size),
    )
    try:
        await js.add_consumer(stream.name, config)  # creates or updates
    except nats.js.errors.NotFoundError:  # the stream itself is gone
        await ensure_streams(js, tuple(s for s in STREAMS if s == stream))
        await js.add_consumer(stream.name, config)


class Subscription:
    """One durable pull consumer and the loop that applies what it delivers, batch by batch
    (a lone message at once, a backlog up to `batch_size` per transaction). The loop keeps
    one connection of the pool for its transactions, replaced when it breaks: handing it
    back after every batch would cost a reset round trip each time. A durable consumer or
    stream deleted under it is declared again."""

    def __init__(
        self,
        consumer: Consumer[Any],
        nc: Nats,
        pool: asyncpg.Pool,
        relay: Relay,
        *,
        max_deliver: int,
        ack_wait_s: float,
    ) -> None:
        self.consumer = consumer
        self.nc = nc
        self.js = nc.jetstream()
        self.pool = pool
        self.relay = relay
        self.conn: PoolConnectionProxy | None = None
        self.processor: Processor[Any] = Processor(
            consumer,
            self.js,
            self._transaction,
            max_deliver,
            ack_wait_s,
            connection=self._connection,
        )
        self.summary = BatchSummary(consumer.name)
        self.stream = stream_for(consumer.event.subject)
        self.ack_wait_s = ack_wait_s
        self.puller = Puller(
            nc, self.stream.name, consumer.name, consumer.batch_size, recreate=self.open
        )
        PAUSED.labels(consumer.name).set(0)

    @property
    def problem(self) -> str | None:
        """Why this consumer is not consuming right now, if it is not."""
        return self.puller.problem or self.processor.problem

    async def open(self) -> None:
        """Declare the durable consumer (and its stream, if it is gone)."""
        await declare(self.js, self.consumer, self.ack_wait_s)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        async with self._connection() as kept, self.relay.transaction(kept) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """The loop's own connection (outside a transaction)."""
        if not usable(self.conn):  # first use, or PostgreSQL went away
            await self._release()
            self.conn = await self.pool.acquire(timeout=5)
        assert self.conn is not None
        try:
            yield self.conn
        except Exception as exc:
            if unavailable(exc):  # a connection that failed so is not trusted again
                await self._release(terminate=True)
            raise

    async def run(self) -> None:
        await self.puller.start()
        try:
            while True:
                await self._apply(await self.puller.next_batch())
        finally:
            await self.puller.stop()
            await self._release()

    async def _release(self, terminate: bool = False) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                if terminate:
                    conn.terminate()
                await self.pool.release(conn)  # a closed one is thrown away

    async def _apply(self, msgs: list[Msg]) -> None:
        # one message continues its producer's trace; a batch links to (up to 32 of) them
        if len(msgs) == 1:
            parent, links = context_from_headers(msgs[0].headers), None
        else:
            parent = None
            links = [
                trace.Link(
                    trace.get_current_span(context_from_headers(m.headers)).get_span_context()
                )
                for m in msgs[:32]
            ]
        started = time.perf_counter()
        with tracer.start_as_current_span(
            f"{self.consumer.event.subject} process",
            context=parent,
            links=links,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": self.consumer.event.subject,
                "messaging.consumer.group.name": self.consumer.name,
                "messaging.batch.message_count": len(msgs),
            },
        ) as span:
            await self.processor.process(msgs)
        seconds = time.perf_counter() - started
        BATCH_SECONDS.labels(self.consumer.name).observe(seconds)
        self.summary.add(len(msgs), seconds, span.get_span_context())
