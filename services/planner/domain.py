"""Pure decisions of planner about single subtasks and the graph: statuses, the records
(plan, subtask, approval), the DAG (validation, readiness, skips, critical path), the
lifecycle of a subtask (a state machine that only moves forward), retries, routing around
dismissed models, and plan metrics. No I/O; every clock reading comes in as `now`.
Decisions about a whole plan, built from these, are `plan.PlanState`'s."""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from services.runtime.faults import backoff_seconds

# --- statuses ----------------------------------------------------------------------------
# Written here once: the API's schemas, the SQL in db.py and the migrations' CHECK
# constraints (a unit test compares them) take them from these.


class SubtaskStatus(StrEnum):
    PENDING = "pending"  # waiting for its dependencies
    AWAITING_APPROVAL = "awaiting_approval"  # dependencies done, waiting for a person
    HELD = "held"  # its agent was dismissed from the session and no fallback is configured
    READY = "ready"  # subtask.ready sent for the current attempt, not started yet
    RUNNING = "running"
    RETRYING = "retrying"  # an attempt failed; the next one is due at next_attempt_at
    COMPLETED = "completed"
    FAILED = "failed"  # the last attempt failed
    REJECTED = "rejected"  # its approval was rejected or timed out
    SKIPPED = "skipped"  # a dependency failed, was rejected or cancelled
    CANCELLED = "cancelled"


class PlanStatus(StrEnum):
    AWAITING_APPROVAL = "awaiting_approval"  # the plan as a whole waits for a person
    RUNNING = "running"
    COMPLETED = "completed"  # every subtask completed
    FAILED = "failed"  # every subtask finished, some did not complete
    CANCELLED = "cancelled"


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    TIMEOUT = "timeout"  # not answered by its expires_at: counts as rejected


# the subtask statuses by their short names, as the code reads them
PENDING: Final = SubtaskStatus.PENDING
AWAITING_APPROVAL: Final = SubtaskStatus.AWAITING_APPROVAL
HELD: Final = SubtaskStatus.HELD
READY: Final = SubtaskStatus.READY
RUNNING: Final = SubtaskStatus.RUNNING
RETRYING: Final = SubtaskStatus.RETRYING
COMPLETED: Final = SubtaskStatus.COMPLETED
FAILED: Final = SubtaskStatus.FAILED
REJECTED: Final = SubtaskStatus.REJECTED
SKIPPED: Final = SubtaskStatus.SKIPPED
CANCELLED: Final = SubtaskStatus.CANCELLED

TERMINAL = frozenset({COMPLETED, FAILED, REJECTED, SKIPPED, CANCELLED})
DEAD_ENDS = frozenset({FAILED, REJECTED, SKIPPED, CANCELLED})  # dependents can never run
DISPATCHED = frozenset({READY, RUNNING})  # an agent may be working on it: it has a deadline
NOT_SENT = frozenset({PENDING, AWAITING_APPROVAL, RETRYING})  # may go to another agent

PLAN_TERMINAL = frozenset({PlanStatus.COMPLETED, PlanStatus.FAILED, PlanStatus.CANCELLED})

# --- requests ----------------------------------------------------------------------------


class SubtaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    subtask_id: str = Field(min_length=1, max_length=512)
    description: str = Field(max_length=100_000)
    agent: str = Field(min_length=1, max_length=512, description="Agent (model) that does it.")
    estimated_time: str | None = Field(None, max_length=100, examples=["5m", "10 minutes"])
    depends_on: list[str] = Field(
        default_factory=list,
        max_length=1000,
        validation_alias=AliasChoices("depends_on", "dependencies"),
        description="Ids of the subtasks this one needs (also accepted as `dependencies`).",
    )
    sequence_number: int | None = Field(  # an integer column
        None, ge=-(2**31), le=2**31 - 1, description="Defaults to the position, from 1."
    )
    requires_approval: bool = Field(
        False, description="Ask for an approval (type `tool`) before it is dispatched."
    )
    max_attempts: int | None = Field(None, ge=1, le=100)
    timeout_s: float | None = Field(None, gt=0, le=7 * 86400)


class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str = Field(min_length=1, max_length=512, description="Unique: one plan per task.")
    user_id: str = Field(min_length=1, max_length=512)
    session_id: str = Field(min_length=1, max_length=512)
    original_task: str = Field(max_length=200_000)
    plan_id: str | None = Field(
        None, min_length=1, max_length=100, description="Generated if absent."
    )
    requires_approval: bool = Field(
        False, description="The plan as a whole waits for an approval (type `plan`)."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Free-form JSON: at most 64 KiB and 16 levels deep."
    )
    subtasks: list[SubtaskRequest] = Field(min_length=1)

    def fingerprint(self) -> str:
        """The same request posted again has the same fingerprint (the plan id aside, which
        a retry without one would generate anew)."""
        body = self.model_dump_json(exclude={"plan_id"})
        return hashlib.sha256(body.encode()).hexdigest()


# --- validation --------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    kind: Literal["duplicate", "unknown_dependency", "cycle", "too_many"]
    subtask_ids: tuple[str, ...]
    message: str


def validate(subtasks: Sequence[tuple[str, Sequence[str]]], max_subtasks: int) -> list[Problem]:
    """What makes a list of (subtask id, dependency ids) not a plan: too many subtasks,
    duplicate ids, dependencies on unknown ids, cycles (each reported as the cycle itself)."""
    if len(subtasks) > max_subtasks:
        return [
            Problem("too_many", (), f"{len(subtasks)} subtasks; at most {max_subtasks} per plan")
        ]
    problems: list[Problem] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for sid, _ in subtasks:
        if sid in seen and sid not in duplicates:
            duplicates.append(sid)
        seen.add(sid)
    if duplicates:
        problems.append(
            Problem(
                "duplicate", tuple(duplicates), f"duplicate subtask ids: {', '.join(duplicates)}"
            )
        )
    for sid, deps in subtasks:
        unknown = [d for d in dict.fromkeys(deps) if d not in seen]
        if unknown:
            problems.append(
                Problem(
                    "unknown_dependency",
                    (sid, *unknown),
                    f"subtask {sid} depends on unknown {', '.join(unknown)}",
                )
            )
    graph: dict[str, list[str]] = {}
    for sid, deps in subtasks:
        graph.setdefault(sid, []).extend(d for d in deps if d in seen)
    for cycle in find_cycles(graph):
        problems.append(
            Problem("cycle", tuple(cycle), "dependency cycle: " + " -> ".join([*cycle, cycle[0]]))
        )
    return problems


def find_cycles(deps: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component that has one, each listed in
    dependency order (a depends on b depends on ... depends on a). Iterative: plans may be
    deep enough to overflow Python's recursion."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in deps:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            children = deps.get(node, ())
            if i < len(children):
                work.append((node, i + 1))
                child = children[i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in deps.get(node, ()):
                    components.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return [_cycle_in(deps, set(c)) for c in components]


def _cycle_in(deps: Mapping[str, Sequence[str]], component: set[str]) -> list[str]:
    """Walk inside a strongly connected component until a node repeats: that is a cycle."""
    start = min(component)
    path: list[str] = []
    position: dict[str, int] = {}
    node = start
    while node not in position:
        position[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in component)
    return path[position[node] :]


# --- the graph at run time ---------------------------------------------------------------


def roots(deps: Mapping[str, Sequence[str]]) -> list[str]:
    return [sid for sid, d in deps.items() if not d]


def newly_ready(
    deps: Mapping[str, Sequence[str]], status: Mapping[str, str], candidates: Iterable[str]
) -> list[str]:
    """The candidates that may be dispatched now: pending, every dependency completed."""
    return [
        c
        for c in dict.fromkeys(candidates)
        if status.get(c) == PENDING and all(status.get(d) == COMPLETED for d in deps.get(c, ()))
    ]


def dependents_of(deps: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    reverse: dict[str, list[str]] = defaultdict(list)
    for sid, ds in deps.items():
        for d in ds:
            reverse[d].append(sid)
    return reverse


def to_skip(
    deps: Mapping[str, Sequence[str]], status: Mapping[str, str], dead: Iterable[str]
) -> dict[str, str]:
    """Every subtask that depends, directly or not, on a dead one and has not finished (it
    can never run), with the dead one it waits on."""
    reverse = dependents_of(deps)
    found: dict[str, str] = {}
    seen: set[str] = set()
    queue = deque((d, d) for d in dead)
    while queue:
        node, cause = queue.popleft()
        for child in reverse.get(node, ()):
            if child in seen:
                continue
            seen.add(child)
            queue.append((child, cause))
            if status.get(child) not in TERMINAL:
                found[child] = cause
    return found


def topological_order(deps: Mapping[str, Sequence[str]]) -> list[str]:
    remaining = {sid: len(ds) for sid, ds in deps.items()}
    reverse = dependents_of(deps)
    queue = deque(sid for sid, n in remaining.items() if n == 0)
    order: list[str] = []
    while queue:
        sid = queue.popleft()
        order.append(sid)
        for child in reverse.get(sid, ()):
            remaining[child] -= 1
            if remaining[child] == 0:
                queue.append(child)
    return order


def critical_path(
    deps: Mapping[str, Sequence[str]], seconds: Mapping[str, float]
) -> tuple[list[str], float]:
    """The chain of dependencies with the largest sum of durations, and that sum."""
    best: dict[str, float] = {}
    previous: dict[str, str | None] = {}
    for sid in topological_order(deps):
        before = max(deps.get(sid, ()), key=lambda d: best[d], default=None)
        best[sid] = seconds.get(sid, 0.0) + (best[before] if before is not None else 0.0)
        previous[sid] = before
    if not best:
        return [], 0.0
    last = max(best, key=lambda s: best[s])
    path: list[str] = []
    node: str | None = last
    while node is not None:
        path.append(node)
        node = previous[node]
    return path[::-1], best[last]


# --- estimated times ---------------------------------------------------------------------

_UNITS: dict[str, float] = {}
for _names, _seconds in (
    # Russian units too: the plans come from Russian-speaking users as often as not
    (("s", "sec", "secs", "second", "seconds", "с", "сек", "секунд", "секунды", "секунда"), 1),  # noqa: RUF001
    (("m", "min", "mins", "minute", "minutes", "м", "мин", "минут", "минуты", "минута"), 60),
    (("h", "hr", "hrs", "hour", "hours", "ч", "час", "часа", "часов"), 3600),
    (("d", "day", "days", "д", "день", "дня", "дней"), 86400),
):
    for _name in _names:
        _UNITS[_name] = _seconds

_NUMBER = r"\d+(?:[.,]\d+)?"
_PART = re.compile(rf"({_NUMBER})(?:\s*(?:-|–|to|до)\s*({_NUMBER}))?\s*([a-zа-яё]+)\.?")  # noqa: RUF001
_ISO = re.compile(
    r"p(?:(\d+(?:\.\d+)?)d)?(?:t(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?)?"
)
_CLOCK = re.compile(r"(\d+):([0-5]\d)(?::([0-5]\d))?")
_FILLER = re.compile(
    r"^(?:~|≈|about|approx\.?|approximately|around|roughly|около|примерно|and|и|,|\+|\s)*$"
)


def parse_duration(text: str | None) -> float | None:
    """Seconds in an estimate such as "5m", "30s", "2h", "10 minutes", "1h 30m", "2-3 min",
    "~1.5 hours", "PT5M", "1:30" (h:mm) or "5 минут"; None when it cannot be read."""
    if not text:
        return None
    s = text.strip().lower()
    if not s:
        return None
    iso = _ISO.fullmatch(s)
    if iso and any(iso.groups()):
        d, h, m, sec = (float(g) if g else 0.0 for g in iso.groups())
        return d * 86400 + h * 3600 + m * 60 + sec
    clock = _CLOCK.fullmatch(s)
    if clock:
        h, m, sec = int(clock[1]), int(clock[2]), int(clock[3] or 0)
        return float(h * 3600 + m * 60 + sec)
    total = 0.0
    found = False
    rest_start = 0
    leftovers: list[str] = []
    for match in _PART.finditer(s):
        unit = _UNITS.get(match[3])
        if unit is None:
            return None
        leftovers.append(s[rest_start : match.start()])
        rest_start = match.end()
        low = float(match[1].replace(",", "."))
        high = float(match[2].replace(",", ".")) if match[2] else low
        total += (low + high) / 2 * unit
        found = True
    leftovers.append(s[rest_start:])
    if not found or not all(_FILLER.match(part) for part in leftovers):
        return None
    return total if math.isfinite(total) else None


# --- the records: a plan, a subtask, an approval ------------------------------------------


@dataclass(frozen=True)
class Plan:
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
    fingerprint: str
    revision: int  # a fresh value of a sequence at every write of the plan or its subtasks


@dataclass(frozen=True)
class Approval:
    approval_id: uuid.UUID
    user_id: str
    session_id: str | None
    plan_id: str
    subtask_id: str | None  # None: the approval of the whole plan
    type: Literal["tool", "plan"]
    payload: dict[str, Any]
    status: ApprovalStatus
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None
    decision: str | None


# --- the lifecycle of a subtask ----------------------------------------------------------


@dataclass(frozen=True)
class Subtask:
    plan_id: str
    subtask_id: str
    sequence_number: int
    description: str
    agent: str
    estimated_time: str | None
    status: SubtaskStatus
    dependencies: tuple[str, ...]
    attempt: int  # attempts dispatched so far; events of another attempt are stale
    max_attempts: int
    timeout_s: float
    requires_approval: bool
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_seconds: float | None = None
    result: str | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    deadline_at: datetime | None = None
    ready_at: datetime | None = None

    def but(self, **changes: Any) -> Subtask:
        """A copy with `changes`, like `dataclasses.replace` at a fifth of its cost (which
        runs `__init__` again, setting twenty frozen fields one by one): every agent's
        report copies a subtask or two."""
        if not changes.keys() <= self.__dict__.keys():
            raise TypeError(f"Subtask has no field {sorted(changes.keys() - self.__dict__)}")
        copy = object.__new__(Subtask)
        copy.__dict__.update(self.__dict__, **changes)
        return copy


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float
    cap_s: float

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt `failed_attempt` (1-based) failed: base, 2*base,
        4*base, ... up to the cap (the project's one backoff formula)."""
        return backoff_seconds(failed_attempt, self.base_s, self.cap_s)

    def schedule(self, max_attempts: int) -> list[float]:
        return [self.delay(a) for a in range(1, max_attempts)]


def _duration(started: datetime | None, completed: datetime | None) -> float | None:
    if started is None or completed is None:
        return None
    return max(0.0, (completed - started).total_seconds())


def started(s: Subtask, attempt: int, started_at: datetime, now: datetime) -> Subtask | None:
    """An agent began attempt `attempt`. Only the current attempt counts; a start that
    arrives after the completion only fills in the start time."""
    if attempt != s.attempt:
        return None
    if s.status == READY:
        return s.but(status=RUNNING, started_at=started_at, deadline_at=_after(now, s.timeout_s))
    if s.status == COMPLETED and s.started_at is None:
        duration = s.duration_seconds
        if duration is None:
            duration = _duration(started_at, s.completed_at)
        return s.but(started_at=started_at, duration_seconds=duration)
    return None


def completed(
    s: Subtask,
    attempt: int,
    completed_at: datetime,
    *,
    started_at: datetime | None = None,
    duration_seconds: float | None = None,
    result: str | None = None,
) -> Subtask | None:
    """An agent finished attempt `attempt`. Accepted while that attempt may be in flight,
    and also after it was given up on (timed out) but before the next attempt went out:
    the work is done, so there is nothing to retry."""
    if attempt != s.attempt or s.status not in (READY, RUNNING, RETRYING):
        return None
    start = s.started_at if s.status != RETRYING else None
    start = start or started_at
    if duration_seconds is None:
        duration_seconds = _duration(start, completed_at)
    return s.but(
        status=COMPLETED,
        started_at=start,
        completed_at=completed_at,
        duration_seconds=duration_seconds,
        result=result,
        error=None,
        next_attempt_at=None,
        deadline_at=None,
    )


def failed(
    s: Subtask, attempt: int, error: str, retryable: bool, now: datetime, policy: RetryPolicy
) -> Subtask | None:
    """An agent gave up on attempt `attempt`: retry after a backoff while attempts remain."""
    if attempt != s.attempt or s.status not in DISPATCHED:
        return None
    return give_up_attempt(s, error, retryable, now, policy)


def timed_out(s: Subtask, now: datetime, policy: RetryPolicy) -> Subtask | None:
    """The current attempt is past its deadline: it counts as failed (the agent may have
    died), so nothing stays running forever."""
    if s.status not in DISPATCHED or s.deadline_at is None or s.deadline_at > now:
        return None
    where = "running" if s.status == RUNNING else "dispatched and not started"
    error = f"timed out: {where} for more than {s.timeout_s:g}s (attempt {s.attempt})"
    return give_up_attempt(s, error, True, now, policy)


def give_up_attempt(
    s: Subtask, error: str, retryable: bool, now: datetime, policy: RetryPolicy
) -> Subtask:
    if retryable and s.attempt < s.max_attempts:
        return s.but(
            status=RETRYING,
            error=error,
            deadline_at=None,
            next_attempt_at=_after(now, policy.delay(s.attempt)),
        )
    return s.but(
        status=FAILED, error=error, completed_at=now, deadline_at=None, next_attempt_at=None
    )


def route(agent: str, dismissed: Iterable[str], fallback: str | None) -> str | None:
    """The agent to dispatch to: the planned one unless it was dismissed from the session,
    then the fallback (unless dismissed too); None when the subtask must be held."""
    gone = set(dismissed)
    if agent not in gone:
        return agent
    if fallback and fallback not in gone:
        return fallback
    return None


def dispatch(s: Subtask, agent: str, now: datetime) -> Subtask:
    """The next attempt goes out to `agent`; it must start and finish before the deadline."""
    return s.but(
        status=READY,
        agent=agent,
        attempt=s.attempt + 1,
        started_at=None,
        completed_at=None,
        duration_seconds=None,
        ready_at=now,
        next_attempt_at=None,
        deadline_at=_after(now, s.timeout_s),
    )


def finish(s: Subtask, status: SubtaskStatus, error: str | None, now: datetime) -> Subtask:
    """Skipped, rejected or cancelled: it will not run."""
    return s.but(
        status=status,
        error=error if error is not None else s.error,
        completed_at=s.completed_at or now,
        next_attempt_at=None,
        deadline_at=None,
    )


def _after(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)


def plan_outcome(statuses: Iterable[str]) -> PlanStatus | None:
    """completed when every subtask completed, failed when every one finished and some did
    not complete, None while something may still run."""
    seen = set(statuses)
    if not seen <= TERMINAL:
        return None
    return PlanStatus.COMPLETED if seen <= {COMPLETED} else PlanStatus.FAILED


# --- identities --------------------------------------------------------------------------

NAMESPACE = uuid.UUID("6f1c2d7e-5b0a-4c55-9a43-1d7d1f0e8a21")


def derived_id(*parts: object) -> uuid.UUID:
    """The id of an event or approval that follows from a state change: the same change
    retried yields the same id, so the outbox and JetStream drop the copy."""
    return uuid.uuid5(NAMESPACE, "\x1f".join(str(p) for p in parts))


def approval_id(plan_id: str, subtask_id: str | None) -> uuid.UUID:
    return derived_id("approval", plan_id, subtask_id or "")


# --- metrics -----------------------------------------------------------------------------

CRITICAL_PATH_IDS_MAX = 1000  # ids listed in plan.completed; the length is always exact


def metrics(
    subtasks: Sequence[Subtask],
    created_at: datetime,
    completed_at: datetime | None,
    now: datetime,
) -> dict[str, Any]:
    """Durations in total and per agent, counts by status, estimated versus actual, attempts
    and the critical path (actual durations where a subtask ran, estimates elsewhere)."""
    by_status = {st.value: 0 for st in SubtaskStatus}
    per_agent: dict[str, dict[str, Any]] = {}
    estimated_total = actual_total = 0.0
    compared_estimated = compared_actual = 0.0
    compared = unparsed = 0
    weights: dict[str, float] = {}
    basis: set[str] = set()
    for s in subtasks:
        by_status[s.status] += 1
        estimate = parse_duration(s.estimated_time)
        if s.estimated_time and estimate is None:
            unparsed += 1
        agent = per_agent.setdefault(
            s.agent,
            {"subtasks": 0, "completed": 0, "actual_seconds": 0.0, "estimated_seconds": 0.0},
        )
        agent["subtasks"] += 1
        agent["completed"] += s.status == COMPLETED
        if estimate is not None:
            estimated_total += estimate
            agent["estimated_seconds"] += estimate
        if s.duration_seconds is not None:
            actual_total += s.duration_seconds
            agent["actual_seconds"] += s.duration_seconds
            if estimate is not None:
                compared += 1
                compared_estimated += estimate
                compared_actual += s.duration_seconds
        if s.duration_seconds is not None:
            weights[s.subtask_id] = s.duration_seconds
            basis.add("actual")
        elif estimate is not None:
            weights[s.subtask_id] = estimate
            basis.add("estimated")
    path, path_seconds = critical_path({s.subtask_id: s.dependencies for s in subtasks}, weights)
    end = completed_at or now
    return {
        "subtask_count": len(subtasks),
        "by_status": {k: v for k, v in by_status.items() if v},
        "wall_seconds": round(max(0.0, (end - created_at).total_seconds()), 6),
        "busy_seconds": round(actual_total, 6),
        "per_agent": {
            name: {**a, "actual_seconds": round(a["actual_seconds"], 6)}
            for name, a in sorted(per_agent.items())
        },
        "estimated_vs_actual": {
            "estimated_seconds": round(estimated_total, 6),
            "actual_seconds": round(actual_total, 6),
            "compared_subtasks": compared,
            "compared_estimated_seconds": round(compared_estimated, 6),
            "compared_actual_seconds": round(compared_actual, 6),
            "actual_to_estimated": (
                round(compared_actual / compared_estimated, 4) if compared_estimated > 0 else None
            ),
            "unparsed_estimates": unparsed,
        },
        "attempts": sum(s.attempt for s in subtasks),
        "retries": sum(max(0, s.attempt - 1) for s in subtasks),
        "critical_path": {
            "seconds": round(path_seconds, 6),
            "length": len(path),
            "subtask_ids": path[:CRITICAL_PATH_IDS_MAX],
            "basis": "+".join(sorted(basis)) or "none",
        },
    }
