"""The statuses a table's CHECK constraint allows are the ones the code and the API name:
one list, in Python, that the SQL is checked against."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, get_args

import asyncpg
import pytest

from services.benchmark.api import JobStatus
from services.planner.domain import ApprovalStatus, PlanStatus, SubtaskStatus
from services.runtime.db import RUNTIME_MIGRATIONS, load_migrations, migrate
from services.sync.domain import DeviceStatus, RunStatus, Status

SERVICES = Path(__file__).resolve().parents[2] / "services"


def values(statuses: Any) -> set[str]:
    if isinstance(statuses, type) and issubclass(statuses, StrEnum):
        return {s.value for s in statuses}
    return set(get_args(statuses))


CASES = [
    ("sync", "models", Status),
    ("sync", "sync_runs", RunStatus),
    ("sync", "devices", DeviceStatus),
    ("benchmark", "jobs", JobStatus),
    ("planner", "execution_plans", PlanStatus),
    ("planner", "subtask_executions", SubtaskStatus),
    ("planner", "approval_requests", ApprovalStatus),
]


@pytest.mark.parametrize(("schema", "table", "statuses"), CASES, ids=[c[1] for c in CASES])
async def test_a_table_allows_exactly_the_statuses_the_code_names(
    database_url: str, schema: str, table: str, statuses: Any
) -> None:
    await migrate(
        database_url, schema, load_migrations(RUNTIME_MIGRATIONS, SERVICES / schema / "migrations")
    )
    conn = await asyncpg.connect(database_url)
    try:
        checks = await conn.fetch(
            "SELECT pg_get_constraintdef(c.oid) AS def FROM pg_constraint c"
            " JOIN pg_class t ON t.oid = c.conrelid"
            " JOIN pg_namespace n ON n.oid = t.relnamespace"
            " WHERE c.contype = 'c' AND n.nspname = $1 AND t.relname = $2"
            " AND pg_get_constraintdef(c.oid) ~ '\\mstatus\\M'",
            schema,
            table,
        )
    finally:
        await conn.close()
    assert len(checks) == 1, [r["def"] for r in checks]
    allowed = set(re.findall(r"'([^']*)'::text", checks[0]["def"]))
    assert allowed == values(statuses)
