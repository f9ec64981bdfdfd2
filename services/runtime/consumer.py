"""Consumers: durable JetStream pull consumers with explicit acks, inbox deduplication,
bounded redelivery with backoff and a dead-letter subject.

A batch of messages is validated, then applied in one transaction together with the inbox
rows of its event ids, then acknowledged. What does not validate is dead-lettered at once.
When a batch fails, each of its messages is retried alone, so one poison message cannot hold
back the others; a message that still fails is redelivered with exponential backoff and,
after `max_deliver` deliveries, dead-lettered. Nothing is dropped without a trace: every
dead letter is stored on `deadletter.<subject>` with the reason in its headers, logged and
counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from contracts import Event, dead_letter_subject
from contracts.catalog import DEAD_LETTER_STREAM, stream_for
from contracts.events import INBOUND
from services.runtime import inbox
from services.runtime.db import Connection
from services.runtime.outbox import Relay
from services.runtime.pull import Puller
from services.runtime.telemetry import context_from_headers

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

E = TypeVar("E", bound=Event)
Handler = Callable[[Connection, list[E]], Awaitable[None]]
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


@dataclass(frozen=True)
class Consumer(Generic[E]):
    """What a service consumes: one event type, applied by `handle` in a transaction.

    `handle` receives only events not applied before, at most `batch_size` at a time."""

    name: str  # the durable consumer's name, e.g. "stats-subtask-completed"
    event: type[E]
    handle: Handler[E]
    batch_size: int = 1


class DeadLetter(Exception):
    """Raised by a handler for a message that can never be applied (no retry helps)."""


def backoff_seconds(delivered: int, base: float = 0.5, cap: float = 30.0) -> float:
    return float(min(cap, base * 2 ** max(0, delivered - 1)))


class Processor(Generic[E]):
    def __init__(
        self,
        consumer: Consumer[E],
        js: JetStreamContext,
        transaction: Transaction,
        max_deliver: int,
        ack_wait_s: float,
    ) -> None:
        self.consumer = consumer
        self.js = js
        self.transaction = transaction  # one whose outbox events go out at commit
        self.max_deliver = max_deliver
        self.ack_wait_s = ack_wait_s

    async def process(self, msgs: list[Msg]) -> None:
        valid: list[tuple[Msg, E]] = []
        for msg in msgs:
            try:
                event = self.consumer.event.model_validate_json(msg.data, context=INBOUND)
            except ValidationError as exc:
                await self.dead_letter(msg, "invalid", _short(exc))
                continue
            if msg.metadata.num_delivered > self.max_deliver:  # e.g. it crashed the process
                await self.dead_letter(msg, "max_deliver", "delivered too many times")
                continue
            valid.append((msg, event))
        if not valid:
            return
        keepalive = asyncio.create_task(self._keep_alive([m for m, _ in valid]))  # noqa: RUF006
        try:
            await self._apply_all(valid)
        finally:
            keepalive.cancel()

    async def _keep_alive(self, msgs: list[Msg]) -> None:
        """A slow handler must not see its messages redelivered elsewhere meanwhile: tell
        the server they are in progress, well within the ack wait."""
        while True:
            await asyncio.sleep(self.ack_wait_s / 3)
            for msg in msgs:
                if not msg._ackd:
                    await msg.in_progress()

    async def _apply_all(self, valid: list[tuple[Msg, E]]) -> None:
        try:
            await self.apply([e for _, e in valid])
        except Exception as exc:
            if len(valid) == 1:
                await self.failed(valid[0][0], exc)
                return
            log.warning(
                "batch of %d failed, applying one by one: %s",
                len(valid),
                exc,
                extra={"consumer": self.consumer.name},
            )
            for msg, event in valid:
                try:
                    await self.apply([event])
                except Exception as one_exc:
                    await self.failed(msg, one_exc)
                else:
                    await msg.ack()
            return
        for msg, _ in valid:
            await msg.ack()

    async def apply(self, events: list[E]) -> None:
        async with self.transaction() as conn:
            fresh_ids = await inbox.claim(conn, self.consumer.name, [e.event_id for e in events])
            fresh: list[E] = []
            for e in events:
                if e.event_id in fresh_ids:
                    fresh.append(e)
                    fresh_ids.discard(e.event_id)  # the same event twice in one batch: once
            if fresh:
                await self.consumer.handle(conn, fresh)
        APPLIED.labels(self.consumer.name).inc(len(fresh))
        if len(fresh) < len(events):
            DUPLICATES.labels(self.consumer.name).inc(len(events) - len(fresh))

    async def failed(self, msg: Msg, exc: Exception) -> None:
        delivered = msg.metadata.num_delivered
        if isinstance(exc, DeadLetter):
            await self.dead_letter(msg, "rejected", str(exc))
        elif delivered >= self.max_deliver:
            await self.dead_letter(msg, "max_deliver", f"{type(exc).__name__}: {exc}")
        else:
            delay = backoff_seconds(delivered)
            log.warning(
                "delivery %d of %s failed, retry in %.1fs: %s",
                delivered,
                msg.subject,
                delay,
                exc,
                extra={"consumer": self.consumer.name},
            )
            RETRIED.labels(self.consumer.name).inc()
            await msg.nak(delay=delay)

    async def dead_letter(self, msg: Msg, reason: str, detail: str) -> None:
        seq = msg.metadata.sequence.stream
        headers = {
            **(msg.headers or {}),
            "Nats-Msg-Id": f"{self.consumer.name}:{seq}",
            "Fleet-Dead-Reason": reason,
            "Fleet-Dead-Detail": detail[:1000],
            "Fleet-Consumer": self.consumer.name,
            "Fleet-Original-Subject": msg.subject,
            "Fleet-Original-Sequence": str(seq),
            "Fleet-Delivered": str(msg.metadata.num_delivered),
        }
        # stored (PubAck awaited) before the original is terminated: never lost in between
        await self.js.publish(
            dead_letter_subject(msg.subject),
            msg.data,
            headers=headers,
            stream=DEAD_LETTER_STREAM.name,
        )
        await msg.term()
        DEAD_LETTERED.labels(self.consumer.name, reason).inc()
        log.error(
            "dead-lettered %s #%d (%s): %s",
            msg.subject,
            seq,
            reason,
            detail,
            extra={"consumer": self.consumer.name},
        )


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors()[:5]
    )


class Subscription:
    """One durable pull consumer and the loop that applies what it delivers, batch by batch
    (a lone message at once, a backlog up to `batch_size` per transaction). The loop keeps
    one connection of the pool for its transactions, replaced when it breaks: handing it
    back after every batch would cost a reset round trip each time."""

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
        self.conn: PoolConnectionProxy | None = None
        self.processor: Processor[Any] = Processor(
            consumer, self.js, lambda: relay.transaction(self.conn), max_deliver, ack_wait_s
        )
        self.stream = stream_for(consumer.event.subject).name
        self.ack_wait_s = ack_wait_s

    async def open(self) -> None:
        config = ConsumerConfig(
            durable_name=self.consumer.name,
            filter_subject=self.consumer.event.subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_deliver=-1,  # the processor dead-letters at its own limit, with a reason
            ack_wait=self.ack_wait_s,
            max_ack_pending=max(1000, 4 * self.consumer.batch_size),
        )
        await self.js.add_consumer(self.stream, config)  # creates, or updates editable fields

    async def run(self) -> None:
        puller = Puller(self.nc, self.stream, self.consumer.name, self.consumer.batch_size)
        await puller.start()
        try:
            while True:
                msgs = await puller.next_batch()
                if self.conn is None or self.conn.is_closed():
                    await self._release()
                    self.conn = await self.pool.acquire()
                await self._apply(msgs)
        finally:
            await puller.stop()
            await self._release()

    async def _release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
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
        ):
            await self.processor.process(msgs)
        BATCH_SECONDS.labels(self.consumer.name).observe(time.perf_counter() - started)
