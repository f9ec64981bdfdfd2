"""HTTP routes of stats. A user's data is read through `Runtime.as_user` (row-level
security: the caller's rows only, whatever the SQL says); the operators' global leaderboard
reads the aggregate table that holds no user ids."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Path, Query
from pydantic import BaseModel, Field

from contracts.events import Price
from services.runtime.auth import CallerDep, OperatorDep
from services.runtime.errors import ErrorResponse
from services.runtime.service import Runtime, runtime_of
from services.stats import db
from services.stats.config import StatsSettings
from services.stats.domain import Interval, Standing, leaderboard

RuntimeDep = Annotated[Runtime[StatsSettings], Depends(runtime_of)]
PathId = Path(min_length=1, max_length=512)
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Nothing of the caller's here"}
}


class Usage(BaseModel):
    response_count: int
    total_brains: int
    dismissal_count: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Price = Field(description="The known cost (USD) of the calls.")
    unpriced_calls: int = Field(description="Calls whose cost is unknown (not in cost_usd).")
    first_used_at: datetime | None
    last_used_at: datetime | None


class SessionRecord(Usage):
    session_id: str
    appeared_at: datetime = Field(description="When the model first appeared in the session.")
    dismissed_at: datetime | None
    dismissal_reason: str | None


class ModelRecord(Usage):
    """A model's work record for one user: totals, and one entry per session."""

    model_id: str
    user_id: str
    sessions_appeared: int
    sessions_dismissed: int
    sessions: list[SessionRecord]


class ModelSummary(Usage):
    model_id: str
    sessions_appeared: int
    sessions_dismissed: int


def _usage(row: asyncpg.Record) -> dict[str, object]:
    return {k: row[k] for k in Usage.model_fields}


# --- the session roster ------------------------------------------------------------------


class PanelModel(BaseModel):
    model_id: str
    status: Literal["on_panel", "dismissed"]
    appeared_at: datetime
    dismissed_at: datetime | None
    dismissal_reason: str | None
    response_count: int
    total_brains: int
    last_used_at: datetime | None


class Roster(BaseModel):
    session_id: str
    models: list[PanelModel]


# --- costs -------------------------------------------------------------------------------


class Spend(BaseModel):
    key: str = Field(description="The model, the session or the day (YYYY-MM-DD).")
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Price = Field(description="The known cost (USD).")
    unpriced_calls: int = Field(description="Calls whose cost is unknown, not in cost_usd.")


class SpendReport(BaseModel):
    group_by: Literal["total", "model", "session", "day"]
    since: date | None
    total: Spend
    groups: list[Spend]


class CostLine(BaseModel):
    event_id: str
    model_id: str
    session_id: str
    called_at: datetime
    prompt_tokens: int
    completion_tokens: int
    prompt_price_per_1m: Price | None
    completion_price_per_1m: Price | None
    cost_usd: Price | None = Field(description="Null when the price is unknown.")
    price_source: Literal["event", "catalog", "unknown"]
    unknown_reason: str | None


# --- leaderboards ------------------------------------------------------------------------

Window = Literal["7d", "30d", "all"]


class Rate(BaseModel):
    rate: float
    low: float = Field(description="The 95% interval's lower bound.")
    high: float = Field(description="The 95% interval's upper bound.")


class LeaderboardLine(BaseModel):
    model_id: str
    rank: int | None = Field(
        description="1 + the number of models whose interval of brains per response lies "
        "wholly above this one's; null: not enough data."
    )
    status: Literal["ranked", "not_enough_data"]
    responses: int
    brains: int
    sessions_appeared: int
    sessions_dismissed: int
    brains_per_response: Rate | None = Field(
        description="Score interval of a Poisson rate (a response may earn several brains)."
    )
    dismissals_per_appearance: Rate | None = Field(description="Wilson score interval.")


class Leaderboard(BaseModel):
    window: Window
    since: date | None
    min_responses: int
    models: list[LeaderboardLine]


def _since(days: int | None) -> date | None:
    return None if days is None else datetime.now(UTC).date() - timedelta(days=days - 1)


def _window_start(window: Window) -> date | None:
    return _since({"7d": 7, "30d": 30, "all": None}[window])


def _rate(interval: Interval | None) -> Rate | None:
    return Rate(rate=interval.rate, low=interval.low, high=interval.high) if interval else None


def _board(
    window: Window, since: date | None, minimum: int, standings: list[Standing]
) -> Leaderboard:
    return Leaderboard(
        window=window,
        since=since,
        min_responses=minimum,
        models=[
            LeaderboardLine(
                model_id=s.counts.model_id,
                rank=s.rank,
                status="ranked" if s.rank else "not_enough_data",
                responses=s.counts.responses,
                brains=s.counts.brains,
                sessions_appeared=s.counts.sessions_appeared,
                sessions_dismissed=s.counts.sessions_dismissed,
                brains_per_response=_rate(s.brains_per_response),
                dismissals_per_appearance=_rate(s.dismissals_per_appearance),
            )
            for s in standings
        ],
    )


def _min_responses(runtime: Runtime[StatsSettings]) -> int:
    return runtime.settings.stats_leaderboard_min_responses


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["stats"])

    @router.get("/models/{model_id:path}/stats", response_model=ModelRecord, responses=NOT_FOUND)
    async def model_stats(
        model_id: Annotated[str, PathId], runtime: RuntimeDep, who: CallerDep
    ) -> ModelRecord:
        """The caller's own record of one model (the user is the token's `sub`)."""
        async with runtime.as_user(who) as conn:  # row-level security: the caller's rows only
            totals = await db.model_totals(conn, who.user_id, model_id)
            rows = await db.model_records(conn, who.user_id, model_id)
        if totals is None:
            raise HTTPException(404, f"no record of model {model_id!r} for user {who.user_id!r}")
        return ModelRecord(
            model_id=model_id,
            user_id=who.user_id,
            sessions_appeared=totals["sessions_appeared"],
            sessions_dismissed=totals["sessions_dismissed"],
            sessions=[SessionRecord(**dict(r)) for r in rows],
            **_usage(totals),
        )

    @router.get("/stats/models", response_model=list[ModelSummary])
    async def my_models(
        runtime: RuntimeDep,
        who: CallerDep,
        sort: Annotated[db.RecordOrder, Query()] = "last_used_at",
        order: Annotated[Literal["asc", "desc"], Query()] = "desc",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[ModelSummary]:
        """Every model the caller has a record of, with its totals, sorted."""
        async with runtime.as_user(who) as conn:
            rows = await db.all_models(conn, who.user_id, sort, order == "desc", limit)
        return [
            ModelSummary(
                model_id=r["model_id"],
                sessions_appeared=r["sessions_appeared"],
                sessions_dismissed=r["sessions_dismissed"],
                **_usage(r),
            )
            for r in rows
        ]

    @router.get("/sessions/{session_id}/roster", response_model=Roster, responses=NOT_FOUND)
    async def session_roster(
        session_id: Annotated[str, PathId], runtime: RuntimeDep, who: CallerDep
    ) -> Roster:
        """The models on the caller's session's panel and those dismissed from it (when, why),
        kept from the events: a dismissed model stays dismissed."""
        async with runtime.as_user(who) as conn:
            rows = await db.roster(conn, who.user_id, session_id)
        if not rows:
            raise HTTPException(404, f"no session {session_id!r} for user {who.user_id!r}")
        return Roster(
            session_id=session_id,
            models=[
                PanelModel(status="dismissed" if r["dismissed_at"] else "on_panel", **dict(r))
                for r in rows
            ],
        )

    @router.get("/spend", response_model=SpendReport)
    async def my_spend(
        runtime: RuntimeDep,
        who: CallerDep,
        group_by: Annotated[Literal["total", "model", "session", "day"], Query()] = "total",
        days: Annotated[
            int | None, Query(ge=1, le=3660, description="The last N UTC days; all when absent.")
        ] = None,
    ) -> SpendReport:
        """The caller's spend, in total and per model, session or day. A session's calls count
        in the window when its last use falls in it."""
        since = _since(days)
        async with runtime.as_user(who) as conn:
            rows = await db.spend(
                conn, who.user_id, "model" if group_by == "total" else group_by, since
            )
        groups = [
            Spend(
                key=r["key"],
                calls=r["calls"],
                prompt_tokens=r["prompt_tokens"],
                completion_tokens=r["completion_tokens"],
                cost_usd=r["cost_usd"],
                unpriced_calls=r["unpriced_calls"],
            )
            for r in rows
        ]
        total = Spend(
            key="total",
            calls=sum(g.calls for g in groups),
            prompt_tokens=sum(g.prompt_tokens for g in groups),
            completion_tokens=sum(g.completion_tokens for g in groups),
            cost_usd=sum((g.cost_usd for g in groups), Decimal(0)),
            unpriced_calls=sum(g.unpriced_calls for g in groups),
        )
        return SpendReport(
            group_by=group_by,
            since=since,
            total=total,
            groups=[] if group_by == "total" else groups,
        )

    @router.get("/costs", response_model=list[CostLine])
    async def my_costs(
        runtime: RuntimeDep,
        who: CallerDep,
        session_id: Annotated[str | None, Query(min_length=1, max_length=512)] = None,
        before: Annotated[datetime | None, Query(description="Calls before this time.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> list[CostLine]:
        """The caller's cost ledger, newest first (page on with `before`)."""
        async with runtime.as_user(who) as conn:
            rows = await db.cost_ledger(conn, who.user_id, before, session_id, limit)
        return [CostLine(**{**dict(r), "event_id": str(r["event_id"])}) for r in rows]

    @router.get("/leaderboard", response_model=Leaderboard)
    async def my_leaderboard(
        runtime: RuntimeDep, who: CallerDep, window: Annotated[Window, Query()] = "all"
    ) -> Leaderboard:
        """The models of the caller's own data, ranked by brains per response."""
        since, minimum = _window_start(window), _min_responses(runtime)
        async with runtime.as_user(who) as conn:
            counts = await db.user_leaderboard(conn, who.user_id, since)
        return _board(window, since, minimum, leaderboard(counts, minimum))

    @router.get("/leaderboard/global", response_model=Leaderboard)
    async def global_leaderboard(
        runtime: RuntimeDep, who: OperatorDep, window: Annotated[Window, Query()] = "all"
    ) -> Leaderboard:
        """Every user's data summed per model (operators only; aggregates, canaries left out)."""
        since, minimum = _window_start(window), _min_responses(runtime)
        async with runtime.pool.acquire() as conn:
            counts = await db.global_leaderboard(conn, since)
        return _board(window, since, minimum, leaderboard(counts, minimum))

    return router
