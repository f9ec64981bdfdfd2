"""NATS users, and what each may publish and subscribe.

A service may publish what the event catalog (`contracts.catalog.CHANNELS`) says it produces,
its dead letters and its heartbeat; it may pull from, acknowledge and declare its own durable
consumers only, declare the catalog's streams (every service declares them identically) and
ask JetStream about them; it receives replies on an inbox prefix of its own. It cannot delete
or purge a stream or a consumer, nor read another service's consumer. Agents and UIs get
their own users, limited to their subjects. `admin` may do anything (operators' tools).

`fleet up` writes a server configuration from these with passwords generated once under
`FLEET_HOME/secrets/nats-users.json` (mode 600) and gives each service its own user; a
deployment generates the same with `fleet nats-config`.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from contracts.catalog import CHANNELS, DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM, stream_for

FLEET_SERVICES = ("sync", "benchmark", "planner", "guardian", "stats")
USERS_FILE = Path("secrets") / "nats-users.json"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


@dataclass(frozen=True)
class Durable:
    """A durable consumer a service pulls from."""

    stream: str
    name: str


def inbox_prefix(user: str) -> str:
    """Where a service's replies (PubAcks, pull responses) come: its own, so no one else's
    replies can be subscribed to."""
    return f"_INBOX_{user}"


# What a service does beyond the catalog and its consumers.
_EXTRA: Mapping[str, Permissions] = {
    # guardian listens to every heartbeat and reads the recent dead letters for its reports
    "guardian": Permissions(
        publish=(f"$JS.API.STREAM.MSG.GET.{DEAD_LETTER_STREAM.name}",),
        subscribe=("service.heartbeat",),
    ),
}

CLIENTS: Mapping[str, Permissions] = {
    # an agent reports on the subtasks it is given and follows its plans
    "agent": Permissions(
        publish=("subtask.started", "subtask.completed", "subtask.failed", "$JS.API.INFO"),
        subscribe=("subtask.ready", "approval.resolved", "plan.>", "_INBOX.>"),
    ),
    # a UI says what its users think of models, asks for benchmarks, and watches
    "ui": Permissions(
        publish=("model.dismissed", "model.rewarded", "benchmark.requested", "$JS.API.INFO"),
        subscribe=("plan.>", "subtask.>", "approval.>", "benchmark.>", "service.>", "_INBOX.>"),
    ),
    "admin": Permissions(publish=(">",), subscribe=(">",)),
}


def service_permissions(service: str, durables: Iterable[Durable]) -> Permissions:
    produced = [c.subject for c in CHANNELS if service in c.producers]
    publish = [
        "$JS.API.INFO",
        "$JS.API.STREAM.INFO.*",
        "$JS.API.STREAM.CREATE.*",
        "$JS.API.STREAM.UPDATE.*",
        *produced,
        DEAD_LETTER_PREFIX + ">",
    ]
    for d in durables:
        api = f"$JS.API.CONSUMER.%s.{d.stream}.{d.name}"
        publish += [
            api % "CREATE",
            api % "CREATE" + ".>",  # the filter subject follows the name
            api % "DURABLE.CREATE",
            api % "INFO",
            api % "MSG.NEXT",
            f"$JS.ACK.{d.stream}.{d.name}.>",
        ]
    extra = _EXTRA.get(service, Permissions((), ()))
    return Permissions(
        publish=tuple(dict.fromkeys([*publish, *extra.publish])),
        subscribe=(f"{inbox_prefix(service)}.>", *extra.subscribe),
    )


def fleet_users() -> dict[str, Permissions]:
    """Every user of a fleet: its five services (their durable consumers read from their
    specs) and the clients."""
    users: dict[str, Permissions] = {}
    for name in FLEET_SERVICES:
        spec = importlib.import_module(f"services.{name}.app").build()
        durables = [Durable(stream_for(c.event.subject).name, c.name) for c in spec.consumers]
        users[name] = service_permissions(name, durables)
    return {**users, **CLIENTS}


def passwords(home: Path, users: Iterable[str]) -> dict[str, str]:
    """Each user's password, generated once and kept in FLEET_HOME (mode 600)."""
    path = home / USERS_FILE
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [u for u in users if u not in known]
    if missing:
        known |= {u: secrets.token_urlsafe(24) for u in missing}
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(known, out, indent=2)
        tmp.replace(path)
    return known


def password_variable(user: str) -> str:
    """The environment variable a deployment's NATS server reads `user`'s password from."""
    return f"{user.upper()}_NATS_PASSWORD"


def server_config(
    users: Mapping[str, Permissions], secrets_by_user: Mapping[str, str] | None = None
) -> str:
    """A nats-server configuration (JSON is valid in its format) with these users; without
    `secrets_by_user`, each password is a reference to an environment variable of the
    server's (`password_variable`), which is how deployments keep them out of the file."""
    if secrets_by_user is None:
        text = server_config(users, {u: f"@@{password_variable(u)}@@" for u in users})
        return re.sub(r'"@@(\w+)@@"', r"$\1", text)
    return json.dumps(
        {
            "authorization": {
                "users": [
                    {
                        "user": user,
                        "password": secrets_by_user[user],
                        "permissions": {
                            "publish": {"allow": list(p.publish)},
                            "subscribe": {"allow": list(p.subscribe)},
                        },
                    }
                    for user, p in users.items()
                ]
            }
        },
        indent=2,
    )
