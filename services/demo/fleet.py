"""How an outside client reaches a running `fleet up`: its service URLs from
FLEET_HOME/stack.json, NATS users and passwords from FLEET_HOME/secrets/nats-users.json,
bearer tokens signed with the development secret (or AUTH_JWT_SECRET)."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import nats
from nats.aio.client import Client as Nats

from contracts.events import Event
from services.runtime.auth import Role, development_secret, fleet_home, mint


class NotRunning(RuntimeError):
    pass


@dataclass(frozen=True)
class Fleet:
    home: Path
    urls: dict[str, str]  # service name -> base URL
    nats_url: str  # without credentials
    nats_passwords: dict[str, str]  # client user -> password; empty: NATS without users
    jwt_secret: str

    @classmethod
    def find(cls, home: Path | None = None) -> Fleet:
        home = home or fleet_home()
        try:
            state: dict[str, Any] = json.loads((home / "stack.json").read_text())
        except FileNotFoundError:
            raise NotRunning(
                f"LLM Fleet is not running from {home}: start it with `make up`"
            ) from None
        users = home / "secrets" / "nats-users.json"
        passwords: dict[str, str] = json.loads(users.read_text()) if users.exists() else {}
        url = urlsplit(state["nats_url"])
        if passwords:  # the stack's own URL carries the admin's credentials: leave them
            url = url._replace(netloc=url.hostname + (f":{url.port}" if url.port else ""))
        return cls(
            home=home,
            urls=dict(state["services"]),
            nats_url=urlunsplit(url),
            nats_passwords=passwords,
            jwt_secret=os.environ.get("AUTH_JWT_SECRET") or development_secret(home),
        )

    def token(self, user: str, role: Role = "user") -> str:
        return mint(self.jwt_secret, user, role)

    def client(self, user: str, role: Role = "user") -> httpx.AsyncClient:
        """HTTP as `user`: `await api.get(fleet.url("stats", "/v1/leaderboard"))`."""
        headers = {"Authorization": f"Bearer {self.token(user, role)}"}
        return httpx.AsyncClient(headers=headers, timeout=10, transport=PatientTransport())

    def url(self, service: str, path: str) -> str:
        return self.urls[service] + path

    async def connect(self, user: str) -> Nats:
        """NATS as a client user: `agent` (subtask reports) or `ui` (rewards, dismissals)."""
        if not self.nats_passwords:
            return await nats.connect(self.nats_url, name=f"demo-{user}")
        password = self.nats_passwords[user]
        return await nats.connect(self.nats_url, user=user, password=password, name=f"demo-{user}")


class PatientTransport(httpx.AsyncHTTPTransport):
    """A service restarting (connection refused) or answering 503 `unavailable` (PostgreSQL
    or NATS away for a moment) is asked again after its Retry-After, a few times."""

    def __init__(self) -> None:
        super().__init__(retries=3)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(5):
            response = await super().handle_async_request(request)
            if response.status_code != 503:
                return response
            await response.aclose()
            wait = response.headers.get("Retry-After", "1")
            await asyncio.sleep(min(float(wait), 5) if wait.isdigit() else 1)
        return await super().handle_async_request(request)


async def publish(nc: Nats, event: Event) -> None:
    """Into JetStream, deduplicated by the event's id (a retry must reuse the event)."""
    await nc.jetstream().publish(
        event.subject,
        event.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(event.event_id)},
    )
