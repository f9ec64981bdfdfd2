"""Continuous pull from a durable JetStream consumer (what nats.go calls `Consume()`).

nats-py's `fetch()` either returns only what is there already or, on a long poll, waits
until the whole batch is filled or the timeout passes; and it pays an `asyncio.wait_for`
per message. Here one pull request is kept open at a time; its messages land in a buffer
through a subscription callback as they arrive, and `next_batch()` hands out whatever is
buffered (at least one message, at most `batch_size`). A lone message is handed out at
once, a backlog in full batches, and the next batch is fetched while this one is applied.

When the durable consumer is gone (an operator deleted it, or its stream) the server answers
a pull with "Consumer Deleted" or nobody answers at all (503); the puller then declares it
again through `recreate`, with backoff, logging once per incident.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.runtime.faults import backoff_seconds, describe

log = logging.getLogger(__name__)

_NO_MESSAGES, _REQUEST_TIMEOUT, _CONFLICT, _HEARTBEAT = "404", "408", "409", "100"
_NO_RESPONDERS = "503"


class Puller:
    def __init__(
        self,
        nc: Nats,
        stream: str,
        durable: str,
        batch_size: int,
        recreate: Callable[[], Awaitable[None]],
        expires_s: float = 5.0,
    ) -> None:
        self.nc = nc
        self.durable = durable
        self.recreate = recreate
        self.problem: str | None = None  # why it cannot pull, while it cannot
        self._missing = False
        self._failures = 0
        self.api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.request_size = 2 * batch_size
        self.batch_size = batch_size
        self.expires_s = expires_s
        self.buffer: list[Msg] = []
        self._has_messages = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._request_done = asyncio.Event()
        self._delivered = 0
        self._inbox = ""
        self._reconnected = asyncio.Event()
        self._sub: Subscription | None = None
        self._requests: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # pull requests die with a lost connection: ask again as soon as it is back
        watch = getattr(self.nc, "on_reconnect", None)
        self._reconnected = watch() if watch else asyncio.Event()
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_message)
        self._requests = asyncio.create_task(self._request_loop(), name=f"pull {self.api}")

    async def stop(self) -> None:
        if self._requests:
            self._requests.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._requests
        if self._sub:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def next_batch(self) -> list[Msg]:
        """Wait for at least one message; return at most `batch_size` of those buffered."""
        while not self.buffer:
            self._has_messages.clear()
            await self._has_messages.wait()
        batch = self.buffer[: self.batch_size]
        del self.buffer[: self.batch_size]
        if len(self.buffer) < self.batch_size:
            self._room.set()
        return batch

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None and msg.reply:
            self._failures = 0
            self.buffer.append(msg)
            self._has_messages.set()
            self._delivered += 1
            if self._delivered >= self.request_size:
                self._request_done.set()
        elif status == _NO_RESPONDERS or (
            status == _CONFLICT
            and "deleted" in str((msg.headers or {}).get("Description", "")).lower()
        ):
            self._missing = True  # no such consumer (any more): declare it again
            self._request_done.set()
        elif status in (_NO_MESSAGES, _REQUEST_TIMEOUT, _CONFLICT):
            self._failures = 0
            self._request_done.set()  # expired, or the server dropped it: ask again
        elif status != _HEARTBEAT:
            self._failures += 1
            if self._failures == 1:
                log.warning("pull request answered %s: %s", status, msg.headers)
            self._request_done.set()

    async def _request_loop(self) -> None:
        request = json.dumps(
            {"batch": self.request_size, "expires": int(self.expires_s * 1e9)}
        ).encode()
        while True:
            while len(self.buffer) >= self.batch_size:  # backpressure: apply before asking
                self._room.clear()
                await self._room.wait()
            if self._missing:
                await self._declare_again()
            elif self._failures:
                await asyncio.sleep(backoff_seconds(self._failures, base=0.1, cap=5.0))
            self._request_done.clear()
            self._delivered = 0
            try:
                await self.nc.publish(self.api, request, reply=self._inbox)
                # no answer by then (the server forgot it): ask again
                await asyncio.wait_for(self._answered_or_reconnected(), self.expires_s + 1)
            except TimeoutError:
                continue
            except Exception as exc:  # disconnected; nats-py reconnects by itself
                self._failures += 1
                if self._failures == 1:
                    log.warning("pull request failed, retrying: %s", describe(exc))
                continue

    async def _answered_or_reconnected(self) -> None:
        answered = asyncio.ensure_future(self._request_done.wait())
        reconnected = asyncio.ensure_future(self._reconnected.wait())
        try:
            await asyncio.wait((answered, reconnected), return_when=asyncio.FIRST_COMPLETED)
        finally:
            answered.cancel()
            reconnected.cancel()
        self._reconnected.clear()

    async def _declare_again(self) -> None:
        """Recreate the durable consumer (and its stream) until it works, with backoff."""
        since = time.monotonic()
        failures = 0
        self.problem = f"durable consumer {self.durable} missing"
        log.warning("%s, declaring it again", self.problem)
        while True:
            try:
                await self.recreate()
                break
            except Exception as exc:
                failures += 1
                self.problem = f"durable consumer {self.durable} missing: {describe(exc)}"
                if failures == 1:
                    log.warning("declaring %s failed, retrying: %s", self.durable, describe(exc))
                await asyncio.sleep(backoff_seconds(failures, base=0.2, cap=5.0))
        self._missing = False
        self.problem = None
        log.info(
            "durable consumer %s declared again after %.1fs", self.durable, time.monotonic() - since
        )
