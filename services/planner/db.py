"""Every SQL statement of planner."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.planner.domain import (
    DISPATCHED,
    RETRYING,
    ApprovalStatus,
    PlanStatus,
    Subtask,
    SubtaskStatus,
)
from services.planner.domain import (
    Approval as Approval,
)
from services.planner.domain import (
    Plan as Plan,
)
from services.runtime.db import Connection

_PLAN = (
    "plan_id, task_execution_id AS task_id, user_id, session_id, original_task, subtask_count,"
    " status, requires_approval, created_at, completed_at, is_complete, metadata, fingerprint,"
    " revision"
)
_SUBTASK = (
    "plan_id, subtask_id, sequence_number, description, agent, estimated_time, status,"
    " dependencies, attempt, max_attempts, timeout_s, requires_approval, started_at,"
    " completed_at, duration_seconds, result, error, next_attempt_at, deadline_at, ready_at"
)


# One subtask by its key, as a LATERAL subquery per id: LIMIT keeps PostgreSQL from
# flattening it into a join it would plan from row estimates, and estimates are off for
# plans of thousands of subtasks (they make a seq scan of every plan's subtasks look cheap).
def _by_key(columns: str, plan: str, subtask: str) -> str:
    return (
        f"SELECT {columns} FROM subtask_executions"
        f" WHERE plan_id = {plan} AND subtask_id = {subtask} LIMIT 1"
    )


_APPROVAL = (
    "id AS approval_id, user_id, session_id, plan_id, subtask_id, type, payload, status,"
    " created_at, expires_at, resolved_at, decision"
)


def _plan(row: asyncpg.Record) -> Plan:
    fields = dict(row)
    fields["status"] = PlanStatus(fields["status"])
    return Plan(**fields)


def _subtask(row: asyncpg.Record) -> Subtask:
    fields = dict(row)
    fields["status"] = SubtaskStatus(fields["status"])
    fields["dependencies"] = tuple(fields["dependencies"])
    return Subtask(**fields)


def _approval(row: asyncpg.Record) -> Approval:
    fields = dict(row)
    fields["status"] = ApprovalStatus(fields["status"])
    return Approval(**fields)


def _in(statuses: Iterable[str]) -> str:
    """A constant SQL list of statuses: as literals (not a parameter) so that PostgreSQL
    matches the partial indexes whose predicates list them."""
    return ", ".join(f"'{s}'" for s in sorted(statuses))


_PENDING_APPROVAL = f"status = '{ApprovalStatus.PENDING}'"


# --- plans -------------------------------------------------------------------------------


async def insert_plan(
    conn: Connection,
    *,
    plan_id: str,
    task_id: str,
    user_id: str,
    session_id: str,
    original_task: str,
    subtask_count: int,
    status: PlanStatus,
    requires_approval: bool,
    created_at: datetime,
    metadata: dict[str, Any],
    fingerprint: str,
) -> Plan | None:
    """The new plan, or None when the task has a plan already."""
    row = await conn.fetchrow(
        "INSERT INTO execution_plans (plan_id, task_execution_id, user_id, session_id,"
        " original_task, subtask_count, status, requires_approval, created_at, metadata,"
        " fingerprint) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        f" ON CONFLICT (task_execution_id) DO NOTHING RETURNING {_PLAN}",
        plan_id,
        task_id,
        user_id,
        session_id,
        original_task,
        subtask_count,
        status,
        requires_approval,
        created_at,
        metadata,
        fingerprint,
    )
    return _plan(row) if row else None


async def plan_of_task(conn: Connection, task_id: str) -> Plan | None:
    row = await conn.fetchrow(
        f"SELECT {_PLAN} FROM execution_plans WHERE task_execution_id = $1", task_id
    )
    return _plan(row) if row else None


async def plan(conn: Connection, plan_id: str) -> Plan | None:
    row = await conn.fetchrow(f"SELECT {_PLAN} FROM execution_plans WHERE plan_id = $1", plan_id)
    return _plan(row) if row else None


async def lock_plans(conn: Connection, plan_ids: Sequence[str]) -> dict[str, Plan]:
    """Lock the plans' rows, always in plan id order so that two transactions that lock
    several plans cannot deadlock: every decision about a plan is made under its lock."""
    rows = await conn.fetch(
        f"SELECT {_PLAN} FROM execution_plans WHERE plan_id = ANY($1::text[])"
        " ORDER BY plan_id FOR UPDATE",
        list(plan_ids),
    )
    return {r["plan_id"]: _plan(r) for r in rows}


async def lock_plan(conn: Connection, plan_id: str, *, skip_locked: bool = False) -> Plan | None:
    row = await conn.fetchrow(
        f"SELECT {_PLAN} FROM execution_plans WHERE plan_id = $1 FOR UPDATE"
        + (" SKIP LOCKED" if skip_locked else ""),
        plan_id,
    )
    return _plan(row) if row else None


async def lock_open_plans_of_sessions(
    conn: Connection, sessions: Sequence[tuple[str, str]]
) -> list[Plan]:
    rows = await conn.fetch(
        f"SELECT {_PLAN} FROM execution_plans"
        " WHERE (user_id, session_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
        " AND NOT is_complete ORDER BY plan_id FOR UPDATE",
        [u for u, _ in sessions],
        [s for _, s in sessions],
    )
    return [_plan(r) for r in rows]


async def list_plans(
    conn: Connection,
    *,
    status: PlanStatus | None,
    user_id: str | None,
    session_id: str | None,
    limit: int,
) -> list[Plan]:
    rows = await conn.fetch(
        f"SELECT {_PLAN} FROM execution_plans"
        " WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR user_id = $2)"
        " AND ($3::text IS NULL OR session_id = $3) ORDER BY created_at DESC, plan_id LIMIT $4",
        status,
        user_id,
        session_id,
        limit,
    )
    return [_plan(r) for r in rows]


# --- subtasks ----------------------------------------------------------------------------


async def insert_subtasks(conn: Connection, subtasks: Sequence[Subtask]) -> None:
    """One statement for the whole plan."""
    await conn.execute(
        "INSERT INTO subtask_executions (plan_id, subtask_id, sequence_number, description,"
        " agent, estimated_time, status, dependencies, attempt, max_attempts, timeout_s,"
        " requires_approval)"
        " SELECT p, id, seq, descr, agent, est, st, deps::jsonb, 0, att, tmo, appr"
        " FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[],"
        " $7::text[], $8::text[], $9::int[], $10::float8[], $11::bool[])"
        " AS u(p, id, seq, descr, agent, est, st, deps, att, tmo, appr)",
        [s.plan_id for s in subtasks],
        [s.subtask_id for s in subtasks],
        [s.sequence_number for s in subtasks],
        [s.description for s in subtasks],
        [s.agent for s in subtasks],
        [s.estimated_time for s in subtasks],
        [s.status for s in subtasks],
        [json.dumps(list(s.dependencies)) for s in subtasks],
        [s.max_attempts for s in subtasks],
        [s.timeout_s for s in subtasks],
        [s.requires_approval for s in subtasks],
    )


# Rows are found by key (see _by_key) and updated by their ctid, which holds because every
# writer of a plan's subtasks holds the plan's row lock. Parameters $1-$13; unnest of
# empty arrays updates nothing.
_SAVE = (
    "UPDATE subtask_executions s SET status = u.status, agent = u.agent,"
    " attempt = u.attempt, started_at = u.started_at, completed_at = u.completed_at,"
    " duration_seconds = u.duration_seconds, result = u.result, error = u.error,"
    " next_attempt_at = u.next_attempt_at, deadline_at = u.deadline_at, ready_at = u.ready_at"
    " FROM (SELECT u.*, t.row FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
    "   $5::int[], $6::timestamptz[], $7::timestamptz[], $8::float8[], $9::text[],"
    "   $10::text[], $11::timestamptz[], $12::timestamptz[], $13::timestamptz[])"
    "   AS u(plan_id, subtask_id, status, agent, attempt, started_at, completed_at,"
    "   duration_seconds, result, error, next_attempt_at, deadline_at, ready_at)"
    f" CROSS JOIN LATERAL ({_by_key('ctid AS row', 'u.plan_id', 'u.subtask_id')}) t) u"
    " WHERE s.ctid = u.row"
)


def _save_args(subtasks: Sequence[Subtask]) -> list[list[Any]]:
    return [
        [s.plan_id for s in subtasks],
        [s.subtask_id for s in subtasks],
        [s.status for s in subtasks],
        [s.agent for s in subtasks],
        [s.attempt for s in subtasks],
        [s.started_at for s in subtasks],
        [s.completed_at for s in subtasks],
        [s.duration_seconds for s in subtasks],
        [s.result for s in subtasks],
        [s.error for s in subtasks],
        [s.next_attempt_at for s in subtasks],
        [s.deadline_at for s in subtasks],
        [s.ready_at for s in subtasks],
    ]


async def save(
    conn: Connection,
    plan: Plan,
    subtasks: Iterable[Subtask],
    metrics: dict[str, Any] | None = None,
) -> int:
    """Write the plan's status and the lifecycle fields of changed subtasks, in one
    statement; returns the plan's new revision."""
    revision: int = await conn.fetchval(
        f"WITH saved AS ({_SAVE})"
        " UPDATE execution_plans SET revision = nextval('plan_revision'), status = $15,"
        " completed_at = $16, is_complete = $17, metrics = coalesce($18, metrics)"
        " WHERE plan_id = $14 RETURNING revision",
        *_save_args(list(subtasks)),
        plan.plan_id,
        plan.status,
        plan.completed_at,
        plan.is_complete,
        metrics,
    )
    return revision


async def plan_subtasks(conn: Connection, plan_id: str) -> list[Subtask]:
    rows = await conn.fetch(
        f"SELECT {_SUBTASK} FROM subtask_executions WHERE plan_id = $1"
        " ORDER BY sequence_number, subtask_id",
        plan_id,
    )
    return [_subtask(r) for r in rows]


# --- the timer loop ----------------------------------------------------------------------


async def plans_with_due_work(conn: Connection, now: datetime, limit: int) -> list[str]:
    """Plans with an attempt past its deadline, a retry due or an approval expired; each
    part reads only its partial index."""
    rows = await conn.fetch(
        "(SELECT plan_id FROM subtask_executions"
        f"  WHERE status IN ({_in(DISPATCHED)}) AND deadline_at <= $1 LIMIT $2)"
        " UNION (SELECT plan_id FROM subtask_executions"
        f"  WHERE status = '{RETRYING}' AND next_attempt_at <= $1 LIMIT $2)"
        " UNION (SELECT plan_id FROM approval_requests"
        f"  WHERE {_PENDING_APPROVAL} AND expires_at <= $1 LIMIT $2)",
        now,
        limit,
    )
    return sorted(r["plan_id"] for r in rows)


async def expired_approvals(conn: Connection, plan_id: str, now: datetime) -> list[Approval]:
    rows = await conn.fetch(
        f"SELECT {_APPROVAL} FROM approval_requests WHERE plan_id = $1"
        f" AND {_PENDING_APPROVAL} AND expires_at <= $2",
        plan_id,
        now,
    )
    return [_approval(r) for r in rows]


# --- approvals ---------------------------------------------------------------------------


async def insert_approvals(conn: Connection, approvals: Sequence[Approval]) -> None:
    if not approvals:
        return
    await conn.executemany(
        "INSERT INTO approval_requests (id, user_id, session_id, plan_id, subtask_id, type,"
        " payload, status, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
        " $9, $10) ON CONFLICT (id) DO NOTHING",
        [
            (
                a.approval_id,
                a.user_id,
                a.session_id,
                a.plan_id,
                a.subtask_id,
                a.type,
                a.payload,
                a.status,
                a.created_at,
                a.expires_at,
            )
            for a in approvals
        ],
    )


async def approval(conn: Connection, approval_id: uuid.UUID) -> Approval | None:
    row = await conn.fetchrow(
        f"SELECT {_APPROVAL} FROM approval_requests WHERE id = $1", approval_id
    )
    return _approval(row) if row else None


async def resolve_approvals(conn: Connection, approvals: Sequence[Approval]) -> None:
    """Store the answers (status, decision, resolved_at) to these approvals."""
    await conn.executemany(
        "UPDATE approval_requests SET status = $2, decision = $3, resolved_at = $4 WHERE id = $1",
        [(a.approval_id, a.status, a.decision, a.resolved_at) for a in approvals],
    )


async def pending_approvals_of_plan(conn: Connection, plan_id: str) -> list[Approval]:
    rows = await conn.fetch(
        f"SELECT {_APPROVAL} FROM approval_requests WHERE plan_id = $1 AND {_PENDING_APPROVAL}",
        plan_id,
    )
    return [_approval(r) for r in rows]


async def approvals_of_plan(conn: Connection, plan_id: str) -> list[Approval]:
    rows = await conn.fetch(
        f"SELECT {_APPROVAL} FROM approval_requests WHERE plan_id = $1 ORDER BY created_at, id",
        plan_id,
    )
    return [_approval(r) for r in rows]


async def list_approvals(
    conn: Connection,
    *,
    status: ApprovalStatus | None,
    user_id: str | None,
    plan_id: str | None,
    limit: int,
) -> list[Approval]:
    rows = await conn.fetch(
        f"SELECT {_APPROVAL} FROM approval_requests"
        " WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR user_id = $2)"
        " AND ($3::text IS NULL OR plan_id = $3) ORDER BY created_at, id LIMIT $4",
        status,
        user_id,
        plan_id,
        limit,
    )
    return [_approval(r) for r in rows]


# --- dismissed models --------------------------------------------------------------------


async def add_dismissals(
    conn: Connection, rows: Sequence[tuple[str, str, str, str | None, datetime]]
) -> None:
    await conn.executemany(
        "INSERT INTO dismissed_models (user_id, session_id, model_id, reason, dismissed_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        rows,
    )


async def dismissed_models(conn: Connection, user_id: str, session_id: str) -> set[str]:
    rows = await conn.fetch(
        "SELECT model_id FROM dismissed_models WHERE user_id = $1 AND session_id = $2",
        user_id,
        session_id,
    )
    return {r["model_id"] for r in rows}
