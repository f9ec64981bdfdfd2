"""Every SQL statement of guardian."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from services.guardian.domain import (
    Action,
    Attempt,
    AttemptFinished,
    Escalated,
    Flapped,
    Recovered,
    Reminded,
    Reset,
    RestartObserved,
    RestartRequested,
    StoredIncident,
    WentDown,
)
from services.runtime.db import Connection

LEADER_LOCK = "fleet-guardian-leader"


class StaleEpoch(RuntimeError):
    """Another replica took leadership since this one's epoch: its action is refused."""


# --- leadership ----------------------------------------------------------------------------


async def try_leader_lock(conn: asyncpg.Connection) -> bool:
    """The session-level advisory lock of the leader, on the caller's dedicated connection:
    it is held until that connection ends, whichever way the process dies."""
    got: bool = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", LEADER_LOCK)
    return got


async def take_leadership(conn: asyncpg.Connection, holder: str) -> int:
    epoch: int = await conn.fetchval(
        "UPDATE leadership SET epoch = epoch + 1, holder = $1, since = now() RETURNING epoch",
        holder,
    )
    return epoch


async def check_epoch(conn: Connection, epoch: int) -> None:
    """Inside the action's transaction: FOR SHARE makes a concurrent take-over wait for this
    transaction, and this transaction fail if a take-over came first."""
    current = await conn.fetchval("SELECT epoch FROM leadership FOR SHARE")
    if current != epoch:
        raise StaleEpoch(f"epoch {epoch} is stale: leadership is at epoch {current}")


async def leadership(conn: Connection) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT epoch, holder, since FROM leadership")
    assert row is not None
    return dict(row)


async def requests(conn: Connection) -> tuple[bool, list[tuple[str, str]]]:
    """Operators' stored requests: paused, and (service, by) of the resets asked for."""
    paused = bool(await conn.fetchval("SELECT paused FROM leadership"))
    rows = await conn.fetch(
        "SELECT service, reset_requested_by FROM held_services WHERE reset_requested_by IS NOT NULL"
    )
    return paused, [(r["service"], r["reset_requested_by"]) for r in rows]


async def set_paused(conn: Connection, paused: bool) -> None:
    await conn.execute("UPDATE leadership SET paused = $1", paused)


async def request_reset(conn: Connection, service: str, by: str) -> bool:
    """False when the service is not held (nothing to reset)."""
    done = await conn.execute(
        "UPDATE held_services SET reset_requested_by = $2 WHERE service = $1", service, by
    )
    return done != "UPDATE 0"


async def clear_reset_request(conn: Connection, service: str) -> None:
    await conn.execute(
        "UPDATE held_services SET reset_requested_by = NULL WHERE service = $1", service
    )


# --- what an action changes ------------------------------------------------------------------


async def record(conn: Connection, action: Action, epoch: int) -> None:
    """Store one transition, and what it changes in incidents, attempts and holds."""
    a = action
    if isinstance(a, WentDown):
        await conn.execute(
            "INSERT INTO incidents (incident_id, service, opened_at, reason, last_seen_at, epoch)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            a.incident_id,
            a.service,
            a.at,
            a.reason,
            a.last_seen_at,
            epoch,
        )
    elif isinstance(a, Flapped):
        await conn.execute(
            "UPDATE incidents SET flaps = flaps + 1 WHERE incident_id = $1", a.incident_id
        )
    elif isinstance(a, Reminded):
        await conn.execute(
            "UPDATE incidents SET reminders = reminders + 1 WHERE incident_id = $1", a.incident_id
        )
    elif isinstance(a, Recovered):
        await conn.execute(
            "UPDATE incidents SET closed_at = $2, downtime_seconds = $3 WHERE incident_id = $1",
            a.incident_id,
            a.at,
            a.downtime_s,
        )
    elif isinstance(a, RestartRequested | RestartObserved):
        by = "guardian" if isinstance(a, RestartRequested) else "orchestrator"
        reason = a.reason if isinstance(a, RestartRequested) else f"new instance {a.instance}"
        await conn.execute(
            "INSERT INTO restart_attempts"
            " (incident_id, attempt, service, requested_at, by, reason, epoch)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            a.incident_id,
            a.attempt,
            a.service,
            a.at,
            by,
            reason,
            epoch,
        )
    elif isinstance(a, AttemptFinished):
        await conn.execute(
            "UPDATE restart_attempts SET outcome = $3, succeeded = $4, finished_at = $5"
            " WHERE incident_id = $1 AND attempt = $2",
            a.incident_id,
            a.attempt,
            a.outcome,
            a.succeeded,
            a.at,
        )
    elif isinstance(a, Escalated):
        await conn.execute(
            "INSERT INTO held_services (service, incident_id, held_since) VALUES ($1, $2, $3)"
            " ON CONFLICT (service) DO UPDATE SET incident_id = $2, held_since = $3",
            a.service,
            a.incident_id,
            a.at,
        )
    elif isinstance(a, Reset):
        await conn.execute("DELETE FROM held_services WHERE service = $1", a.service)
        if a.incident_id is not None:  # its failed attempts no longer count
            await conn.execute(
                "UPDATE restart_attempts SET succeeded = NULL"
                " WHERE incident_id = $1 AND succeeded = false",
                a.incident_id,
            )
    await conn.execute(
        "INSERT INTO transitions (service, kind, at, incident_id, detail, epoch)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        a.service,
        a.kind,
        a.at,
        a.incident_id,
        a.detail(),
        epoch,
    )


async def save_report(
    conn: Connection, incident_id: uuid.UUID, at: datetime, name: str, report: str
) -> None:
    await conn.execute(
        "UPDATE incidents SET escalated_at = $2, report_name = $3, report = $4"
        " WHERE incident_id = $1",
        incident_id,
        at,
        name,
        report,
    )


# --- reading -----------------------------------------------------------------------------------


async def open_incidents(conn: Connection) -> list[StoredIncident]:
    rows = await conn.fetch(
        "SELECT incident_id, service, opened_at, reason, last_seen_at, flaps, reminders,"
        " escalated_at IS NOT NULL AS escalated FROM incidents WHERE closed_at IS NULL"
    )
    attempts = await conn.fetch(
        "SELECT incident_id, attempt, requested_at, by, reason, outcome, succeeded"
        " FROM restart_attempts WHERE incident_id = ANY($1::uuid[]) ORDER BY attempt",
        [r["incident_id"] for r in rows],
    )
    return [
        StoredIncident(
            r["incident_id"],
            r["service"],
            r["opened_at"],
            r["reason"],
            r["last_seen_at"],
            tuple(
                Attempt(
                    a["attempt"],
                    a["requested_at"],
                    a["by"],
                    a["reason"],
                    a["outcome"],
                    a["succeeded"],
                )
                for a in attempts
                if a["incident_id"] == r["incident_id"]
            ),
            r["flaps"],
            r["reminders"],
            r["escalated"],
        )
        for r in rows
    ]


async def held_services(conn: Connection) -> list[str]:
    return [r["service"] for r in await conn.fetch("SELECT service FROM held_services")]


_INCIDENT = (
    "incident_id, service, opened_at, reason, last_seen_at, closed_at, downtime_seconds,"
    " flaps, reminders, escalated_at, report_name,"
    " (SELECT count(*) FROM restart_attempts r WHERE r.incident_id = i.incident_id) AS restarts"
)


async def incidents(
    conn: Connection, limit: int, service: str | None = None, open_only: bool = False
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {_INCIDENT} FROM incidents i"
        " WHERE ($2::text IS NULL OR service = $2) AND (NOT $3 OR closed_at IS NULL)"
        " ORDER BY opened_at DESC LIMIT $1",
        limit,
        service,
        open_only,
    )
    return [dict(r) for r in rows]


async def incident(conn: Connection, incident_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {_INCIDENT}, report FROM incidents i WHERE incident_id = $1", incident_id
    )
    if row is None:
        return None
    found = dict(row)
    found["attempts"] = [
        dict(r)
        for r in await conn.fetch(
            "SELECT attempt, requested_at, by, reason, outcome, succeeded, finished_at, epoch"
            " FROM restart_attempts WHERE incident_id = $1 ORDER BY attempt",
            incident_id,
        )
    ]
    found["transitions"] = [
        dict(r)
        for r in await conn.fetch(
            "SELECT kind, at, detail, epoch FROM transitions WHERE incident_id = $1"
            " ORDER BY id LIMIT 1000",
            incident_id,
        )
    ]
    return found


async def restarts_by_service(conn: Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT service, count(*) AS n FROM restart_attempts GROUP BY service")
    return {r["service"]: r["n"] for r in rows}


async def save_smoke_run(conn: Connection, run: dict[str, Any]) -> None:
    await conn.execute(
        "INSERT INTO smoke_runs (run_id, started_at, finished_at, trigger, requested_by,"
        " instance, ok, seconds, steps) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        run["run_id"],
        run["started_at"],
        run["finished_at"],
        run["trigger"],
        run["requested_by"],
        run["instance"],
        run["ok"],
        run["seconds"],
        run["steps"],
    )


async def smoke_runs(conn: Connection, limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT run_id, started_at, finished_at, trigger, requested_by, instance, ok, seconds,"
        " steps FROM smoke_runs ORDER BY started_at DESC LIMIT $1",
        limit,
    )
    return [dict(r) for r in rows]
