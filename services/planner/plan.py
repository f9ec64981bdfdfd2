"""The plan aggregate: a plan with all its subtasks and the models dismissed from its
session, which decides what follows from each command and agent's report.

Every decision is one method of `PlanState` that changes the state in memory and returns
`Changes`: the subtasks and plan to write, the approvals to insert or answer, the events to
publish and what to count. No I/O and no clock: the handlers lock and load the state, call
one method with `now`, write what it returns and add its events to the outbox.

Outgoing event and approval ids are derived from the state change (`domain.derived_id`), so
a decision taken again after a rolled-back transaction produces the same ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from contracts.events import (
    ApprovalRequested,
    ApprovalResolved,
    Event,
    PlanCompleted,
    PlanCreated,
    PlannedSubtask,
    SubtaskCompleted,
    SubtaskFailed,
    SubtaskReady,
    SubtaskStarted,
)
from services.planner import domain
from services.planner.domain import (
    AWAITING_APPROVAL,
    CANCELLED,
    COMPLETED,
    DEAD_ENDS,
    HELD,
    NOT_SENT,
    PENDING,
    PLAN_TERMINAL,
    REJECTED,
    RETRYING,
    SKIPPED,
    TERMINAL,
    Approval,
    ApprovalStatus,
    Plan,
    PlanRequest,
    PlanStatus,
    RetryPolicy,
    Subtask,
    SubtaskStatus,
)

AgentReport = SubtaskStarted | SubtaskCompleted | SubtaskFailed
_DONE = frozenset({COMPLETED})


class NotFound(Exception):
    pass


class Conflict(Exception):
    """The request contradicts the state: e.g. the task has another plan, the approval was
    already resolved, the plan already finished."""


@dataclass(frozen=True)
class Rules:
    """What the planner's settings decide about every plan."""

    retry: RetryPolicy
    fallback_agent: str | None  # takes the work of a dismissed model; None: held
    approval_timeout_s: float
    event_max_bytes: int  # plan.created lists only the subtasks that fit


@dataclass
class Changes:
    """What one decision changed: to write, to announce and to count."""

    subtasks: dict[str, Subtask] = field(default_factory=dict)  # the last state of each
    # the plan's row changed, or what its state rests on (its session's dismissed models):
    # write it with a new revision even when no subtask changed
    plan: bool = False
    metrics: dict[str, Any] | None = None  # the plan's, once it finished
    approvals: list[Approval] = field(default_factory=list)  # requested: to insert
    resolved: list[Approval] = field(default_factory=list)  # answered: to update
    events: list[Event] = field(default_factory=list)  # to publish, in this order
    subtasks_entered: Counter[str] = field(default_factory=Counter)  # by status
    entered: list[Subtask] = field(default_factory=list)  # each subtask that changed status
    plans_entered: list[PlanStatus] = field(default_factory=list)
    retries: int = 0  # attempts dispatched after a failed one
    timeouts: Counter[str] = field(default_factory=Counter)  # "subtask", "approval"
    # for each dependent dispatched by a completion in this batch, when the last of the
    # reported completions it waited for occurred
    released_after: list[datetime] = field(default_factory=list)

    @property
    def to_write(self) -> bool:
        return self.plan or bool(self.subtasks)


@dataclass(frozen=True)
class Change:
    before: Subtask
    after: Subtask

    def entered(self, group: frozenset[SubtaskStatus]) -> bool:
        return self.after.status in group and self.before.status not in group


def new_subtasks(
    request: PlanRequest, plan_id: str, max_attempts: int, timeout_s: float
) -> list[Subtask]:
    """The subtasks of a new plan, all pending; attempts and timeout default to the given."""
    return [
        Subtask(
            plan_id=plan_id,
            subtask_id=s.subtask_id,
            sequence_number=s.sequence_number if s.sequence_number is not None else i,
            description=s.description,
            agent=s.agent,
            estimated_time=s.estimated_time,
            status=PENDING,
            dependencies=tuple(dict.fromkeys(s.depends_on)),
            attempt=0,
            max_attempts=s.max_attempts or max_attempts,
            timeout_s=s.timeout_s or timeout_s,
            requires_approval=s.requires_approval,
        )
        for i, s in enumerate(request.subtasks, start=1)
    ]


class PlanState:
    """A plan with all its subtasks as of `plan.revision`."""

    def __init__(
        self, plan: Plan, subtasks: Iterable[Subtask], dismissed: Iterable[str], rules: Rules
    ) -> None:
        self.plan = plan
        self.subtasks = {s.subtask_id: s for s in subtasks}
        self.dependents = domain.dependents_of(self.deps())
        self.dismissed = set(dismissed)  # models dismissed from the plan's session
        self.rules = rules
        self.open = sum(1 for s in self.subtasks.values() if s.status not in TERMINAL)

    def ordered(self) -> list[Subtask]:
        return sorted(self.subtasks.values(), key=lambda s: (s.sequence_number, s.subtask_id))

    def deps(self) -> dict[str, tuple[str, ...]]:
        return {sid: s.dependencies for sid, s in self.subtasks.items()}

    def statuses(self) -> Mapping[str, str]:
        return _Statuses(self.subtasks)

    def saved(self, revision: int) -> None:
        """The changes were written: the plan's row now carries `revision`."""
        self.plan = replace(self.plan, revision=revision)

    # --- commands and reports -------------------------------------------------------------

    def start(self, now: datetime) -> Changes:
        """A plan just created: announce it, then ask for its approval or dispatch its roots."""
        c = Changes(plan=True)
        c.events.append(self._plan_created())
        c.plans_entered.append(self.plan.status)
        c.subtasks_entered[PENDING] += len(self.subtasks)
        if self.plan.status == PlanStatus.AWAITING_APPROVAL:
            self._request_approvals(c, [None], now)
        else:
            roots = set(domain.roots(self.deps()))
            self._dispatch(c, [s for s in self.subtasks.values() if s.subtask_id in roots], now)
        return c

    def report(self, reports: Sequence[AgentReport], now: datetime) -> Changes:
        """Agents' reports of this plan's subtasks, in the order they arrived; duplicates,
        stale attempts and late reports change nothing."""
        c = Changes()
        changes: dict[str, Change] = {}
        completed_at: dict[str, datetime] = {}
        for e in reports:
            s = self.subtasks.get(e.subtask_id)
            if s is None:
                continue
            after = self._transition(s, e, now)
            if after is None:
                continue
            first = changes.get(s.subtask_id)
            changes[s.subtask_id] = Change(first.before if first else s, after)
            self._put(c, [after])
            if after.status == COMPLETED and isinstance(e, SubtaskCompleted):
                completed_at[s.subtask_id] = e.occurred_at
        self._settle(c, list(changes.values()), now, completed_at)
        return c

    def _transition(self, s: Subtask, e: AgentReport, now: datetime) -> Subtask | None:
        if isinstance(e, SubtaskCompleted):
            return domain.completed(
                s,
                e.attempt,
                e.completed_at,
                started_at=e.started_at,
                duration_seconds=e.duration_seconds,
                result=e.result,
            )
        if isinstance(e, SubtaskStarted):
            return domain.started(s, e.attempt, e.started_at, now)
        return domain.failed(s, e.attempt, e.error, e.retryable, now, self.rules.retry)

    def resolve(
        self, approval: Approval, status: ApprovalStatus, comment: str | None, now: datetime
    ) -> Changes:
        """Answer an approval: approved sends the subtask (or the whole plan) on, rejected
        or timed out skips it (or the plan) and what depends on it. Raises Conflict when the
        approval was answered already."""
        if approval.status != ApprovalStatus.PENDING:
            raise Conflict(f"approval {approval.approval_id} is already {approval.status}")
        c = Changes()
        self._resolve(c, approval, status, comment, now)
        return c

    def due_work(self, expired: Sequence[Approval], now: datetime) -> Changes:
        """What the clock decides: attempts past their deadline count as failed, retries
        that are due go out, and the `expired` approvals resolve as timeout."""
        c = Changes()
        changes: list[Change] = []
        for s in self.ordered():
            after = domain.timed_out(s, now, self.rules.retry)
            if after is not None:
                c.timeouts["subtask"] += 1
                changes.append(Change(s, after))
        self._settle(c, changes, now)
        if self.plan.status == PlanStatus.RUNNING:
            due = [
                s
                for s in self.ordered()
                if s.status == RETRYING and s.next_attempt_at and s.next_attempt_at <= now
            ]
            self._dispatch(c, due, now, approved=True)
        for a in expired:
            c.timeouts["approval"] += 1
            self._resolve(c, a, ApprovalStatus.TIMEOUT, "no answer in time", now)
        return c

    def cancel(self, pending: Sequence[Approval], now: datetime) -> Changes:
        """Nothing more goes out: the `pending` approvals are rejected, open subtasks end
        cancelled and so does the plan. Raises Conflict when the plan finished otherwise."""
        c = Changes()
        plan = self.plan
        if plan.status == PlanStatus.CANCELLED:
            return c
        if plan.status in PLAN_TERMINAL:
            raise Conflict(f"plan {plan.plan_id} already {plan.status}")
        for a in pending:
            self._record_resolution(c, a, ApprovalStatus.REJECTED, "plan cancelled", now)
        self._put(
            c,
            [
                domain.finish(s, CANCELLED, "plan cancelled", now)
                for s in self.ordered()
                if s.status not in TERMINAL
            ],
        )
        self._finish(c, PlanStatus.CANCELLED, now)
        return c

    def assign(self, subtask_id: str, agent: str, approved: bool, now: datetime) -> Changes:
        """Give a subtask that has not gone out yet (held, pending, retrying, awaiting
        approval) to another agent; a held one is released and dispatched when it may
        (`approved`: its approval, if it needs one, was granted)."""
        s = self.subtasks.get(subtask_id)
        if s is None:
            raise NotFound(f"plan {self.plan.plan_id} has no subtask {subtask_id}")
        if s.status not in NOT_SENT | {HELD}:
            raise Conflict(f"subtask {subtask_id} is {s.status}; only one not dispatched yet moves")
        c = Changes()
        if s.status != HELD:
            self._put(c, [s.but(agent=agent)])
            return c
        released = s.but(agent=agent, status=PENDING, error=None)
        self._put(c, [released])
        if self.plan.status == PlanStatus.RUNNING and domain.newly_ready(
            {subtask_id: s.dependencies}, self.statuses(), [subtask_id]
        ):
            self._dispatch(c, [released], now, approved=approved)
        return c

    def dismiss(self, models: Sequence[str], now: datetime) -> Changes:
        """From now on no subtask of the session goes to these models: what has not gone
        out yet moves to the fallback agent, or is held where there is none."""
        c = Changes(plan=True)  # other replicas must read the dismissed models again
        self.dismissed.update(models)
        changes: list[Change] = []
        for model in dict.fromkeys(models):
            agent = domain.route(model, self.dismissed, self.rules.fallback_agent)
            for s in self.ordered():
                if s.agent != model or s.status not in NOT_SENT:
                    continue
                if agent is not None:
                    changes.append(Change(s, s.but(agent=agent)))
                elif s.status != AWAITING_APPROVAL:  # held once approved, at dispatch
                    changes.append(
                        Change(s, s.but(status=HELD, next_attempt_at=None, error=self._held(model)))
                    )
        self._settle(c, changes, now)
        return c

    # --- what follows from changes ---------------------------------------------------------

    def _put(self, c: Changes, subtasks: Iterable[Subtask]) -> None:
        for s in subtasks:
            before = self.subtasks[s.subtask_id]
            if s.status != before.status:
                c.subtasks_entered[s.status] += 1
                c.entered.append(s)
                self.open += (before.status in TERMINAL) - (s.status in TERMINAL)
            self.subtasks[s.subtask_id] = s
            c.subtasks[s.subtask_id] = s

    def _settle(
        self,
        c: Changes,
        changes: Sequence[Change],
        now: datetime,
        completed_at: Mapping[str, datetime] | None = None,
    ) -> None:
        """Take in the changes, then what follows: dependents that became ready go out,
        dependents of a dead end are skipped, and the plan finishes once nothing is open."""
        if not changes:
            return
        self._put(c, (ch.after for ch in changes))
        done = [ch.after.subtask_id for ch in changes if ch.entered(_DONE)]
        dead = [ch.after.subtask_id for ch in changes if ch.entered(DEAD_ENDS)]
        dispatched: list[Subtask] = []
        if done and self.plan.status == PlanStatus.RUNNING:
            candidates = dict.fromkeys(d for sid in done for d in self.dependents.get(sid, ()))
            deps = {x: self.subtasks[x].dependencies for x in candidates}
            ready = domain.newly_ready(deps, self.statuses(), candidates)
            dispatched = self._dispatch(c, [self.subtasks[sid] for sid in ready], now)
            if completed_at:
                for s in dispatched:
                    enabling = [completed_at[d] for d in s.dependencies if d in completed_at]
                    if enabling:
                        c.released_after.append(max(enabling))
        if dead:
            self._skip_dependents(c, dead, now)
        if dispatched or not any(ch.entered(TERMINAL) for ch in changes):
            return  # something is still open: the plan goes on
        self._finish_if_done(c, now)

    def _dispatch(
        self, c: Changes, subtasks: Sequence[Subtask], now: datetime, approved: bool = False
    ) -> list[Subtask]:
        """Send out the next attempt of each subtask, unless it needs an approval first or
        its agent was dismissed from the session; returns those sent."""
        if not subtasks:
            return []
        asking = [s for s in subtasks if s.requires_approval and not approved]
        if asking:
            self._request_approvals(c, asking, now)
            subtasks = [s for s in subtasks if not (s.requires_approval and not approved)]
        sent: list[Subtask] = []
        held: list[Subtask] = []
        for s in subtasks:
            agent = domain.route(s.agent, self.dismissed, self.rules.fallback_agent)
            if agent is None:
                held.append(
                    s.but(
                        status=HELD,
                        error=self._held(s.agent),
                        deadline_at=None,
                        next_attempt_at=None,
                    )
                )
            else:
                sent.append(domain.dispatch(s, agent, now))
        self._put(c, [*sent, *held])
        c.events.extend(self._subtask_ready(s, now) for s in sent)
        c.retries += sum(1 for s in sent if s.attempt > 1)
        return sent

    def _held(self, model: str) -> str:
        return (
            f"held: model {model} was dismissed from session {self.plan.session_id}"
            " and no fallback agent is configured"
        )

    def _request_approvals(
        self, c: Changes, subtasks: Sequence[Subtask | None], now: datetime
    ) -> None:
        """Ask for an approval of each subtask (type tool), or of the whole plan (None)."""
        plan = self.plan
        expires_at = now + timedelta(seconds=self.rules.approval_timeout_s)
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
            a = Approval(
                approval_id=domain.approval_id(plan.plan_id, s.subtask_id if s else None),
                user_id=plan.user_id,
                session_id=plan.session_id,
                plan_id=plan.plan_id,
                subtask_id=s.subtask_id if s else None,
                type="tool" if s else "plan",
                payload=payload,
                status=ApprovalStatus.PENDING,
                created_at=now,
                expires_at=expires_at,
                resolved_at=None,
                decision=None,
            )
            c.approvals.append(a)
            c.events.append(
                ApprovalRequested(
                    event_id=domain.derived_id("approval.requested", a.approval_id),
                    occurred_at=now,
                    approval_id=a.approval_id,
                    plan_id=a.plan_id,
                    subtask_id=a.subtask_id,
                    user_id=a.user_id,
                    session_id=a.session_id,
                    type=a.type,
                    payload=a.payload,
                    expires_at=a.expires_at,
                )
            )
        self._put(c, [s.but(status=AWAITING_APPROVAL) for s in subtasks if s is not None])

    def _skip_dependents(self, c: Changes, dead: Sequence[str], now: datetime) -> None:
        subtasks = self.subtasks
        self._put(
            c,
            [
                domain.finish(
                    subtasks[sid],
                    SKIPPED,
                    f"skipped: depends on {cause}, which {subtasks[cause].status}",
                    now,
                )
                for sid, cause in domain.to_skip(self.deps(), self.statuses(), dead).items()
            ],
        )

    def _finish_if_done(self, c: Changes, now: datetime) -> None:
        if self.plan.status in PLAN_TERMINAL or self.open:
            return
        outcome = domain.plan_outcome(s.status for s in self.subtasks.values())
        assert outcome is not None
        self._finish(c, outcome, now)

    def _finish(self, c: Changes, status: PlanStatus, now: datetime) -> None:
        plan = self.plan
        if plan.is_complete:
            return  # finished earlier in this decision
        c.metrics = domain.metrics(self.ordered(), plan.created_at, now, now)
        self.plan = replace(plan, status=status, completed_at=now, is_complete=True)
        c.plan = True
        c.plans_entered.append(status)
        c.events.append(
            PlanCompleted(
                event_id=domain.derived_id("plan.completed", plan.plan_id),
                occurred_at=now,
                plan_id=plan.plan_id,
                task_id=plan.task_id,
                user_id=plan.user_id,
                session_id=plan.session_id,
                status=status,
                metrics=c.metrics,
            )
        )

    # --- approvals ------------------------------------------------------------------------

    def _resolve(
        self,
        c: Changes,
        approval: Approval,
        status: ApprovalStatus,
        comment: str | None,
        now: datetime,
    ) -> None:
        self._record_resolution(c, approval, status, comment, now)
        if self.plan.status in PLAN_TERMINAL:
            return
        why = f"approval {status}" + (f": {comment}" if comment else "")
        if approval.subtask_id is None:  # the whole plan
            if status == ApprovalStatus.APPROVED:
                self.plan = replace(self.plan, status=PlanStatus.RUNNING)
                c.plan = True
                c.plans_entered.append(PlanStatus.RUNNING)
                ready = set(domain.newly_ready(self.deps(), self.statuses(), self.subtasks))
                self._dispatch(c, [s for s in self.ordered() if s.subtask_id in ready], now)
            else:
                changes = [
                    Change(s, domain.finish(s, SKIPPED, f"skipped: plan {why}", now))
                    for s in self.ordered()
                    if s.status not in TERMINAL
                ]
                self._settle(c, changes, now)
            return
        current = self.subtasks.get(approval.subtask_id)
        if current is None or current.status != AWAITING_APPROVAL:
            return
        if status == ApprovalStatus.APPROVED:
            self._dispatch(c, [current], now, approved=True)
        else:
            self._settle(c, [Change(current, domain.finish(current, REJECTED, why, now))], now)

    def _record_resolution(
        self,
        c: Changes,
        approval: Approval,
        status: ApprovalStatus,
        comment: str | None,
        now: datetime,
    ) -> None:
        """Store the answer to an approval and announce it with `approval.resolved`."""
        c.resolved.append(replace(approval, status=status, decision=comment, resolved_at=now))
        plan = self.plan
        c.events.append(
            ApprovalResolved(
                event_id=domain.derived_id("approval.resolved", approval.approval_id),
                occurred_at=now,
                approval_id=approval.approval_id,
                plan_id=plan.plan_id,
                subtask_id=approval.subtask_id,
                status=status,
                decision=comment,
                user_id=plan.user_id,
                session_id=plan.session_id,
            )
        )

    # --- events ---------------------------------------------------------------------------

    def _subtask_ready(self, s: Subtask, now: datetime) -> SubtaskReady:
        plan = self.plan
        return SubtaskReady(
            event_id=domain.derived_id("subtask.ready", plan.plan_id, s.subtask_id, s.attempt),
            occurred_at=now,
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

    def _plan_created(self) -> PlanCreated:
        plan = self.plan
        subtasks = list(self.subtasks.values())  # as the request listed them
        event = PlanCreated(
            event_id=domain.derived_id("plan.created", plan.plan_id),
            occurred_at=plan.created_at,
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
        budget = self.rules.event_max_bytes - len(event.model_dump_json())
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


class _Statuses(Mapping[str, str]):
    """The status of each subtask, read through (no copy of a plan of thousands)."""

    def __init__(self, subtasks: dict[str, Subtask]) -> None:
        self._subtasks = subtasks

    def __getitem__(self, key: str) -> SubtaskStatus:
        return self._subtasks[key].status

    def __iter__(self) -> Iterator[str]:
        return iter(self._subtasks)

    def __len__(self) -> int:
        return len(self._subtasks)
