from __future__ import annotations

from pydantic import Field

from services.runtime.config import RuntimeSettings


class PlannerSettings(RuntimeSettings):
    http_port: int = 8103
    planner_max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts of a subtask unless its plan says otherwise."
    )
    planner_retry_base_s: float = Field(
        2.0, gt=0, description="Wait after a first failed attempt; doubles with each next one."
    )
    planner_retry_max_s: float = Field(300.0, gt=0, description="Longest wait between attempts.")
    planner_default_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Seconds an attempt may stay dispatched or running before it counts as "
        "failed, unless the subtask says otherwise.",
    )
    planner_approval_timeout_s: float = Field(
        3600.0, gt=0, description="An approval not answered by then resolves as `timeout`."
    )
    planner_fallback_agent: str | None = Field(
        None,
        description="Agent that takes over the subtasks of a model dismissed from a session; "
        "unset: those subtasks are held.",
    )
    planner_tick_s: float = Field(
        0.25, gt=0, description="How often deadlines, due retries and approvals are checked."
    )
    planner_batch_size: int = Field(
        200, ge=1, le=5000, description="Agent events applied per transaction at most."
    )
    planner_cached_plans: int = Field(
        256,
        ge=1,
        description="Plans whose state (every subtask) is kept in memory between events; "
        "the least recently used beyond this are read again when next needed.",
    )
    planner_max_subtasks: int = Field(20_000, ge=1, description="Subtasks per plan at most.")
    planner_event_max_bytes: int = Field(
        512 * 1024,
        ge=16 * 1024,
        description="plan.created lists only the subtasks that fit in this many bytes "
        "(NATS refuses messages over its max_payload, 1 MiB by default).",
    )
