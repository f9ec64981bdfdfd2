"""HTTP routes of planner: plans, their metrics, cancel, approvals."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from contracts.events import utcnow
from services.planner import db, domain
from services.planner.config import PlannerSettings
from services.planner.domain import ApprovalStatus, PlanRequest, PlanStatus, SubtaskStatus
from services.planner.handlers import Conflict, NotFound, Planner
from services.runtime.auth import Caller, CallerDep
from services.runtime.db import Connection
from services.runtime.errors import ApiError, ErrorResponse, FieldError, bounded_json
from services.runtime.service import Runtime, runtime_of

RuntimeDep = Annotated[Runtime[PlannerSettings], Depends(runtime_of)]
Id = Annotated[str, Path(min_length=1, max_length=512)]
QueryId = Annotated[str | None, Query(min_length=1, max_length=512)]
Limit = Annotated[int, Query(ge=1, le=1000)]
METADATA_MAX_BYTES = 64 * 1024
METADATA_MAX_DEPTH = 16
check_metadata = bounded_json(METADATA_MAX_BYTES, METADATA_MAX_DEPTH)
NOT_FOUND = {"model": ErrorResponse, "description": "No such plan"}


class SubtaskView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    subtask_id: str
    sequence_number: int
    description: str
    agent: str
    estimated_time: str | None
    status: SubtaskStatus
    dependencies: list[str]
    attempt: int = Field(description="Attempts dispatched so far.")
    max_attempts: int
    timeout_s: float
    requires_approval: bool
    started_at: datetime | None
    completed_at: datetime | None
    duration_seconds: float | None
    result: str | None
    error: str | None
    next_attempt_at: datetime | None = Field(description="When the next attempt goes out.")
    deadline_at: datetime | None = Field(description="When the current attempt times out.")


class ApprovalView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    approval_id: uuid.UUID
    plan_id: str
    subtask_id: str | None = Field(description="Null for an approval of the whole plan.")
    user_id: str
    session_id: str | None
    type: Literal["tool", "plan"]
    payload: dict[str, Any]
    status: ApprovalStatus
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None
    decision: str | None = Field(description="The approver's comment.")


class PlanSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    plan_id: str
    task_id: str
    user_id: str
    session_id: str
    original_task: str
    subtask_count: int
    status: PlanStatus
    requires_approval: bool
    created_at: datetime
    completed_at: datetime | None
    is_complete: bool
    metadata: dict[str, Any]


class PlanView(PlanSummary):
    subtasks: list[SubtaskView]
    approvals: list[ApprovalView]


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approved", "rejected"]
    comment: str | None = Field(None, max_length=10_000)


class Assignment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: str = Field(min_length=1, max_length=512)


def invalid_plan(request: PlanRequest, problems: list[domain.Problem]) -> ApiError:
    """422 `invalid_plan`, one field per problem: the subtask it is about (for a cycle, its
    first subtask) by position, its id as the value."""
    position = {s.subtask_id: i for i, s in reversed(list(enumerate(request.subtasks)))}
    fields = []
    for p in problems:
        first = p.subtask_ids[0] if p.subtask_ids else None
        where: list[str | int] = ["body", "subtasks"]
        if first is not None:
            where += [position[first], "subtask_id"]
        fields.append(FieldError(loc=where, message=p.message, value_prefix=first))
    return ApiError(422, "invalid_plan", "; ".join(p.message for p in problems), fields)


@asynccontextmanager
async def answering_errors(runtime: Runtime[PlannerSettings]) -> AsyncIterator[Connection]:
    """A transaction whose domain refusals answer as HTTP: unknown → 404, conflict → 409."""
    try:
        async with runtime.transaction() as conn:
            yield conn
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from exc


def whose(who: Caller, user_id: str | None) -> str | None:
    """The user a listing is about: a user sees their own only; an operator sees everyone's,
    or one user's."""
    return user_id if who.is_operator else who.user_id


async def owned_plan(conn: Connection, plan_id: str, who: Caller) -> domain.Plan:
    """The plan, if the caller may see it: their own, or any for an operator. Another
    user's plan answers as one that does not exist (404), so ids reveal nothing."""
    plan = await db.plan(conn, plan_id)
    if plan is None or not (who.is_operator or plan.user_id == who.user_id):
        raise HTTPException(404, f"no plan {plan_id}")
    return plan


def build_router(planner: Planner) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["planner"])

    async def plan_view(runtime: Runtime[PlannerSettings], plan_id: str, who: Caller) -> PlanView:
        async with runtime.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            plan = await owned_plan(conn, plan_id, who)
            subtasks = await db.plan_subtasks(conn, plan_id)
            approvals = await db.approvals_of_plan(conn, plan_id)
        return PlanView(
            **PlanSummary.model_validate(plan).model_dump(),
            subtasks=[SubtaskView.model_validate(s) for s in subtasks],
            approvals=[ApprovalView.model_validate(a) for a in approvals],
        )

    @router.post(
        "/plans",
        status_code=201,
        response_model=PlanSummary,
        summary="Create a plan; its first subtasks are dispatched at once (GET it for them)",
        responses={
            200: {"description": "The same request was posted before: the existing plan"},
            403: {
                "model": ErrorResponse,
                "description": "`user_id` is not the caller (only an operator creates plans "
                "for others)",
            },
            409: {
                "model": ErrorResponse,
                "description": "The task already has a different plan, or the plan id is taken",
            },
            422: {
                "model": ErrorResponse,
                "description": "`invalid_request`: a field is not valid (`metadata`: at most "
                f"{METADATA_MAX_BYTES} bytes as JSON, {METADATA_MAX_DEPTH} levels); "
                "`invalid_plan`: duplicate ids, unknown dependencies, cycles",
            },
        },
    )
    async def create_plan(
        request: PlanRequest, response: Response, runtime: RuntimeDep, who: CallerDep
    ) -> Any:
        if request.user_id != who.user_id and not who.is_operator:
            raise HTTPException(403, "a plan's user_id must be the caller's")
        try:
            check_metadata(request.metadata)
        except ValueError as exc:
            field = FieldError(loc=["body", "metadata"], message=str(exc))
            raise ApiError(422, "invalid_request", f"metadata: {exc}", [field]) from None
        problems = domain.validate(
            [(s.subtask_id, s.depends_on) for s in request.subtasks],
            planner.settings.planner_max_subtasks,
        )
        if problems:
            raise invalid_plan(request, problems)
        try:
            async with answering_errors(runtime) as conn:
                plan, created = await planner.create_plan(conn, request)
        except asyncpg.UniqueViolationError as exc:
            raise HTTPException(409, f"plan id {request.plan_id} is taken") from exc
        if not created:
            response.status_code = 200
        # the summary only: rendering thousands of subtasks back would hold up the event
        # loop (and the dispatch of what this plan just sent out) for nothing the client
        # does not already have
        return PlanSummary.model_validate(plan)

    @router.get("/plans", response_model=list[PlanSummary], summary="Plans, newest first")
    async def list_plans(
        runtime: RuntimeDep,
        who: CallerDep,
        status: PlanStatus | None = None,
        user_id: Annotated[
            str | None,
            Query(min_length=1, max_length=512, description="Operators: whose plans"),
        ] = None,
        session_id: QueryId = None,
        limit: Limit = 100,
    ) -> list[PlanSummary]:
        async with runtime.pool.acquire() as conn:
            plans = await db.list_plans(
                conn,
                status=status,
                user_id=whose(who, user_id),
                session_id=session_id,
                limit=limit,
            )
        return [PlanSummary.model_validate(p) for p in plans]

    @router.get(
        "/plans/{plan_id}",
        response_model=PlanView,
        summary="A plan with its subtasks and approvals",
        responses={404: NOT_FOUND},
    )
    async def get_plan(plan_id: Id, runtime: RuntimeDep, who: CallerDep) -> PlanView:
        return await plan_view(runtime, plan_id, who)

    @router.get(
        "/plans/{plan_id}/metrics",
        summary="Durations in total and per agent, counts by status, estimated versus actual, "
        "attempts, the critical path",
        responses={404: NOT_FOUND},
    )
    async def plan_metrics(plan_id: Id, runtime: RuntimeDep, who: CallerDep) -> dict[str, Any]:
        async with runtime.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            plan = await owned_plan(conn, plan_id, who)
            subtasks = await db.plan_subtasks(conn, plan_id)
        return {
            "plan_id": plan.plan_id,
            "status": plan.status,
            **domain.metrics(subtasks, plan.created_at, plan.completed_at, utcnow()),
        }

    @router.post(
        "/plans/{plan_id}/cancel",
        response_model=PlanSummary,
        summary="Cancel a plan: nothing more is dispatched, open subtasks end as cancelled",
        responses={
            404: NOT_FOUND,
            409: {"model": ErrorResponse, "description": "The plan already completed or failed"},
        },
    )
    async def cancel_plan(plan_id: Id, runtime: RuntimeDep, who: CallerDep) -> PlanSummary:
        async with answering_errors(runtime) as conn:
            await owned_plan(conn, plan_id, who)
            plan = await planner.cancel_plan(conn, plan_id)
        return PlanSummary.model_validate(plan)

    @router.post(
        "/plans/{plan_id}/subtasks/{subtask_id}/assign",
        response_model=SubtaskView,
        summary="Give a subtask not dispatched yet to another agent; a held one is released",
        responses={
            404: {"model": ErrorResponse, "description": "No such plan or subtask"},
            409: {
                "model": ErrorResponse,
                "description": "The subtask was dispatched already or has finished",
            },
        },
    )
    async def assign(
        plan_id: Id, subtask_id: Id, body: Assignment, runtime: RuntimeDep, who: CallerDep
    ) -> SubtaskView:
        async with answering_errors(runtime) as conn:
            await owned_plan(conn, plan_id, who)
            subtask = await planner.assign(conn, plan_id, subtask_id, body.agent)
        return SubtaskView.model_validate(subtask)

    @router.get("/approvals", response_model=list[ApprovalView], summary="Approval requests")
    async def list_approvals(
        runtime: RuntimeDep,
        who: CallerDep,
        status: ApprovalStatus | None = None,
        user_id: Annotated[
            str | None,
            Query(min_length=1, max_length=512, description="Operators: whose approvals"),
        ] = None,
        plan_id: QueryId = None,
        limit: Limit = 100,
    ) -> list[ApprovalView]:
        async with runtime.pool.acquire() as conn:
            found = await db.list_approvals(
                conn, status=status, user_id=whose(who, user_id), plan_id=plan_id, limit=limit
            )
        return [ApprovalView.model_validate(a) for a in found]

    @router.get(
        "/approvals/{approval_id}",
        response_model=ApprovalView,
        responses={404: {"model": ErrorResponse, "description": "No such approval"}},
    )
    async def get_approval(
        approval_id: uuid.UUID, runtime: RuntimeDep, who: CallerDep
    ) -> ApprovalView:
        async with runtime.pool.acquire() as conn:
            found = await db.approval(conn, approval_id)
        if found is None or not (who.is_operator or found.user_id == who.user_id):
            raise HTTPException(404, f"no approval {approval_id}")
        return ApprovalView.model_validate(found)

    @router.post(
        "/approvals/{approval_id}",
        response_model=ApprovalView,
        summary="Approve or reject: approved sends the subtask (or the plan) on, rejected "
        "skips what depends on it",
        responses={
            404: {"model": ErrorResponse, "description": "No such approval"},
            409: {
                "model": ErrorResponse,
                "description": "Already resolved (approved, rejected or timed out)",
            },
        },
    )
    async def resolve_approval(
        approval_id: uuid.UUID, body: Decision, runtime: RuntimeDep, who: CallerDep
    ) -> ApprovalView:
        async with answering_errors(runtime) as conn:
            found = await db.approval(conn, approval_id)
            if found is None or not (who.is_operator or found.user_id == who.user_id):
                raise HTTPException(404, f"no approval {approval_id}")
            resolved = await planner.resolve_approval(
                conn, approval_id, body.decision == "approved", body.comment
            )
        return ApprovalView.model_validate(resolved)

    return router
