"""planner: the one place its parts are put together."""

from __future__ import annotations

from pathlib import Path

from contracts.events import ModelDismissed, SubtaskCompleted, SubtaskFailed, SubtaskStarted
from services.planner import api
from services.planner.config import PlannerSettings
from services.planner.handlers import Planner
from services.runtime.consumer import Consumer
from services.runtime.service import ServiceSpec


def build(settings: PlannerSettings | None = None) -> ServiceSpec[PlannerSettings]:
    settings = settings or PlannerSettings()
    planner = Planner(settings)
    batch = settings.planner_batch_size
    return ServiceSpec(
        name="planner",
        settings=settings,
        description="Execution plans of subtasks with dependencies: dispatch, lifecycle, "
        "retries, timeouts, approvals, plan metrics.",
        migrations=Path(__file__).parent / "migrations",
        consumers=[
            # batches are safe: every decision is taken under the plan's row lock, and the
            # state machine ignores duplicates, stale attempts and late reports
            Consumer("planner-subtask-started", SubtaskStarted, planner.on_subtask_started, batch),
            Consumer(
                "planner-subtask-completed",
                SubtaskCompleted,
                planner.on_subtask_completed,
                batch,
            ),
            Consumer("planner-subtask-failed", SubtaskFailed, planner.on_subtask_failed, batch),
            Consumer("planner-model-dismissed", ModelDismissed, planner.on_model_dismissed, batch),
        ],
        routers=[api.build_router(planner)],
        tasks=[planner.timers],
    )
