"""The planner's pure decisions: the DAG, the lifecycle of a subtask, estimates, metrics."""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.planner import domain
from services.planner.domain import (
    AWAITING_APPROVAL,
    COMPLETED,
    FAILED,
    PENDING,
    READY,
    REJECTED,
    RETRYING,
    RUNNING,
    SKIPPED,
    PlanStatus,
    RetryPolicy,
    Subtask,
)

T0 = datetime(2026, 4, 2, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_s=2.0, cap_s=10.0)
DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def subtask(sid: str = "a", **fields: object) -> Subtask:
    base = Subtask(
        plan_id="p",
        subtask_id=sid,
        sequence_number=1,
        description="do it",
        agent="openai/gpt-4o",
        estimated_time=None,
        status=PENDING,
        dependencies=(),
        attempt=0,
        max_attempts=3,
        timeout_s=60.0,
        requires_approval=False,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


# --- validation --------------------------------------------------------------------------


def problems(graph: dict[str, list[str]]) -> list[domain.Problem]:
    return domain.validate(list(graph.items()), max_subtasks=100)


def test_a_valid_dag_has_no_problems() -> None:
    assert problems(DIAMOND) == []


def test_duplicate_ids_are_named() -> None:
    found = domain.validate([("a", []), ("b", []), ("a", []), ("b", ["a"])], max_subtasks=10)
    assert [(p.kind, p.subtask_ids) for p in found] == [("duplicate", ("a", "b"))]
    assert found[0].message == "duplicate subtask ids: a, b"


def test_unknown_dependencies_name_the_subtask_and_what_it_lacks() -> None:
    found = problems({"a": [], "b": ["a", "x", "y"]})
    assert [(p.kind, p.subtask_ids) for p in found] == [("unknown_dependency", ("b", "x", "y"))]
    assert found[0].message == "subtask b depends on unknown x, y"


def test_a_cycle_is_reported_as_the_cycle_itself() -> None:
    found = problems({"a": [], "b": ["a", "d"], "c": ["b"], "d": ["c"], "e": ["d"]})
    assert len(found) == 1 and found[0].kind == "cycle"
    cycle = found[0].subtask_ids
    assert set(cycle) == {"b", "c", "d"}
    # each depends on the next, and the last on the first
    graph = {"b": ["a", "d"], "c": ["b"], "d": ["c"]}
    for i, sid in enumerate(cycle):
        assert cycle[(i + 1) % len(cycle)] in graph[sid]
    assert found[0].message == "dependency cycle: " + " -> ".join([*cycle, cycle[0]])


def test_a_self_dependency_and_two_separate_cycles_are_each_reported() -> None:
    found = problems({"a": ["a"], "b": ["c"], "c": ["b"], "d": []})
    cycles = sorted(p.subtask_ids for p in found if p.kind == "cycle")
    assert cycles == [("a",), ("b", "c")]


def test_a_long_chain_is_validated_without_recursion_limits() -> None:
    n = 20_000
    chain = [(f"s{i}", [f"s{i - 1}"] if i else []) for i in range(n)]
    assert domain.validate(chain, max_subtasks=n) == []
    chain[0] = ("s0", [f"s{n - 1}"])
    (cycle,) = domain.validate(chain, max_subtasks=n)
    assert cycle.kind == "cycle" and len(cycle.subtask_ids) == n


def test_too_many_subtasks_are_refused() -> None:
    (found,) = domain.validate([(f"s{i}", []) for i in range(11)], max_subtasks=10)
    assert found.kind == "too_many"


# --- readiness, skips, critical path -----------------------------------------------------


def test_readiness_waits_for_every_dependency() -> None:
    assert domain.roots(DIAMOND) == ["a"]
    status = {"a": COMPLETED, "b": COMPLETED, "c": RUNNING, "d": PENDING}
    assert domain.newly_ready(DIAMOND, status, ["b", "c", "d"]) == []
    status["c"] = COMPLETED
    assert domain.newly_ready(DIAMOND, status, ["d"]) == ["d"]
    status["d"] = READY  # already dispatched: not again
    assert domain.newly_ready(DIAMOND, status, ["d"]) == []


def test_dependents_of_a_dead_end_are_skipped_transitively_with_their_cause() -> None:
    graph = {"a": [], "b": ["a"], "c": ["b"], "d": [], "e": ["d", "c"], "f": ["d"]}
    status = {"a": FAILED, "b": PENDING, "c": PENDING, "d": COMPLETED, "e": PENDING, "f": READY}
    assert domain.to_skip(graph, status, ["a"]) == {"b": "a", "c": "a", "e": "a"}


def test_finished_dependents_are_not_skipped() -> None:
    status = {"a": FAILED, "b": COMPLETED, "c": PENDING, "d": PENDING}
    assert domain.to_skip(DIAMOND, status, ["a"]) == {"c": "a", "d": "a"}


def test_the_critical_path_is_the_heaviest_chain() -> None:
    path, seconds = domain.critical_path(DIAMOND, {"a": 1, "b": 5, "c": 2, "d": 1})
    assert (path, seconds) == (["a", "b", "d"], 7)
    path, seconds = domain.critical_path(DIAMOND, {"a": 1, "b": 5, "c": 9, "d": 1})
    assert (path, seconds) == (["a", "c", "d"], 11)
    assert domain.critical_path({}, {}) == ([], 0.0)


def test_the_critical_path_agrees_with_brute_force_on_random_dags() -> None:
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(1, 9)
        graph = {f"s{i}": [f"s{j}" for j in range(i) if rng.random() < 0.4] for i in range(n)}
        weight = {sid: float(rng.randint(0, 9)) for sid in graph}

        def heaviest(sid: str, graph: dict[str, list[str]], weight: dict[str, float]) -> float:
            return weight[sid] + max((heaviest(d, graph, weight) for d in graph[sid]), default=0)

        path, seconds = domain.critical_path(graph, weight)
        assert seconds == max(heaviest(s, graph, weight) for s in graph)
        assert sum(weight[s] for s in path) == seconds
        for before, after in itertools.pairwise(path):
            assert before in graph[after]


# --- estimated times ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("30s", 30),
        ("2h", 7200),
        ("10 minutes", 600),
        ("1 minute", 60),
        ("1h 30m", 5400),
        ("1h30m", 5400),
        ("1 hour and 30 minutes", 5400),
        ("1.5 hours", 5400),
        ("2-3 min", 150),
        ("2 to 4 hours", 10800),
        ("~5 min.", 300),
        ("about 45 seconds", 45),
        ("  15 MIN ", 900),
        ("PT5M", 300),
        ("PT1H30M", 5400),
        ("1:30", 5400),
        ("5 минут", 300),
        ("1,5 часа", 5400),
        ("1 day", 86400),
    ],
)
def test_estimates_are_read(text: str, seconds: float) -> None:
    assert domain.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", [None, "", "   ", "soon", "5", "5 parsecs", "a few minutes", "5 minutes or so", "P"]
)
def test_unreadable_estimates_are_none(text: str | None) -> None:
    assert domain.parse_duration(text) is None


# --- the lifecycle -----------------------------------------------------------------------


def test_a_copy_with_changes_is_what_replace_gives_and_leaves_the_original() -> None:
    s = subtask(status=READY, attempt=1)
    copy = s.but(status=COMPLETED, result="ok")
    assert copy == replace(s, status=COMPLETED, result="ok")
    assert (s.status, s.result) == (READY, None)
    with pytest.raises(TypeError, match="statuss"):
        s.but(statuss=COMPLETED)


def dispatched(**fields: object) -> Subtask:
    return domain.dispatch(subtask("a", **fields), "openai/gpt-4o", T0)


def test_dispatch_starts_the_next_attempt_with_a_deadline() -> None:
    s = dispatched()
    assert (s.status, s.attempt, s.deadline_at, s.ready_at) == (READY, 1, at(60), T0)


def test_started_then_completed() -> None:
    s = domain.started(dispatched(), 1, at(1), now=at(2))
    assert s is not None
    assert (s.status, s.started_at, s.deadline_at) == (RUNNING, at(1), at(62))
    done = domain.completed(s, 1, at(11), result="ok")
    assert done is not None
    assert (done.status, done.duration_seconds, done.result, done.deadline_at) == (
        COMPLETED,
        10.0,
        "ok",
        None,
    )


def test_completed_before_started_ends_completed_and_the_start_fills_in() -> None:
    done = domain.completed(dispatched(), 1, at(11))
    assert done is not None and done.status == COMPLETED and done.duration_seconds is None
    late = domain.started(done, 1, at(1), now=at(12))
    assert late is not None
    assert (late.status, late.started_at, late.duration_seconds) == (COMPLETED, at(1), 10.0)
    assert domain.started(late, 1, at(1), now=at(12)) is None  # and only once


def test_duplicates_change_nothing() -> None:
    done = domain.completed(dispatched(), 1, at(5), duration_seconds=4.0)
    assert done is not None
    assert domain.completed(done, 1, at(6)) is None
    assert domain.failed(done, 1, "late", True, at(7), POLICY) is None


def test_reports_of_another_attempt_are_ignored() -> None:
    s = replace(dispatched(), attempt=2)
    assert domain.started(s, 1, at(1), now=at(1)) is None
    assert domain.completed(s, 1, at(1)) is None
    assert domain.failed(s, 1, "old", True, at(1), POLICY) is None
    assert domain.completed(s, 3, at(1)) is None  # never dispatched


def test_failures_retry_with_exponential_backoff_then_fail() -> None:
    assert POLICY.schedule(5) == [2.0, 4.0, 8.0, 10.0]
    s = dispatched(max_attempts=3)
    waits = []
    for attempt in (1, 2):
        s = domain.failed(s, attempt, "boom", True, T0, POLICY)  # type: ignore[assignment]
        assert s.status == RETRYING and s.deadline_at is None
        assert s.next_attempt_at is not None
        waits.append((s.next_attempt_at - T0).total_seconds())
        s = domain.dispatch(s, s.agent, T0)
        assert s.attempt == attempt + 1
    assert waits == [2.0, 4.0]
    last = domain.failed(s, 3, "boom", True, T0, POLICY)
    assert last is not None and (last.status, last.error, last.next_attempt_at) == (
        FAILED,
        "boom",
        None,
    )


def test_a_failure_that_is_not_retryable_fails_at_once() -> None:
    s = domain.failed(dispatched(), 1, "bad input", False, T0, POLICY)
    assert s is not None and s.status == FAILED


def test_a_subtask_past_its_deadline_times_out_running_or_not_started() -> None:
    s = dispatched(timeout_s=5.0)
    assert domain.timed_out(s, at(4.9), POLICY) is None
    late = domain.timed_out(s, at(5), POLICY)
    assert late is not None and late.status == RETRYING
    assert late.error is not None and "not started" in late.error
    running = domain.started(s, 1, at(1), now=at(1))
    assert running is not None
    gone = domain.timed_out(replace(running, attempt=3, max_attempts=3), at(6), POLICY)
    assert gone is not None and gone.status == FAILED and "running" in (gone.error or "")


def test_a_completion_after_the_timeout_but_before_the_retry_is_accepted() -> None:
    retrying = domain.timed_out(dispatched(timeout_s=5.0), at(6), POLICY)
    assert retrying is not None
    done = domain.completed(retrying, 1, at(7), started_at=at(2))
    assert done is not None and done.status == COMPLETED and done.duration_seconds == 5.0


def test_routing_around_dismissed_models() -> None:
    assert domain.route("m1", {"m2"}, None) == "m1"
    assert domain.route("m1", {"m1"}, "fallback") == "fallback"
    assert domain.route("m1", {"m1"}, None) is None
    assert domain.route("m1", {"m1", "fallback"}, "fallback") is None


def test_plan_outcome() -> None:
    assert domain.plan_outcome([COMPLETED, COMPLETED]) == PlanStatus.COMPLETED
    assert domain.plan_outcome([COMPLETED, FAILED, SKIPPED]) == PlanStatus.FAILED
    assert domain.plan_outcome([COMPLETED, REJECTED]) == PlanStatus.FAILED
    assert domain.plan_outcome([COMPLETED, RUNNING]) is None
    assert domain.plan_outcome([COMPLETED, AWAITING_APPROVAL]) is None


def test_derived_ids_are_stable_and_distinct() -> None:
    assert domain.derived_id("subtask.ready", "p", "a", 1) == domain.derived_id(
        "subtask.ready", "p", "a", 1
    )
    assert domain.derived_id("subtask.ready", "p", "a", 1) != domain.derived_id(
        "subtask.ready", "p", "a", 2
    )


# --- metrics -----------------------------------------------------------------------------


def test_metrics_of_a_finished_plan() -> None:
    subtasks = [
        subtask("a", status=COMPLETED, estimated_time="10s", duration_seconds=12.0, attempt=1),
        subtask("b", status=COMPLETED, estimated_time="1m", duration_seconds=30.0, attempt=3,
                dependencies=("a",), agent="local/llama"),
        subtask("c", status=FAILED, estimated_time="2 minutes", dependencies=("a",), attempt=3),
        subtask("d", status=SKIPPED, estimated_time="whenever", dependencies=("b", "c")),
    ]  # fmt: skip
    m = domain.metrics(subtasks, T0, at(100), at(500))
    assert m["subtask_count"] == 4
    assert m["by_status"] == {COMPLETED: 2, FAILED: 1, SKIPPED: 1}
    assert m["wall_seconds"] == 100
    assert m["busy_seconds"] == 42
    assert m["per_agent"]["openai/gpt-4o"] == {
        "subtasks": 3,
        "completed": 1,
        "actual_seconds": 12.0,
        "estimated_seconds": 130.0,
    }
    assert m["per_agent"]["local/llama"]["actual_seconds"] == 30.0
    versus = m["estimated_vs_actual"]
    assert versus["estimated_seconds"] == 190
    assert versus["actual_seconds"] == 42
    assert versus["compared_subtasks"] == 2
    assert versus["actual_to_estimated"] == round(42 / 70, 4)
    assert versus["unparsed_estimates"] == 1
    assert (m["attempts"], m["retries"]) == (7, 4)
    # c never ran: its estimate (120s) stands in, so a -> c is the critical path
    assert m["critical_path"]["subtask_ids"] == ["a", "c"]
    assert m["critical_path"]["seconds"] == 132
    assert m["critical_path"]["basis"] == "actual+estimated"


# --- statuses ----------------------------------------------------------------------------


def _checked_statuses(table: str) -> set[str]:
    """The statuses a table's CHECK constraint allows, as the migrations wrote them."""
    sql = (Path(domain.__file__).parent / "migrations" / "0001_plans.sql").read_text()
    body = sql.split(f"CREATE TABLE {table} (", 1)[1].split(");", 1)[0]
    allowed = re.search(r"CHECK \(status IN\s*\(([^)]*)\)\)", body)
    assert allowed is not None, table
    return set(re.findall(r"'(\w+)'", allowed[1]))


def test_the_database_allows_exactly_the_statuses_of_the_domain() -> None:
    assert _checked_statuses("execution_plans") == set(domain.PlanStatus)
    assert _checked_statuses("subtask_executions") == set(domain.SubtaskStatus)
    assert _checked_statuses("approval_requests") == set(domain.ApprovalStatus)
