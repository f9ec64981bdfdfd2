"""NATS: the connection every service keeps, and the streams of the catalog.

The connection reconnects for ever, whatever the server does to it. nats-py closes a
connection for good when the server sends any `-ERR` (a Maximum Payload Violation, say): the
server has dropped the connection by then, so here it is reopened like any lost connection,
and subscriptions, pull requests and publishers carry on over the new one. NATS_URL may list
several servers of a cluster, comma-separated; the client moves to another when one dies.

Streams are stored on NATS_STREAM_REPLICAS servers (1 by default; 3 on a three-node
cluster). When the server leading a replicated stream dies, the others elect a new leader
within seconds; meanwhile a publish gets "no responders" or no PubAck at all. Every publish
path therefore retries with the same `Nats-Msg-Id` until it is acknowledged (the outbox's
relay; `publish_until_acknowledged` for the others), and the streams' duplicate window
(`DUPLICATE_WINDOW_S`) is longer than the retry horizon of one publish
(`PUBLISH_RETRY_HORIZON_S`), so a copy stored before its PubAck was lost is dropped by
JetStream. Past that window a copy is still not applied twice: consumers keep the ids they
applied (their inbox) for days.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import nats.errors
import nats.js.errors
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from nats.js.api import PubAck, StreamConfig
from nats.js.errors import NotFoundError
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts import STREAMS, StreamSpec
from services.runtime.nats_users import inbox_prefix

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 120.0
PUBLISH_RETRY_HORIZON_S = 60.0  # one publish retried this long at most, inside the window
assert PUBLISH_RETRY_HORIZON_S < DUPLICATE_WINDOW_S


class StreamSettings(BaseSettings):
    """How the catalog's streams are stored (every service declares them identically)."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    nats_stream_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="Servers each stream is stored on: 1 on a single server, 3 on a "
        "three-node cluster (a stream then survives the loss of one node).",
    )


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
        [server.strip() for server in url.split(",") if server.strip()],
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


def stream_config(spec: StreamSpec, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        description=spec.description,
        max_age=spec.max_age_days * 86400.0,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


async def ensure_streams(
    js: JetStreamContext,
    specs: tuple[StreamSpec, ...] = STREAMS,
    replicas: int | None = None,
) -> None:
    """Create or update the streams of the catalog; the definitions live in `contracts`,
    so every service declares them identically, with NATS_STREAM_REPLICAS replicas unless
    `replicas` says otherwise. Also what recreates a deleted stream. A stream another
    service creates at the same moment, or a JetStream too busy to answer (a cluster
    electing its leaders), is tried again for a while."""
    if replicas is None:
        replicas = StreamSettings().nats_stream_replicas
    for spec in specs:
        config = stream_config(spec, replicas)
        for attempt in range(1, 11):
            try:
                try:
                    await js.update_stream(config)
                except NotFoundError:
                    await js.add_stream(config)
                break
            except Exception as exc:
                if attempt == 10:
                    raise
                log.debug("declaring stream %s failed, trying again: %s", spec.name, exc)
                await asyncio.sleep(0.1 * attempt)


RETRIED_PUBLISH_ERRORS = (
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,  # what JetStream publishes get instead
    nats.js.errors.ServiceUnavailableError,
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)


async def publish_until_acknowledged(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: Mapping[str, str],
    stream: str | None = None,
    ack_timeout_s: float = 2.0,
    horizon_s: float = PUBLISH_RETRY_HORIZON_S,
) -> PubAck:
    """Publish to JetStream and, while no stream answers (a leader election, a node or the
    connection lost), publish again with the same `Nats-Msg-Id` every 0.25 s until the PubAck
    comes; raises the last error after `horizon_s` (inside the duplicate window, so a copy
    stored before its PubAck was lost is dropped). Other errors are raised at once."""
    if "Nats-Msg-Id" not in headers:
        raise ValueError("a publish retried needs a Nats-Msg-Id, or its copies are stored")
    deadline = time.monotonic() + horizon_s
    while True:
        try:
            return await js.publish(
                subject, payload, timeout=ack_timeout_s, stream=stream, headers=dict(headers)
            )
        except RETRIED_PUBLISH_ERRORS as exc:
            if time.monotonic() + 0.25 > deadline:
                raise
            log.debug("publish to %s not acknowledged, again: %r", subject, exc)
            await asyncio.sleep(0.25)
