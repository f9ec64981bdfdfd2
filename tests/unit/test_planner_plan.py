"""The plan aggregate without a database: what each report, command and tick of the clock
changes in a plan, and what it announces."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contracts.events import (
    ApprovalRequested,
    ApprovalResolved,
    Event,
    PlanCompleted,
    PlanCreated,
    SubtaskCompleted,
    SubtaskFailed,
    SubtaskReady,
    SubtaskStarted,
)
from services.planner import domain
from services.planner.domain import (
    Approval,
    ApprovalStatus,
    Plan,
    PlanRequest,
    PlanStatus,
    RetryPolicy,
    SubtaskStatus,
)
from services.planner.plan import Changes, Conflict, NotFound, PlanState, Rules, new_subtasks

T0 = datetime(2026, 4, 2, 12, 0, tzinfo=UTC)
RULES = Rules(
    retry=RetryPolicy(base_s=2.0, cap_s=10.0),
    fallback_agent=None,
    approval_timeout_s=600.0,
    event_max_bytes=512 * 1024,
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def step(sid: str, *deps: str, **fields: Any) -> dict[str, Any]:
    return {"subtask_id": sid, "description": f"do {sid}", "agent": "m1",
            "depends_on": list(deps), **fields}  # fmt: skip


def new_plan(
    *subtasks: dict[str, Any],
    requires_approval: bool = False,
    dismissed: Sequence[str] = (),
    rules: Rules = RULES,
) -> tuple[PlanState, Changes]:
    """A plan just created from these subtasks, and what its start decided."""
    request = PlanRequest.model_validate(
        {
            "task_id": "t1",
            "plan_id": "p1",
            "user_id": "alice",
            "session_id": "chat-1",
            "original_task": "write a report",
            "requires_approval": requires_approval,
            "subtasks": list(subtasks),
        }
    )
    assert domain.validate([(s.subtask_id, s.depends_on) for s in request.subtasks], 100) == []
    plan = Plan(
        plan_id="p1",
        task_id="t1",
        user_id="alice",
        session_id="chat-1",
        original_task="write a report",
        subtask_count=len(subtasks),
        status=PlanStatus.AWAITING_APPROVAL if requires_approval else PlanStatus.RUNNING,
        requires_approval=requires_approval,
        created_at=T0,
        completed_at=None,
        is_complete=False,
        metadata={},
        fingerprint=request.fingerprint(),
        revision=1,
    )
    state = PlanState(plan, new_subtasks(request, "p1", 3, 60.0), dismissed, rules)
    return state, state.start(T0)


def status(state: PlanState, sid: str) -> SubtaskStatus:
    return state.subtasks[sid].status


def of(changes: Changes, kind: type[Event]) -> list[Any]:
    return [e for e in changes.events if isinstance(e, kind)]


def ready_ids(changes: Changes) -> list[str]:
    return [e.subtask_id for e in of(changes, SubtaskReady)]


def started(sid: str, attempt: int = 1) -> SubtaskStarted:
    return SubtaskStarted(
        plan_id="p1", subtask_id=sid, agent="m1", attempt=attempt, started_at=at(1)
    )


def done(sid: str, attempt: int = 1, occurred: float = 2) -> SubtaskCompleted:
    return SubtaskCompleted(
        plan_id="p1",
        subtask_id=sid,
        model_id="m1",
        user_id="alice",
        session_id="chat-1",
        attempt=attempt,
        completed_at=at(occurred),
        occurred_at=at(occurred),
        result=f"result of {sid}",
    )


def broke(sid: str, attempt: int = 1, retryable: bool = True) -> SubtaskFailed:
    return SubtaskFailed(
        plan_id="p1",
        subtask_id=sid,
        agent="m1",
        attempt=attempt,
        error=f"attempt {attempt} broke",
        retryable=retryable,
    )


def approval_of(changes: Changes, sid: str | None) -> Approval:
    (found,) = [a for a in changes.approvals if a.subtask_id == sid]
    return found


# --- starting -----------------------------------------------------------------------------


def test_a_new_plan_is_announced_and_its_roots_go_out() -> None:
    state, changes = new_plan(step("a"), step("b", "a"), step("c"))
    (created,) = of(changes, PlanCreated)
    assert [s.subtask_id for s in created.subtasks] == ["a", "b", "c"]
    assert not created.subtasks_truncated
    assert ready_ids(changes) == ["a", "c"]
    assert changes.events[0] is created  # announced before its subtasks go out
    assert (status(state, "a"), status(state, "b")) == ("ready", "pending")
    assert set(changes.subtasks) == {"a", "c"} and changes.to_write
    ready = of(changes, SubtaskReady)[0]
    assert (ready.attempt, ready.agent, ready.deadline_at) == (1, "m1", at(60))
    assert changes.subtasks_entered == {"pending": 3, "ready": 2}
    assert changes.plans_entered == [PlanStatus.RUNNING]


def test_plan_created_lists_only_the_subtasks_that_fit_the_size_limit() -> None:
    small = Rules(RULES.retry, None, 600.0, event_max_bytes=2000)
    long = [step(f"s{i}", description="x" * 300) for i in range(20)]
    _, changes = new_plan(*long, rules=small)
    (created,) = of(changes, PlanCreated)
    assert 0 < len(created.subtasks) < 20 and created.subtasks_truncated
    assert created.subtask_count == 20
    assert len(created.model_dump_json()) <= 2000


# --- completions release dependents -------------------------------------------------------


def test_a_dependent_goes_out_only_once_every_dependency_completed() -> None:
    state, _ = new_plan(step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c"))
    assert ready_ids(state.report([done("a")], at(2))) == ["b", "c"]
    after_b = state.report([done("b")], at(3))
    assert ready_ids(after_b) == [] and status(state, "d") == "pending"
    assert ready_ids(state.report([done("c")], at(4))) == ["d"]


def test_every_completion_in_a_batch_releases_its_own_dependents() -> None:
    state, _ = new_plan(step("a"), step("x"), step("q"), step("b", "a"), step("y", "x"))
    changes = state.report([done("a"), done("x"), done("q")], at(2))
    assert sorted(ready_ids(changes)) == ["b", "y"]
    assert (status(state, "b"), status(state, "y")) == ("ready", "ready")


def test_a_batch_completing_every_dependency_releases_the_dependent_once() -> None:
    state, _ = new_plan(step("a"), step("b"), step("d", "a", "b"))
    changes = state.report([done("a", occurred=2), done("b", occurred=3)], at(4))
    assert ready_ids(changes) == ["d"]
    # its dispatch latency counts from the later of the two completions
    assert changes.released_after == [at(3)]


def test_duplicates_stale_attempts_and_unknown_subtasks_change_nothing() -> None:
    state, _ = new_plan(step("a"), step("b", "a"))
    first = state.report([done("a"), done("a")], at(2))
    assert ready_ids(first) == ["b"]
    again = state.report([done("a"), done("a", attempt=2), done("nope"), broke("a")], at(3))
    assert again.events == [] and not again.to_write


def test_a_completion_after_the_start_keeps_the_start_time() -> None:
    state, _ = new_plan(step("a"))
    state.report([started("a")], at(1))
    assert status(state, "a") == "running"
    changes = state.report([done("a")], at(2))
    a = state.subtasks["a"]
    assert (a.status, a.started_at, a.duration_seconds) == ("completed", at(1), 1.0)
    assert changes.subtasks_entered == {"completed": 1}


# --- finishing ----------------------------------------------------------------------------


def test_the_plan_completes_with_its_metrics_once_every_subtask_completed() -> None:
    state, _ = new_plan(step("a"), step("b", "a"))
    state.report([done("a")], at(2))
    changes = state.report([done("b", occurred=5)], at(5))
    (finished,) = of(changes, PlanCompleted)
    assert finished.status == "completed" and finished.metrics["by_status"] == {"completed": 2}
    assert state.plan.status == PlanStatus.COMPLETED and state.plan.is_complete
    assert state.plan.completed_at == at(5) and changes.plan and changes.metrics is not None
    assert changes.plans_entered == [PlanStatus.COMPLETED]
    assert state.report([done("b")], at(6)).events == []  # finished once


def test_a_plan_with_something_open_does_not_finish() -> None:
    state, _ = new_plan(step("a"), step("b"))
    changes = state.report([done("a")], at(2))
    assert of(changes, PlanCompleted) == [] and not state.plan.is_complete


# --- failures, retries, skips -------------------------------------------------------------


def test_a_failed_attempt_is_retried_after_its_backoff_by_the_clock() -> None:
    state, _ = new_plan(step("a", max_attempts=3), step("b", "a"))
    changes = state.report([broke("a")], at(1))
    a = state.subtasks["a"]
    assert (a.status, a.next_attempt_at, a.error) == ("retrying", at(3), "attempt 1 broke")
    assert changes.events == []
    assert state.due_work([], at(2.9)).events == []  # not due yet
    retry = state.due_work([], at(3))
    (ready,) = of(retry, SubtaskReady)
    assert (ready.subtask_id, ready.attempt, retry.retries) == ("a", 2, 1)
    state.report([broke("a", attempt=2)], at(4))
    assert state.subtasks["a"].next_attempt_at == at(8)  # the backoff doubles
    assert status(state, "b") == "pending"


def test_the_last_failed_attempt_skips_every_dependent_and_fails_the_plan() -> None:
    state, _ = new_plan(step("a", max_attempts=1), step("b", "a"), step("c", "b"), step("other"))
    state.report([done("other")], at(1))
    changes = state.report([broke("a")], at(2))
    assert (status(state, "a"), status(state, "b"), status(state, "c")) == (
        "failed",
        "skipped",
        "skipped",
    )
    assert state.subtasks["c"].error == "skipped: depends on a, which failed"
    assert status(state, "other") == "completed"
    (finished,) = of(changes, PlanCompleted)
    assert finished.status == "failed"
    assert finished.metrics["by_status"] == {"completed": 1, "failed": 1, "skipped": 2}
    assert changes.subtasks_entered == {"failed": 1, "skipped": 2}


def test_a_failure_that_is_not_retryable_fails_at_once() -> None:
    state, _ = new_plan(step("a", max_attempts=3))
    state.report([broke("a", retryable=False)], at(1))
    assert status(state, "a") == "failed" and state.plan.status == PlanStatus.FAILED


# --- timeouts -----------------------------------------------------------------------------


def test_an_attempt_past_its_deadline_counts_as_failed_and_is_retried() -> None:
    state, _ = new_plan(step("a", timeout_s=5, max_attempts=2))
    assert state.due_work([], at(4.9)).events == []
    changes = state.due_work([], at(5))
    assert status(state, "a") == "retrying" and changes.timeouts == {"subtask": 1}
    assert (state.subtasks["a"].error or "").startswith("timed out: dispatched and not started")
    assert of(state.due_work([], at(7)), SubtaskReady)[0].attempt == 2


def test_a_timed_out_last_attempt_fails_and_skips_its_dependents() -> None:
    state, _ = new_plan(step("a", timeout_s=5, max_attempts=1), step("b", "a"))
    state.report([started("a")], at(1))  # its deadline is now 5 s after the start
    assert state.due_work([], at(5.9)).events == []
    changes = state.due_work([], at(6))
    assert (status(state, "a"), status(state, "b")) == ("failed", "skipped")
    assert (state.subtasks["a"].error or "").startswith("timed out: running for more than 5s")
    assert of(changes, PlanCompleted)[0].status == "failed"


# --- approvals ----------------------------------------------------------------------------


def test_a_subtask_needing_approval_asks_when_it_becomes_ready_and_goes_once_granted() -> None:
    state, _ = new_plan(step("a"), step("b", "a", requires_approval=True))
    asked = state.report([done("a")], at(1))
    assert ready_ids(asked) == [] and status(state, "b") == "awaiting_approval"
    (request,) = of(asked, ApprovalRequested)
    approval = approval_of(asked, "b")
    assert (request.approval_id, request.type, request.expires_at) == (
        approval.approval_id,
        "tool",
        at(601),
    )
    granted = state.resolve(approval, ApprovalStatus.APPROVED, "fine", at(2))
    assert ready_ids(granted) == ["b"]
    (resolved,) = of(granted, ApprovalResolved)
    assert (resolved.status, resolved.decision) == ("approved", "fine")
    assert granted.resolved[0].status == ApprovalStatus.APPROVED
    assert granted.resolved[0].resolved_at == at(2)
    with pytest.raises(Conflict):
        state.resolve(granted.resolved[0], ApprovalStatus.REJECTED, None, at(3))


def test_a_denied_approval_rejects_the_subtask_and_skips_its_dependents() -> None:
    state, asked = new_plan(step("a", requires_approval=True), step("b", "a"))
    denied = state.resolve(approval_of(asked, "a"), ApprovalStatus.REJECTED, "no", at(1))
    assert (status(state, "a"), status(state, "b")) == ("rejected", "skipped")
    assert state.subtasks["a"].error == "approval rejected: no"
    assert of(denied, PlanCompleted)[0].status == "failed"


def test_an_expired_approval_resolves_as_timeout_on_the_clock() -> None:
    state, asked = new_plan(step("a", requires_approval=True))
    changes = state.due_work([approval_of(asked, "a")], at(601))
    assert of(changes, ApprovalResolved)[0].status == "timeout"
    assert status(state, "a") == "rejected" and changes.timeouts == {"approval": 1}


def test_a_plan_needing_approval_waits_and_its_roots_go_out_once_approved() -> None:
    state, asked = new_plan(step("a"), step("b", "a"), requires_approval=True)
    assert ready_ids(asked) == [] and approval_of(asked, None).type == "plan"
    approved = state.resolve(approval_of(asked, None), ApprovalStatus.APPROVED, None, at(1))
    assert state.plan.status == PlanStatus.RUNNING and approved.plan
    assert ready_ids(approved) == ["a"]


def test_a_rejected_plan_skips_everything_and_fails() -> None:
    state, asked = new_plan(step("a"), step("b", "a"), requires_approval=True)
    rejected = state.resolve(approval_of(asked, None), ApprovalStatus.REJECTED, None, at(1))
    assert {s.status for s in state.subtasks.values()} == {"skipped"}
    assert of(rejected, PlanCompleted)[0].status == "failed"


# --- dismissals and reassignment ----------------------------------------------------------


def test_a_dismissed_models_waiting_work_moves_to_the_fallback_agent() -> None:
    rules = Rules(RULES.retry, "fallback/model", 600.0, RULES.event_max_bytes)
    state, _ = new_plan(
        step("a"),
        step("b", "a"),
        step("c", agent="m2"),
        step("r"),
        step("w", requires_approval=True),
        rules=rules,
    )
    state.report([broke("r")], at(1))
    assert (status(state, "r"), status(state, "w")) == ("retrying", "awaiting_approval")
    changes = state.dismiss(["m1"], at(1))
    for waiting in "brw":  # pending, retrying, awaiting its approval
        assert state.subtasks[waiting].agent == "fallback/model", waiting
    assert state.subtasks["a"].agent == "m1"  # already sent: the agent keeps it
    assert state.subtasks["c"].agent == "m2" and changes.plan  # written: the state rests on it
    assert of(state.report([done("a")], at(2)), SubtaskReady)[0].agent == "fallback/model"
    assert of(state.due_work([], at(10)), SubtaskReady)[0].agent == "fallback/model"


def test_without_a_fallback_a_dismissed_models_work_is_held_until_reassigned() -> None:
    state, asked = new_plan(step("a"), step("b", "a"), step("c", requires_approval=True))
    state.dismiss(["m1"], at(1))
    assert status(state, "b") == "held"
    assert "model m1 was dismissed from session chat-1" in (state.subtasks["b"].error or "")
    assert status(state, "c") == "awaiting_approval"  # asked already: held once approved
    assert ready_ids(state.report([done("a")], at(2))) == []  # b is held
    granted = state.resolve(approval_of(asked, "c"), ApprovalStatus.APPROVED, None, at(3))
    assert ready_ids(granted) == [] and status(state, "c") == "held"
    assert ready_ids(state.assign("b", "m2", approved=False, now=at(4))) == ["b"]
    assert ready_ids(state.assign("c", "m2", approved=True, now=at(4))) == ["c"]
    assert state.subtasks["b"].agent == state.subtasks["c"].agent == "m2"
    with pytest.raises(Conflict):
        state.assign("b", "m3", approved=False, now=at(5))  # dispatched already
    with pytest.raises(NotFound):
        state.assign("nope", "m3", approved=False, now=at(5))


def test_a_subtask_whose_model_was_dismissed_before_its_dispatch_is_held() -> None:
    state, changes = new_plan(step("a"), step("b"), dismissed=["m1"])
    assert ready_ids(changes) == []
    assert (status(state, "a"), status(state, "b")) == ("held", "held")


# --- cancelling ---------------------------------------------------------------------------


def test_cancelling_ends_open_subtasks_and_rejects_pending_approvals() -> None:
    state, asked = new_plan(step("a"), step("b", requires_approval=True), step("c", "a"))
    state.report([done("a")], at(1))
    changes = state.cancel([approval_of(asked, "b")], at(2))
    assert [status(state, s) for s in "abc"] == ["completed", "cancelled", "cancelled"]
    assert of(changes, ApprovalResolved)[0].status == "rejected"
    assert of(changes, PlanCompleted)[0].status == "cancelled"
    assert state.cancel([], at(3)).events == []  # cancelling again changes nothing


def test_a_finished_plan_cannot_be_cancelled() -> None:
    state, _ = new_plan(step("a"))
    state.report([done("a")], at(1))
    with pytest.raises(Conflict):
        state.cancel([], at(2))
