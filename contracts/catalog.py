"""Subjects, streams and who publishes and consumes what: the one place they are declared."""

from __future__ import annotations

from dataclasses import dataclass

from contracts import events as ev


@dataclass(frozen=True)
class StreamSpec:
    """A JetStream stream. Subjects are listed one by one, never as wildcards that could
    capture core-NATS traffic (heartbeats) or overlap another stream."""

    name: str
    subjects: tuple[str, ...]
    description: str
    max_age_days: int = 7


@dataclass(frozen=True)
class Channel:
    event: type[ev.Event]
    stream: StreamSpec | None  # None: core NATS, not stored
    producers: tuple[str, ...]
    consumers: tuple[str, ...]

    @property
    def subject(self) -> str:
        return self.event.subject


CATALOG_STREAM = StreamSpec(
    "CATALOG",
    ("model.synced", "sync.completed", "device.offline", "device.online"),
    "The model catalog and local devices (published by sync).",
)
BENCHMARK_STREAM = StreamSpec(
    "BENCHMARK",
    ("benchmark.requested", "benchmark.completed", "benchmark.failed"),
    "Benchmark jobs and their results.",
)
PLANS_STREAM = StreamSpec(
    "PLANS",
    (
        "plan.created",
        "plan.completed",
        "subtask.ready",
        "subtask.started",
        "subtask.completed",
        "subtask.failed",
        "approval.requested",
        "approval.resolved",
    ),
    "Execution plans, the lifecycle of their subtasks, approvals.",
)
FEEDBACK_STREAM = StreamSpec(
    "FEEDBACK",
    ("model.dismissed", "model.rewarded"),
    "What users say of models in their sessions.",
)
SERVICES_STREAM = StreamSpec(
    "SERVICES",
    ("service.down", "service.recovered", "service.escalated"),
    "Health transitions of the fleet's own services (heartbeats are not stored).",
)
DEAD_LETTER_PREFIX = "deadletter."
DEAD_LETTER_STREAM = StreamSpec(
    "DEADLETTER",
    (DEAD_LETTER_PREFIX + ">",),
    "Messages a consumer could not validate or apply after its redelivery limit, "
    "with the reason in headers. Kept for 30 days for inspection and replay.",
    max_age_days=30,
)

STREAMS: tuple[StreamSpec, ...] = (
    CATALOG_STREAM,
    BENCHMARK_STREAM,
    PLANS_STREAM,
    FEEDBACK_STREAM,
    SERVICES_STREAM,
    DEAD_LETTER_STREAM,
)

# The fleet's own services; orchestrators, agents and UIs outside it are named "agents",
# "orchestrator", "ui", and whatever alerts on the fleet's health "alerting".
FLEET_SERVICES = ("sync", "benchmark", "planner", "guardian", "stats")


def durable_name(service: str, subject: str) -> str:
    """The durable consumer through which a fleet service consumes a stored subject."""
    return f"{service}-{subject.replace('.', '-')}"


# A fleet service listed as a consumer of a stored subject runs the durable consumer
# `durable_name(service, subject)`, and runs no other (tests/unit/test_contracts_consumers.py
# builds every service and compares).
CHANNELS: tuple[Channel, ...] = (
    Channel(ev.ModelSynced, CATALOG_STREAM, ("sync",), ("benchmark", "stats")),
    # sync's run and device reports: for operators' dashboards and clients; no fleet
    # service consumes them
    Channel(ev.SyncCompleted, CATALOG_STREAM, ("sync",), ("ui",)),
    Channel(ev.DeviceOffline, CATALOG_STREAM, ("sync",), ("ui",)),
    Channel(ev.DeviceOnline, CATALOG_STREAM, ("sync",), ("ui",)),
    Channel(ev.BenchmarkRequested, BENCHMARK_STREAM, ("benchmark", "orchestrator"), ("benchmark",)),
    Channel(ev.BenchmarkCompleted, BENCHMARK_STREAM, ("benchmark",), ("ui",)),
    Channel(ev.BenchmarkFailed, BENCHMARK_STREAM, ("benchmark",), ("ui",)),
    Channel(ev.PlanCreated, PLANS_STREAM, ("planner",), ("agents", "ui")),
    Channel(ev.PlanCompleted, PLANS_STREAM, ("planner",), ("agents", "ui")),
    Channel(ev.SubtaskReady, PLANS_STREAM, ("planner",), ("agents",)),
    Channel(ev.SubtaskStarted, PLANS_STREAM, ("agents",), ("planner",)),
    Channel(
        ev.SubtaskCompleted,
        PLANS_STREAM,
        ("agents", "orchestrator", "guardian"),  # guardian: its smoke canary's
        ("planner", "stats"),
    ),
    Channel(ev.SubtaskFailed, PLANS_STREAM, ("agents",), ("planner",)),
    Channel(ev.ApprovalRequested, PLANS_STREAM, ("planner",), ("ui",)),
    Channel(ev.ApprovalResolved, PLANS_STREAM, ("planner",), ("ui", "agents")),
    Channel(ev.ModelDismissed, FEEDBACK_STREAM, ("ui",), ("stats", "planner")),
    Channel(ev.ModelRewarded, FEEDBACK_STREAM, ("ui",), ("stats",)),
    Channel(ev.ServiceDown, SERVICES_STREAM, ("guardian",), ("alerting",)),
    Channel(ev.ServiceRecovered, SERVICES_STREAM, ("guardian",), ("alerting",)),
    Channel(ev.ServiceEscalated, SERVICES_STREAM, ("guardian",), ("alerting",)),
    # core NATS: guardian subscribes to it, no durable consumer
    Channel(ev.ServiceHeartbeat, None, FLEET_SERVICES, ("guardian",)),
)

BY_SUBJECT: dict[str, Channel] = {c.subject: c for c in CHANNELS}


def stream_for(subject: str) -> StreamSpec:
    if subject.startswith(DEAD_LETTER_PREFIX):
        return DEAD_LETTER_STREAM
    stream = BY_SUBJECT[subject].stream
    if stream is None:
        raise ValueError(f"{subject} is a core NATS subject, not stored in a stream")
    return stream


def dead_letter_subject(subject: str) -> str:
    return DEAD_LETTER_PREFIX + subject
