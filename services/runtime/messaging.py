"""NATS: the connection every service keeps, and the streams of the catalog.

The connection reconnects for ever, whatever the server does to it. nats-py closes a
connection for good when the server sends any `-ERR` (a Maximum Payload Violation, say): the
server has dropped the connection by then, so here it is reopened like any lost connection,
and subscriptions, pull requests and publishers carry on over the new one.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from contracts import STREAMS, StreamSpec
from services.runtime.nats_users import inbox_prefix

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 120.0


class ResilientNats(Nats):
    """A nats-py client that treats a server's protocol error as a lost connection."""

    closing = False  # set by close(): what follows is a shutdown, not an outage

    def __init__(self) -> None:
        super().__init__()
        self.reconnected: list[asyncio.Event] = []  # set on each reconnection

    def on_reconnect(self) -> asyncio.Event:
        """An event set whenever the connection is reopened (the watcher clears it): pull
        requests pending on the lost connection are gone and must be made again."""
        event = asyncio.Event()
        self.reconnected.append(event)
        return event

    async def close(self) -> None:
        self.closing = True
        await super().close()

    async def _process_err(self, err_msg: str) -> None:
        text = err_msg.strip("'")
        lowered = text.lower()
        if "authorization" in lowered or "permissions violation" in lowered:
            await super()._process_err(err_msg)  # credentials: nothing a reconnect fixes
            return
        log.warning("nats server error, reconnecting: %s", text)
        await self._process_op_err(nats.errors.Error(f"nats: {text}"))


async def connect_nats(
    url: str, name: str, user: str | None = None, password: str | None = None
) -> Nats:
    """Connect (as `user` when given, receiving replies on an inbox prefix of its own, which
    its NATS permissions name), and reconnect for ever afterwards (every 0.5 s)."""
    client = ResilientNats()
    credentials: dict[str, str] = {"user": user, "password": password or ""} if user else {}

    async def error_cb(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def disconnected_cb() -> None:
        if not client.closing:  # closing on shutdown is no news
            log.warning("nats disconnected")

    async def reconnected_cb() -> None:
        log.info("nats reconnected")
        for event in client.reconnected:
            event.set()

    async def closed_cb() -> None:
        if not client.closing:
            log.error("nats connection closed")

    await client.connect(
        url,
        name=name,
        inbox_prefix=inbox_prefix(name),
        **credentials,  # type: ignore[arg-type]
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # typed int, sleeps any number
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        closed_cb=closed_cb,
    )
    return client


def stream_config(spec: StreamSpec) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        description=spec.description,
        max_age=spec.max_age_days * 86400.0,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


async def ensure_streams(js: JetStreamContext, specs: tuple[StreamSpec, ...] = STREAMS) -> None:
    """Create or update the streams of the catalog; the definitions live in `contracts`,
    so every service declares them identically. Also what recreates a deleted stream. A
    stream another service creates at the same moment, or a JetStream too busy to answer,
    is tried again a few times."""
    for spec in specs:
        config = stream_config(spec)
        for attempt in range(1, 6):
            try:
                try:
                    await js.update_stream(config)
                except NotFoundError:
                    await js.add_stream(config)
                break
            except Exception as exc:
                if attempt == 5:
                    raise
                log.debug("declaring stream %s failed, trying again: %s", spec.name, exc)
                await asyncio.sleep(0.1 * attempt)
