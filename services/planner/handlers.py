"""Planner's imperative shell: subscribers, commands from the API and the timer loop.

Each runs in one transaction: lock the plan's row (so that concurrent events of one plan
take turns), take the plan's state, decide with `domain`, write, and record the events to
publish with `outbox.add`. Outgoing event ids are derived from the state change
(`domain.derived_id`), so a retried transaction produces the same events.

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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import asyncpg
from prometheus_client import Counter, Histogram

from contracts.events import (
    ApprovalRequested,
    ApprovalResolved,
    ModelDismissed,
    PlanCompleted,
    PlanCreated,
    PlannedSubtask,
    SubtaskCompleted,
    SubtaskFailed,
    SubtaskReady,
    SubtaskStarted,
    utcnow,
)
from services.planner import db, domain
from services.planner.config import PlannerSettings
from services.planner.db import Approval, Plan
from services.planner.domain import (
    AWAITING_APPROVAL,
    CANCELLED,
    COMPLETED,
    DEAD_ENDS,
    HELD,
    PENDING,
    PLAN_AWAITING_APPROVAL,
    PLAN_RUNNING,
    PLAN_TERMINAL,
    REJECTED,
    RETRYING,
    SKIPPED,
    TERMINAL,
    PlanOutcome,
    PlanRequest,
    Resolution,
    Subtask,
)
from services.runtime import outbox
from services.runtime.db import Connection
from services.runtime.service import Runtime

log = logging.getLogger(__name__)

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


class NotFound(Exception):
    pass


class Conflict(Exception):
    """The request contradicts the state: e.g. the task has another plan, the approval was
    already resolved, the plan already finished."""


@dataclass(frozen=True)
class Change:
    before: Subtask
    after: Subtask


@dataclass
class PlanState:
    """A plan with all its subtasks as of `plan.revision`, and what this transaction
    changed and has not written yet."""

    plan: Plan
    subtasks: dict[str, Subtask]
    dependents: dict[str, list[str]]
    dismissed: set[str]  # models dismissed from the plan's session
    open: int  # subtasks not finished
    changed: dict[str, Subtask] = field(default_factory=dict)
    plan_changed: bool = False
    metrics: dict[str, Any] | None = None  # set when the plan finishes

    @classmethod
    def of(cls, plan: Plan, subtasks: Iterable[Subtask], dismissed: set[str]) -> PlanState:
        by_id = {s.subtask_id: s for s in subtasks}
        deps = {sid: s.dependencies for sid, s in by_id.items()}
        return cls(
            plan,
            by_id,
            domain.dependents_of(deps),
            dismissed,
            sum(1 for s in by_id.values() if s.status not in TERMINAL),
        )

    @property
    def pending_writes(self) -> bool:
        return bool(self.changed) or self.plan_changed

    def put(self, subtasks: Iterable[Subtask]) -> None:
        for s in subtasks:
            before = self.subtasks[s.subtask_id]
            self.open += (before.status in TERMINAL) - (s.status in TERMINAL)
            self.subtasks[s.subtask_id] = s
            self.changed[s.subtask_id] = s

    def set_plan(self, **changes: Any) -> None:
        self.plan = replace(self.plan, **changes)
        self.plan_changed = True

    def ordered(self) -> list[Subtask]:
        return sorted(self.subtasks.values(), key=lambda s: (s.sequence_number, s.subtask_id))

    def deps(self) -> dict[str, tuple[str, ...]]:
        return {sid: s.dependencies for sid, s in self.subtasks.items()}

    def statuses(self) -> Mapping[str, str]:
        return _Statuses(self.subtasks)


class _Statuses(Mapping[str, str]):
    """The status of each subtask, read through (no copy of a plan of thousands)."""

    def __init__(self, subtasks: dict[str, Subtask]) -> None:
        self._subtasks = subtasks

    def __getitem__(self, key: str) -> str:
        return self._subtasks[key].status

    def __iter__(self) -> Iterator[str]:
        return iter(self._subtasks)

    def __len__(self) -> int:
        return len(self._subtasks)


class AgentReport(Protocol):
    @property
    def plan_id(self) -> str: ...
    @property
    def subtask_id(self) -> str: ...
    @property
    def occurred_at(self) -> datetime: ...


R = TypeVar("R", bound=AgentReport)


class Planner:
    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings
        self.policy = domain.RetryPolicy(
            settings.planner_retry_base_s, settings.planner_retry_max_s
        )
        self.states: OrderedDict[str, PlanState] = OrderedDict()  # least recently used first

    # --- the state of a plan --------------------------------------------------------------

    async def _lock(
        self, conn: Connection, plan_id: str, *, skip_locked: bool = False
    ) -> PlanState | None:
        plan = await db.lock_plan(conn, plan_id, skip_locked=skip_locked)
        return None if plan is None else await self._state(conn, plan)

    async def _state(self, conn: Connection, plan: Plan) -> PlanState:
        """The state of a plan whose row this transaction has locked (and read as `plan`):
        the kept one when nobody wrote the plan since, otherwise read afresh."""
        state = self.states.get(plan.plan_id)
        if state is None or state.plan.revision != plan.revision or state.pending_writes:
            subtasks = await db.plan_subtasks(conn, plan.plan_id)
            dismissed = await db.dismissed_models(conn, plan.user_id, plan.session_id)
            state = PlanState.of(plan, subtasks, dismissed)
        state.plan = plan
        self._keep(state)
        return state

    def _keep(self, state: PlanState) -> None:
        self.states[state.plan.plan_id] = state
        self.states.move_to_end(state.plan.plan_id)
        while len(self.states) > self.settings.planner_cached_plans:
            self.states.popitem(last=False)

    async def _write(self, conn: Connection, state: PlanState, *, always: bool = False) -> None:
        """Write what the transaction changed in one statement, with a new revision; also
        when nothing did if `always` (the state depends on something else that changed)."""
        if not (state.pending_writes or always):
            return
        revision = await db.save(conn, state.plan, state.changed.values(), state.metrics)
        state.plan = replace(state.plan, revision=revision)
        state.changed.clear()
        state.plan_changed = False
        if state.plan.is_complete:
            self.states.pop(state.plan.plan_id, None)

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
            status=PLAN_AWAITING_APPROVAL if request.requires_approval else PLAN_RUNNING,
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
        subtasks = [
            Subtask(
                plan_id=plan.plan_id,
                subtask_id=s.subtask_id,
                sequence_number=s.sequence_number if s.sequence_number is not None else i,
                description=s.description,
                agent=s.agent,
                estimated_time=s.estimated_time,
                status=PENDING,
                dependencies=tuple(dict.fromkeys(s.depends_on)),
                attempt=0,
                max_attempts=s.max_attempts or self.settings.planner_max_attempts,
                timeout_s=s.timeout_s or self.settings.planner_default_timeout_s,
                requires_approval=s.requires_approval,
            )
            for i, s in enumerate(request.subtasks, start=1)
        ]
        await db.insert_subtasks(conn, subtasks)
        await outbox.add(conn, [self._plan_created(plan, subtasks)])
        PLANS.labels(plan.status).inc()
        SUBTASKS.labels(PENDING).inc(len(subtasks))
        dismissed = await db.dismissed_models(conn, plan.user_id, plan.session_id)
        state = PlanState.of(plan, subtasks, dismissed)
        if request.requires_approval:
            await self._request_approvals(conn, state, [None], now)
        else:
            roots = set(domain.roots(state.deps()))
            await self._dispatch(conn, state, [s for s in subtasks if s.subtask_id in roots], now)
        await self._write(conn, state, always=True)
        self._keep(state)
        return state.plan, True

    def _plan_created(self, plan: Plan, subtasks: Sequence[Subtask]) -> PlanCreated:
        event = PlanCreated(
            event_id=domain.derived_id("plan.created", plan.plan_id),
            plan_id=plan.plan_id,
            task_id=plan.task_id,
            user_id=plan.user_id,
            session_id=plan.session_id,
            original_task=plan.original_task,
            subtasks=[],
            requires_approval=plan.requires_approval,
            subtask_count=len(subtasks),
        )
        # NATS refuses a message over its max_payload and the outbox would retry it forever
        budget = self.settings.planner_event_max_bytes - len(event.model_dump_json())
        listed: list[PlannedSubtask] = []
        for s in subtasks:
            planned = PlannedSubtask(
                subtask_id=s.subtask_id,
                sequence_number=s.sequence_number,
                description=s.description,
                agent=s.agent,
                estimated_time=s.estimated_time,
                depends_on=list(s.dependencies),
                requires_approval=s.requires_approval,
                max_attempts=s.max_attempts,
                timeout_s=s.timeout_s,
            )
            budget -= len(planned.model_dump_json()) + 1
            if budget < 0:
                break
            listed.append(planned)
        return event.model_copy(
            update={"subtasks": listed, "subtasks_truncated": len(listed) < len(subtasks)}
        )

    # --- agents' reports ------------------------------------------------------------------

    async def on_subtask_started(self, conn: Connection, events: list[SubtaskStarted]) -> None:
        await self._apply_reports(
            conn, events, lambda s, e, now: domain.started(s, e.attempt, e.started_at, now)
        )

    async def on_subtask_completed(self, conn: Connection, events: list[SubtaskCompleted]) -> None:
        await self._apply_reports(
            conn,
            events,
            lambda s, e, now: domain.completed(
                s,
                e.attempt,
                e.completed_at,
                started_at=e.started_at,
                duration_seconds=e.duration_seconds,
                result=e.result,
            ),
            completion=True,
        )

    async def on_subtask_failed(self, conn: Connection, events: list[SubtaskFailed]) -> None:
        await self._apply_reports(
            conn,
            events,
            lambda s, e, now: domain.failed(s, e.attempt, e.error, e.retryable, now, self.policy),
        )

    async def _apply_reports(
        self,
        conn: Connection,
        events: Sequence[R],
        transition: Callable[[Subtask, R, datetime], Subtask | None],
        completion: bool = False,
    ) -> None:
        by_plan: dict[str, list[R]] = defaultdict(list)
        for e in events:
            by_plan[e.plan_id].append(e)
        plans = await db.lock_plans(conn, sorted(by_plan))
        now = utcnow()
        for plan_id in sorted(by_plan):
            plan = plans.get(plan_id)
            if plan is None:  # a plan some other orchestrator runs: not ours to follow
                continue
            state = await self._state(conn, plan)
            changes: dict[str, Change] = {}
            completed_at: dict[str, datetime] = {}
            for e in by_plan[plan_id]:
                s = state.subtasks.get(e.subtask_id)
                if s is None:
                    continue
                after = transition(s, e, now)
                if after is None:
                    continue  # a duplicate, a stale attempt, or too late to matter
                first = changes.get(s.subtask_id)
                changes[s.subtask_id] = Change(first.before if first else s, after)
                state.put([after])
                if completion and after.status == COMPLETED:
                    completed_at[s.subtask_id] = e.occurred_at
            await self._settle(conn, state, list(changes.values()), now, completed_at)
            await self._write(conn, state)

    # --- what follows from changes ---------------------------------------------------------

    async def _settle(
        self,
        conn: Connection,
        state: PlanState,
        changes: Sequence[Change],
        now: datetime,
        completed_at: dict[str, datetime] | None = None,
    ) -> None:
        """Take in the changes, then what follows: dependents that became ready go out,
        dependents of a dead end are skipped, and the plan finishes once nothing is open."""
        if not changes:
            return
        state.put(c.after for c in changes)
        moved: dict[str, int] = defaultdict(int)
        for c in changes:
            if c.after.status != c.before.status:
                moved[c.after.status] += 1
        for status, n in moved.items():
            SUBTASKS.labels(status).inc(n)
        done = [c.after.subtask_id for c in changes if _entered(c, {COMPLETED})]
        dead = [c.after.subtask_id for c in changes if _entered(c, DEAD_ENDS)]
        dispatched: list[Subtask] = []
        if done and state.plan.status == PLAN_RUNNING:
            candidates = dict.fromkeys(d for sid in done for d in state.dependents.get(sid, ()))
            deps = {c: state.subtasks[c].dependencies for c in candidates}
            ready = domain.newly_ready(deps, state.statuses(), candidates)
            dispatched = await self._dispatch(
                conn, state, [state.subtasks[sid] for sid in ready], now
            )
            if completed_at:
                _observe_dispatch_latency(dispatched, completed_at)
        if dead:
            self._skip_dependents(state, dead, now)
        if dispatched or not any(_entered(c, TERMINAL) for c in changes):
            return  # something is still open: the plan goes on
        await self._finish_if_done(conn, state, now)

    async def _dispatch(
        self,
        conn: Connection,
        state: PlanState,
        subtasks: Sequence[Subtask],
        now: datetime,
        approved: bool = False,
    ) -> list[Subtask]:
        """Send out the next attempt of each subtask, unless it needs an approval first or
        its agent was dismissed from the session; returns those sent."""
        if not subtasks:
            return []
        asking = [s for s in subtasks if s.requires_approval and not approved]
        going = [s for s in subtasks if not (s.requires_approval and not approved)]
        if asking:
            await self._request_approvals(conn, state, asking, now)
        if not going:
            return []
        plan = state.plan
        sent: list[Subtask] = []
        held: list[Subtask] = []
        for s in going:
            agent = domain.route(s.agent, state.dismissed, self.settings.planner_fallback_agent)
            if agent is None:
                held.append(
                    s.but(
                        status=HELD,
                        error=f"held: model {s.agent} was dismissed from session"
                        f" {plan.session_id} and no fallback agent is configured",
                        deadline_at=None,
                        next_attempt_at=None,
                    )
                )
            else:
                sent.append(domain.dispatch(s, agent, now))
        state.put([*sent, *held])
        await outbox.add(conn, [_subtask_ready(plan, s) for s in sent])
        SUBTASKS.labels(HELD).inc(len(held))
        SUBTASKS.labels(domain.READY).inc(len(sent))
        RETRIES.inc(sum(1 for s in sent if s.attempt > 1))
        return sent

    async def _request_approvals(
        self,
        conn: Connection,
        state: PlanState,
        subtasks: Sequence[Subtask | None],
        now: datetime,
    ) -> None:
        """Ask for an approval of each subtask (type tool), or of the whole plan (None)."""
        plan = state.plan
        expires_at = now + timedelta(seconds=self.settings.planner_approval_timeout_s)
        approvals: list[Approval] = []
        for s in subtasks:
            payload: dict[str, Any] = {"original_task": plan.original_task[:2000]}
            if s is not None:
                payload |= {
                    "subtask_id": s.subtask_id,
                    "description": s.description[:2000],
                    "agent": s.agent,
                }
            else:
                payload |= {"subtask_count": plan.subtask_count}
            approvals.append(
                Approval(
                    approval_id=domain.approval_id(plan.plan_id, s.subtask_id if s else None),
                    user_id=plan.user_id,
                    session_id=plan.session_id,
                    plan_id=plan.plan_id,
                    subtask_id=s.subtask_id if s else None,
                    type="tool" if s else "plan",
                    payload=payload,
                    status="pending",
                    created_at=now,
                    expires_at=expires_at,
                    resolved_at=None,
                    decision=None,
                )
            )
        waiting = [s.but(status=AWAITING_APPROVAL) for s in subtasks if s is not None]
        state.put(waiting)
        SUBTASKS.labels(AWAITING_APPROVAL).inc(len(waiting))
        await db.insert_approvals(conn, approvals)
        await outbox.add(
            conn,
            [
                ApprovalRequested(
                    event_id=domain.derived_id("approval.requested", a.approval_id),
                    approval_id=a.approval_id,
                    plan_id=a.plan_id,
                    subtask_id=a.subtask_id,
                    user_id=a.user_id,
                    session_id=a.session_id,
                    type="tool" if a.subtask_id else "plan",
                    payload=a.payload,
                    expires_at=a.expires_at,
                )
                for a in approvals
            ],
        )

    def _skip_dependents(self, state: PlanState, dead: Sequence[str], now: datetime) -> None:
        subtasks = state.subtasks
        skipped = [
            domain.finish(
                subtasks[sid],
                SKIPPED,
                f"skipped: depends on {cause}, which {subtasks[cause].status}",
                now,
            )
            for sid, cause in domain.to_skip(state.deps(), state.statuses(), dead).items()
        ]
        state.put(skipped)
        SUBTASKS.labels(SKIPPED).inc(len(skipped))

    async def _finish_if_done(self, conn: Connection, state: PlanState, now: datetime) -> None:
        if state.plan.status in PLAN_TERMINAL or state.open:
            return
        outcome = domain.plan_outcome(s.status for s in state.subtasks.values())
        assert outcome is not None
        await self._finish(conn, state, outcome, now)

    async def _finish(
        self, conn: Connection, state: PlanState, status: PlanOutcome, now: datetime
    ) -> None:
        plan = state.plan
        if plan.is_complete:
            return  # finished earlier in this transaction
        state.metrics = domain.metrics(state.ordered(), plan.created_at, now, now)
        state.set_plan(status=status, completed_at=now, is_complete=True)
        await outbox.add(
            conn,
            [
                PlanCompleted(
                    event_id=domain.derived_id("plan.completed", plan.plan_id),
                    plan_id=plan.plan_id,
                    task_id=plan.task_id,
                    user_id=plan.user_id,
                    session_id=plan.session_id,
                    status=status,
                    metrics=state.metrics,
                )
            ],
        )
        PLANS.labels(status).inc()

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
        if found.status != "pending":
            raise Conflict(f"approval {approval_id} is already {found.status}")
        resolved = await self._resolve(
            conn, state, found, "approved" if approved else "rejected", comment, utcnow()
        )
        await self._write(conn, state)
        return resolved

    async def _resolve(
        self,
        conn: Connection,
        state: PlanState,
        approval: Approval,
        status: Resolution,
        decision: str | None,
        now: datetime,
    ) -> Approval:
        plan = state.plan
        resolved = await self._record_resolution(conn, plan, approval, status, decision, now)
        if plan.status in PLAN_TERMINAL:
            return resolved
        why = f"approval {status}" + (f": {decision}" if decision else "")
        if approval.subtask_id is None:  # the whole plan
            if status == "approved":
                state.set_plan(status=PLAN_RUNNING)
                PLANS.labels(PLAN_RUNNING).inc()
                ready = set(domain.newly_ready(state.deps(), state.statuses(), state.subtasks))
                await self._dispatch(
                    conn, state, [s for s in state.ordered() if s.subtask_id in ready], now
                )
            else:
                changes = [
                    Change(s, domain.finish(s, SKIPPED, f"skipped: plan {why}", now))
                    for s in state.ordered()
                    if s.status not in TERMINAL
                ]
                await self._settle(conn, state, changes, now)
            return resolved
        current = state.subtasks.get(approval.subtask_id)
        if current is None or current.status != AWAITING_APPROVAL:
            return resolved
        if status == "approved":
            await self._dispatch(conn, state, [current], now, approved=True)
        else:
            await self._settle(
                conn, state, [Change(current, domain.finish(current, REJECTED, why, now))], now
            )
        return resolved

    async def _record_resolution(
        self,
        conn: Connection,
        plan: Plan,
        approval: Approval,
        status: Resolution,
        decision: str | None,
        now: datetime,
    ) -> Approval:
        """Store the answer to an approval and announce it with `approval.resolved`."""
        resolved = await db.resolve_approval(conn, approval.approval_id, status, decision, now)
        await outbox.add(
            conn,
            [
                ApprovalResolved(
                    event_id=domain.derived_id("approval.resolved", approval.approval_id),
                    approval_id=approval.approval_id,
                    plan_id=plan.plan_id,
                    subtask_id=approval.subtask_id,
                    status=status,
                    decision=decision,
                    user_id=plan.user_id,
                    session_id=plan.session_id,
                )
            ],
        )
        return resolved

    # --- cancel, reassign -----------------------------------------------------------------

    async def cancel_plan(self, conn: Connection, plan_id: str) -> Plan:
        state = await self._lock(conn, plan_id)
        if state is None:
            raise NotFound(f"no plan {plan_id}")
        plan = state.plan
        if plan.status == CANCELLED:
            return plan
        if plan.status in PLAN_TERMINAL:
            raise Conflict(f"plan {plan_id} already {plan.status}")
        now = utcnow()
        for a in await db.pending_approvals_of_plan(conn, plan_id):
            await self._record_resolution(conn, plan, a, "rejected", "plan cancelled", now)
        cancelled = [
            domain.finish(s, CANCELLED, "plan cancelled", now)
            for s in state.ordered()
            if s.status not in TERMINAL
        ]
        state.put(cancelled)
        SUBTASKS.labels(CANCELLED).inc(len(cancelled))
        await self._finish(conn, state, CANCELLED, now)
        await self._write(conn, state)
        return state.plan

    async def assign(self, conn: Connection, plan_id: str, subtask_id: str, agent: str) -> Subtask:
        """Give a subtask that has not gone out yet (held, pending, retrying, awaiting
        approval) to another agent; a held one is released and dispatched when it may."""
        state = await self._lock(conn, plan_id)
        if state is None:
            raise NotFound(f"no plan {plan_id}")
        s = state.subtasks.get(subtask_id)
        if s is None:
            raise NotFound(f"plan {plan_id} has no subtask {subtask_id}")
        if s.status not in (HELD, PENDING, RETRYING, AWAITING_APPROVAL):
            raise Conflict(f"subtask {subtask_id} is {s.status}; only one not dispatched yet moves")
        if s.status != HELD:
            state.put([s.but(agent=agent)])
        else:
            released = s.but(agent=agent, status=PENDING, error=None)
            state.put([released])
            if state.plan.status == PLAN_RUNNING and domain.newly_ready(
                {subtask_id: s.dependencies}, state.statuses(), [subtask_id]
            ):
                decision = await db.approval(conn, domain.approval_id(plan_id, subtask_id))
                approved = decision is not None and decision.status == "approved"
                await self._dispatch(conn, state, [released], utcnow(), approved=approved)
        await self._write(conn, state)
        return state.subtasks[subtask_id]

    # --- dismissals -----------------------------------------------------------------------

    async def on_model_dismissed(self, conn: Connection, events: list[ModelDismissed]) -> None:
        """From now on no subtask of the session goes to that model: what has not gone out
        yet moves to the fallback agent, or is held where there is none."""
        await db.add_dismissals(
            conn,
            [(e.user_id, e.session_id, e.model_id, e.reason, e.occurred_at) for e in events],
        )
        sessions = sorted({(e.user_id, e.session_id) for e in events})
        plans = await db.lock_open_plans_of_sessions(conn, sessions)
        now = utcnow()
        for plan in plans:
            state = await self._state(conn, plan)
            gone = [
                e.model_id
                for e in events
                if (e.user_id, e.session_id) == (plan.user_id, plan.session_id)
            ]
            state.dismissed.update(gone)
            changes: list[Change] = []
            for model in dict.fromkeys(gone):
                agent = domain.route(model, state.dismissed, self.settings.planner_fallback_agent)
                waiting = [
                    s
                    for s in state.ordered()
                    if s.agent == model and s.status in (PENDING, AWAITING_APPROVAL, RETRYING)
                ]
                for s in waiting:
                    if agent is not None:
                        changes.append(Change(s, s.but(agent=agent)))
                    elif s.status != AWAITING_APPROVAL:  # held once approved, at dispatch
                        changes.append(
                            Change(
                                s,
                                s.but(
                                    status=HELD,
                                    next_attempt_at=None,
                                    error=f"held: model {model} was dismissed from session"
                                    f" {plan.session_id} and no fallback agent is configured",
                                ),
                            )
                        )
            await self._settle(conn, state, changes, now)
            # the dismissed models are part of the state: other replicas must read it again
            await self._write(conn, state, always=True)

    # --- the timer loop -------------------------------------------------------------------

    async def timers(self, runtime: Runtime) -> None:
        """Every tick: attempts past their deadline count as failed, due retries go out,
        expired approvals resolve as timeout."""
        while True:
            try:
                await self.tick(runtime)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("planner timers: %s", exc)
            await asyncio.sleep(self.settings.planner_tick_s)

    async def tick(self, runtime: Runtime) -> None:
        async with runtime.pool.acquire() as conn:
            plan_ids = await db.plans_with_due_work(conn, utcnow(), limit=100)
        for plan_id in plan_ids:
            async with runtime.transaction() as conn:
                # a plan locked by a consumer right now is looked at again next tick
                state = await self._lock(conn, plan_id, skip_locked=True)
                if state is not None:
                    await self._due_work(conn, state)
                    await self._write(conn, state)

    async def _due_work(self, conn: Connection, state: PlanState) -> None:
        now = utcnow()
        changes: list[Change] = []
        for s in state.ordered():
            after = domain.timed_out(s, now, self.policy)
            if after is not None:
                TIMEOUTS.labels("subtask").inc()
                changes.append(Change(s, after))
        await self._settle(conn, state, changes, now)
        if state.plan.status == PLAN_RUNNING:
            due = [
                s
                for s in state.ordered()
                if s.status == RETRYING and s.next_attempt_at and s.next_attempt_at <= now
            ]
            await self._dispatch(conn, state, due, now, approved=True)
        for a in await db.expired_approvals(conn, state.plan.plan_id, now):
            TIMEOUTS.labels("approval").inc()
            await self._resolve(conn, state, a, "timeout", "no answer in time", now)


def _entered(change: Change, statuses: Iterable[str]) -> bool:
    group = set(statuses)
    return change.after.status in group and change.before.status not in group


def _subtask_ready(plan: Plan, s: Subtask) -> SubtaskReady:
    return SubtaskReady(
        event_id=domain.derived_id("subtask.ready", plan.plan_id, s.subtask_id, s.attempt),
        plan_id=plan.plan_id,
        subtask_id=s.subtask_id,
        user_id=plan.user_id,
        session_id=plan.session_id,
        agent=s.agent,
        attempt=s.attempt,
        description=s.description,
        timeout_s=s.timeout_s,
        deadline_at=s.deadline_at,
    )


def _observe_dispatch_latency(
    dispatched: Sequence[Subtask], completed_at: dict[str, datetime]
) -> None:
    now = utcnow()
    for s in dispatched:
        enabling = [completed_at[d] for d in s.dependencies if d in completed_at]
        if enabling:
            DISPATCH_LATENCY.observe(max(0.0, (now - max(enabling)).total_seconds()))
