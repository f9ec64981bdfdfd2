"""The plan state planner keeps in memory between transactions: it must never stand in for
what the database holds. Two planners on one database take turns on one plan (as two
replicas do), and a transaction rolls back after the state was changed in memory; each
time the plan must come out as if every step had read the database."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from contracts.events import SubtaskCompleted
from services.planner import db
from services.planner.app import build
from services.planner.config import PlannerSettings
from services.planner.domain import PlanRequest
from services.planner.handlers import Planner
from services.runtime import outbox
from services.runtime.db import RUNTIME_MIGRATIONS, Login, create_pool, load_migrations, migrate

DIAMOND: list[dict[str, Any]] = [
    {"subtask_id": "a", "description": "a", "agent": "m"},
    {"subtask_id": "b", "description": "b", "agent": "m", "depends_on": ["a"]},
    {"subtask_id": "c", "description": "c", "agent": "m", "depends_on": ["a"]},
    {"subtask_id": "d", "description": "d", "agent": "m", "depends_on": ["b", "c"]},
]

# the diamond once `a` completed: b and c went out, d waits for both
AFTER_A = {"a": ("completed", 1), "b": ("ready", 1), "c": ("ready", 1), "d": ("pending", 0)}


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    spec = build(PlannerSettings(database_url=database_url))
    assert spec.migrations is not None
    await migrate(database_url, "planner", load_migrations(RUNTIME_MIGRATIONS, spec.migrations))
    pool = await create_pool(Login(database_url, "planner", "planner_app"), 4, "test")
    yield pool
    await pool.close()


def planner() -> Planner:
    return Planner(PlannerSettings())


def done(subtask_id: str, attempt: int = 1) -> SubtaskCompleted:
    return SubtaskCompleted(
        plan_id="p1",
        subtask_id=subtask_id,
        model_id="m",
        user_id="u",
        session_id="s",
        attempt=attempt,
    )


async def create(pool: asyncpg.Pool, p: Planner, subtasks: list[dict[str, Any]] = DIAMOND) -> None:
    request = PlanRequest.model_validate(
        {
            "task_id": "t1",
            "plan_id": "p1",
            "user_id": "u",
            "session_id": "s",
            "original_task": "diamond",
            "subtasks": subtasks,
        }
    )
    async with pool.acquire() as conn, conn.transaction():
        await p.create_plan(conn, request)


async def complete(pool: asyncpg.Pool, p: Planner, *subtask_ids: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await p.on_subtask_completed(conn, [done(s) for s in subtask_ids])


async def statuses(pool: asyncpg.Pool) -> dict[str, tuple[str, int]]:
    async with pool.acquire() as conn:
        return {s.subtask_id: (s.status, s.attempt) for s in await db.plan_subtasks(conn, "p1")}


async def ready_events(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch(
        "SELECT payload FROM outbox WHERE subject = 'subtask.ready' ORDER BY id"
    )
    return [json.loads(r["payload"])["subtask_id"] for r in rows]


async def test_two_planners_taking_turns_on_one_plan_see_each_others_writes(
    pool: asyncpg.Pool,
) -> None:
    first, second = planner(), planner()
    await create(pool, first)  # dispatches a; first keeps the state
    await complete(pool, second, "a")  # second reads the plan: b and c go out
    # first's kept state still shows b pending: it must read the plan again, or b's
    # completion would be taken for a stale report and lost
    await complete(pool, first, "b")
    assert (await statuses(pool))["d"] == ("pending", 0)  # c has not completed yet
    await complete(pool, second, "c")  # second's state is stale too (b completed since)
    assert await statuses(pool) == {
        "a": ("completed", 1),
        "b": ("completed", 1),
        "c": ("completed", 1),
        "d": ("ready", 1),
    }
    assert await ready_events(pool) == ["a", "b", "c", "d"]  # each dispatched once


async def test_a_rolled_back_transaction_leaves_no_trace_in_the_kept_state(
    pool: asyncpg.Pool,
) -> None:
    p = planner()
    await create(pool, p)
    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await p.on_subtask_completed(conn, [done("a")])
            raise RuntimeError("the batch failed after the state changed in memory")
    assert (await statuses(pool))["a"] == ("ready", 1)
    # redelivered: it must apply again, b and c must go out
    await complete(pool, p, "a")
    assert await statuses(pool) == AFTER_A
    assert await ready_events(pool) == ["a", "b", "c"]  # b and c once


async def test_a_failure_between_deciding_and_writing_leaves_no_trace_either(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = planner()
    await create(pool, p)

    async def refuse(*_: object) -> None:
        raise ConnectionError("lost while recording subtask.ready")

    with monkeypatch.context() as patched:
        patched.setattr(outbox, "add", refuse)  # a and its dependents changed in memory
        with pytest.raises(ConnectionError):
            await complete(pool, p, "a")
    await complete(pool, p, "a")
    assert await statuses(pool) == AFTER_A
    assert await ready_events(pool) == ["a", "b", "c"]  # b and c once


async def test_each_completion_of_a_batch_releases_its_dependents(pool: asyncpg.Pool) -> None:
    p = planner()
    two_chains: list[dict[str, Any]] = [
        {"subtask_id": "a", "description": "a", "agent": "m"},
        {"subtask_id": "x", "description": "x", "agent": "m"},
        {"subtask_id": "b", "description": "b", "agent": "m", "depends_on": ["a"]},
        {"subtask_id": "y", "description": "y", "agent": "m", "depends_on": ["x"]},
    ]
    await create(pool, p, two_chains)
    await complete(pool, p, "a", "x")  # one batch, one transaction
    assert await statuses(pool) == {
        "a": ("completed", 1),
        "x": ("completed", 1),
        "b": ("ready", 1),
        "y": ("ready", 1),
    }
    assert sorted(await ready_events(pool)) == ["a", "b", "x", "y"]
