"""HTTP routes of stats."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path
from pydantic import BaseModel

from services.runtime.auth import CallerDep
from services.runtime.errors import ErrorResponse
from services.runtime.service import Runtime, runtime_of
from services.stats import db

router = APIRouter(prefix="/v1", tags=["stats"])


class SessionRecord(BaseModel):
    session_id: str
    response_count: int
    total_brains: int
    dismissal_count: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    first_used_at: datetime | None
    last_used_at: datetime | None


class ModelRecord(BaseModel):
    """A model's work record for one user: totals, and one entry per session."""

    model_id: str
    user_id: str
    response_count: int
    total_brains: int
    dismissal_count: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    first_used_at: datetime | None
    last_used_at: datetime | None
    sessions: list[SessionRecord]


@router.get(
    "/models/{model_id:path}/stats",
    response_model=ModelRecord,
    responses={
        404: {"model": ErrorResponse, "description": "The model has no record for this user"}
    },
)
async def model_stats(
    model_id: Annotated[str, Path(min_length=1, max_length=512)],
    runtime: Annotated[Runtime, Depends(runtime_of)],
    who: CallerDep,
) -> ModelRecord:
    """The caller's own record of one model (the user is the token's `sub`)."""
    user_id = who.user_id
    async with runtime.as_user(who) as conn:  # row-level security: the caller's rows only
        rows = await db.model_records(conn, user_id, model_id)
    if not rows:
        raise HTTPException(404, f"no record of model {model_id!r} for user {user_id!r}")
    sessions = [SessionRecord(**dict(r)) for r in rows]
    firsts = [s.first_used_at for s in sessions if s.first_used_at]
    lasts = [s.last_used_at for s in sessions if s.last_used_at]
    return ModelRecord(
        model_id=model_id,
        user_id=user_id,
        response_count=sum(s.response_count for s in sessions),
        total_brains=sum(s.total_brains for s in sessions),
        dismissal_count=sum(s.dismissal_count for s in sessions),
        prompt_tokens=sum(s.prompt_tokens for s in sessions),
        completion_tokens=sum(s.completion_tokens for s in sessions),
        cost_usd=sum((s.cost_usd for s in sessions), Decimal(0)),
        first_used_at=min(firsts, default=None),
        last_used_at=max(lasts, default=None),
        sessions=sessions,
    )
