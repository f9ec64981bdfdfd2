"""Planner's imperative shell: subscribers, commands from the API and the timer loop.

Each runs in one transaction per plan: lock the plan's row (so that concurrent events of
one plan take turns), load its state, let the state decide (`plan.PlanState`, pure), write
what it changed and record the events to publish with `outbox.add`.

The state of a plan (its row, every subtask, the models dismissed from its session) is kept
in memory between transactions, so that applying a batch of agents' reports reads nothing
but the plan's row. Every write of a plan sets its `revision` to a fresh value of a
sequence; the kept state is used only while its revision is the one the locked row shows,
so a plan changed elsewhere (another replica, a rolled-back transaction) is read afresh.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import asyncpg
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from contracts.events import (
    ModelDismissed,
    PlanCreated,
    SubtaskCompleted,
    SubtaskFailed,
    SubtaskStarted,
    utcnow,
)
from services.planner import db, domain
from services.planner.config import PlannerSettings
from services.planner.domain import (
    Approval,
    ApprovalStatus,
    Plan,
    PlanRequest,
    PlanStatus,
    Subtask,
    SubtaskStatus,
)
from services.planner.plan import (
    AgentReport,
    Changes,
    Conflict,
    NotFound,
    PlanState,
    Rules,
    new_subtasks,
)
from services.runtime import outbox
from services.runtime.db import Connection
from services.runtime.service import Runtime

__all__ = ["Conflict", "NotFound", "Planner"]

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

PLANS = Counter("planner_plans_total", "Plans that entered a status", ["status"])
SUBTASKS = Counter("planner_subtasks_total", "Subtasks that entered a status", ["status"])
DISPATCH_LATENCY = Histogram(
    "planner_dispatch_latency_seconds",
    "From a dependency's subtask.completed (its occurred_at) to the dependent's subtask.ready "
    "written in the transaction that applies it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter("planner_retries_total", "Attempts dispatched after a failed one")
TIMEOUTS = Counter(
    "planner_timeouts_total", "Attempts and approvals that ran out of time", ["kind"]
)


class Planner:
    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings
        self.rules = Rules(
            retry=domain.RetryPolicy(settings.planner_retry_base_s, settings.planner_retry_max_s),
            fallback_agent=settings.planner_fallback_agent,
            approval_timeout_s=settings.planner_approval_timeout_s,
            event_max_bytes=settings.planner_event_max_bytes,
        )
        self.states: OrderedDict[str, PlanState] = OrderedDict()  # least recently used first

    # --- the state of a plan --------------------------------------------------------------

    async def _lock(
        self, conn: Connection, plan_id: str, *, skip_locked: bool = False
    ) -> PlanState | None:
        plan = await db.lock_plan(conn, plan_id, skip_locked=skip_locked)
        return None if plan is None else await self._load(conn, plan)

    async def _load(self, conn: Connection, plan: Plan) -> PlanState:
        """The state of a plan whose row this transaction has locked (and read as `plan`):
        the kept one when nobody wrote the plan since, otherwise read afresh. It leaves the
        memory until `_save` puts it back, so a decision that is never written (the
        transaction failed in between) is never mistaken for the plan's state."""
        state = self.states.pop(plan.plan_id, None)
        if state is None or state.plan.revision != plan.revision:
            subtasks = await db.plan_subtasks(conn, plan.plan_id)
            dismissed = await db.dismissed_models(conn, plan.user_id, plan.session_id)
            return PlanState(plan, subtasks, dismissed, self.rules)
        state.plan = plan
        return state

    async def _save(self, conn: Connection, state: PlanState, changes: Changes) -> None:
        """Write what a decision changed (the plan and its subtasks in one statement, with a
        new revision), record its events, count it, and keep the state for the next one."""
        if changes.approvals:
            await db.insert_approvals(conn, changes.approvals)
        if changes.resolved:
            await db.resolve_approvals(conn, changes.resolved)
        if changes.to_write:
            revision = await db.save(conn, state.plan, changes.subtasks.values(), changes.metrics)
            state.saved(revision)
        await outbox.add(conn, changes.events)
        _count(changes)
        _log(state.plan, changes)
        if not state.plan.is_complete:
            self.states[state.plan.plan_id] = state
            while len(self.states) > self.settings.planner_cached_plans:
                self.states.popitem(last=False)

    # --- creating a plan ------------------------------------------------------------------

    async def create_plan(self, conn: Connection, request: PlanRequest) -> tuple[Plan, bool]:
        """The new plan and True; or the task's existing plan and False when the same
        request was posted before. Raises Conflict when the task has a different plan."""
        now = utcnow()
        fingerprint = request.fingerprint()
        plan = await db.insert_plan(
            conn,
            plan_id=request.plan_id or str(uuid.uuid4()),
            task_id=request.task_id,
            user_id=request.user_id,
            session_id=request.session_id,
            original_task=request.original_task,
            subtask_count=len(request.subtasks),
            status=(
                PlanStatus.AWAITING_APPROVAL if request.requires_approval else PlanStatus.RUNNING
            ),
            requires_approval=request.requires_approval,
            created_at=now,
            metadata=request.metadata,
            fingerprint=fingerprint,
        )
        if plan is None:
            existing = await db.plan_of_task(conn, request.task_id)
            assert existing is not None
            if existing.fingerprint != fingerprint:
                raise Conflict(
                    f"task {request.task_id} already has plan {existing.plan_id}"
                    " with different content"
                )
            return existing, False
        subtasks = new_subtasks(
            request,
            plan.plan_id,
            self.settings.planner_max_attempts,
            self.settings.planner_default_timeout_s,
        )
        await db.insert_subtasks(conn, subtasks)
        dismissed = await db.dismissed_models(conn, plan.user_id, plan.session_id)
        state = PlanState(plan, subtasks, dismissed, self.rules)
        await self._save(conn, state, state.start(now))
        return state.plan, True

    # --- agents' reports ------------------------------------------------------------------

    async def on_subtask_started(self, conn: Connection, events: list[SubtaskStarted]) -> None:
        await self._apply_reports(conn, events)

    async def on_subtask_completed(self, conn: Connection, events: list[SubtaskCompleted]) -> None:
        await self._apply_reports(conn, events)

    async def on_subtask_failed(self, conn: Connection, events: list[SubtaskFailed]) -> None:
        await self._apply_reports(conn, events)

    async def _apply_reports(self, conn: Connection, events: Sequence[AgentReport]) -> None:
        by_plan: dict[str, list[AgentReport]] = defaultdict(list)
        for e in events:
            by_plan[e.plan_id].append(e)
        plans = await db.lock_plans(conn, sorted(by_plan))
        now = utcnow()
        for plan_id in sorted(by_plan):
            plan = plans.get(plan_id)
            if plan is None:  # a plan some other orchestrator runs: not ours to follow
                continue
            state = await self._load(conn, plan)
            await self._save(conn, state, state.report(by_plan[plan_id], now))

    # --- approvals ------------------------------------------------------------------------

    async def resolve_approval(
        self, conn: Connection, approval_id: uuid.UUID, approved: bool, comment: str | None
    ) -> Approval:
        found = await db.approval(conn, approval_id)
        if found is None:
            raise NotFound(f"no approval {approval_id}")
        state = await self._lock(conn, found.plan_id)
        assert state is not None
        found = await db.approval(conn, approval_id)  # read again under the plan's lock
        assert found is not None
        status = ApprovalStatus.APPROVED if approved else ApprovalStatus.REJECTED
        changes = state.resolve(found, status, comment, utcnow())
        await self._save(conn, state, changes)
        (resolved,) = (a for a in changes.resolved if a.approval_id == approval_id)
        return resolved

    # --- cancel, reassign -----------------------------------------------------------------

    async def cancel_plan(self, conn: Connection, plan_id: str) -> Plan:
        state = await self._lock(conn, plan_id)
        if state is None:
            raise NotFound(f"no plan {plan_id}")
        pending = await db.pending_approvals_of_plan(conn, plan_id)
        await self._save(conn, state, state.cancel(pending, utcnow()))
        return state.plan

    async def assign(self, conn: Connection, plan_id: str, subtask_id: str, agent: str) -> Subtask:
        """Give a subtask that has not gone out yet to another agent (see PlanState.assign)."""
        state = await self._lock(conn, plan_id)
        if state is None:
            raise NotFound(f"no plan {plan_id}")
        decision = await db.approval(conn, domain.approval_id(plan_id, subtask_id))
        approved = decision is not None and decision.status == ApprovalStatus.APPROVED
        await self._save(conn, state, state.assign(subtask_id, agent, approved, utcnow()))
        return state.subtasks[subtask_id]

    # --- dismissals -----------------------------------------------------------------------

    async def on_model_dismissed(self, conn: Connection, events: list[ModelDismissed]) -> None:
        await db.add_dismissals(
            conn,
            [(e.user_id, e.session_id, e.model_id, e.reason, e.occurred_at) for e in events],
        )
        sessions = sorted({(e.user_id, e.session_id) for e in events})
        plans = await db.lock_open_plans_of_sessions(conn, sessions)
        now = utcnow()
        for plan in plans:
            state = await self._load(conn, plan)
            gone = [
                e.model_id
                for e in events
                if (e.user_id, e.session_id) == (plan.user_id, plan.session_id)
            ]
            await self._save(conn, state, state.dismiss(gone, now))

    # --- the timer loop -------------------------------------------------------------------

    async def timers(self, runtime: Runtime[PlannerSettings]) -> None:
        """Every tick: attempts past their deadline count as failed, due retries go out,
        expired approvals resolve as timeout."""
        while True:
            try:
                await self.tick(runtime)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("planner timers: %s", exc)
            await asyncio.sleep(self.settings.planner_tick_s)

    async def tick(self, runtime: Runtime[PlannerSettings]) -> None:
        async with runtime.pool.acquire() as conn:
            plan_ids = await db.plans_with_due_work(conn, utcnow(), limit=100)
        for plan_id in plan_ids:
            # a trace of its own: the log lines and the events of what the clock decided
            with tracer.start_as_current_span("planner due work", attributes={"plan_id": plan_id}):
                async with runtime.transaction() as conn:
                    # a plan locked by a consumer right now is looked at again next tick
                    state = await self._lock(conn, plan_id, skip_locked=True)
                    if state is not None:
                        now = utcnow()
                        expired = await db.expired_approvals(conn, plan_id, now)
                        await self._save(conn, state, state.due_work(expired, now))


# what an operator reads of a subtask's step, by the status it entered
_STEP = {
    SubtaskStatus.READY: "dispatched",
    SubtaskStatus.RUNNING: "started",
    SubtaskStatus.RETRYING: "failed; retry due",
    SubtaskStatus.COMPLETED: "completed",
    SubtaskStatus.FAILED: "failed",
    SubtaskStatus.SKIPPED: "skipped",
    SubtaskStatus.REJECTED: "rejected",
    SubtaskStatus.HELD: "held",
    SubtaskStatus.AWAITING_APPROVAL: "awaiting approval",
    SubtaskStatus.PENDING: "pending",
}


def _log(plan: Plan, changes: Changes) -> None:
    """A line per step of the plan's life, in the transaction that writes it (one that rolls
    back is tried again and says so again); in a consumer or request, with its trace id."""
    ids = {"plan_id": plan.plan_id, "task_id": plan.task_id}
    if any(isinstance(e, PlanCreated) for e in changes.events):
        log.info(
            "plan %s created with %d subtasks: %s",
            plan.plan_id,
            plan.subtask_count,
            changes.plans_entered[0],
            extra={**ids, "status": str(changes.plans_entered[0])},
        )
        plans_entered = changes.plans_entered[1:]
    else:
        plans_entered = changes.plans_entered
    for s in changes.entered:
        step = _STEP.get(s.status, str(s.status))
        if s.status == SubtaskStatus.RETRYING and s.next_attempt_at is not None:
            step += f" at {s.next_attempt_at.isoformat(timespec='seconds')}"
        # an agent's start is the agent's news, not a step of the plan: DEBUG
        log.log(
            logging.DEBUG if s.status == SubtaskStatus.RUNNING else logging.INFO,
            "plan %s subtask %s %s (attempt %d of %d, agent %s)%s",
            plan.plan_id,
            s.subtask_id,
            step,
            s.attempt,
            s.max_attempts,
            s.agent,
            f": {s.error}" if s.error and s.status in _FAILING else "",
            extra={**ids, "subtask_id": s.subtask_id, "status": str(s.status)},
        )
    for status in plans_entered:
        what = f"finished: {status}" if status in _PLAN_ENDS else str(status)
        log.info("plan %s %s", plan.plan_id, what, extra={**ids, "status": str(status)})


_FAILING = {
    SubtaskStatus.RETRYING,
    SubtaskStatus.FAILED,
    SubtaskStatus.SKIPPED,
    SubtaskStatus.REJECTED,
    SubtaskStatus.HELD,
}
_PLAN_ENDS = {PlanStatus.COMPLETED, PlanStatus.FAILED, PlanStatus.CANCELLED}


def _count(changes: Changes) -> None:
    for status, n in changes.subtasks_entered.items():
        SUBTASKS.labels(status).inc(n)
    for status in changes.plans_entered:
        PLANS.labels(status).inc()
    if changes.retries:
        RETRIES.inc(changes.retries)
    for kind, n in changes.timeouts.items():
        TIMEOUTS.labels(kind).inc(n)
    if changes.released_after:
        now = utcnow()
        for at in changes.released_after:
            DISPATCH_LATENCY.observe(max(0.0, (now - at).total_seconds()))
