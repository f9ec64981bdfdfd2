from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from contracts import CHANNELS, STREAMS
from contracts import events as ev
from contracts.events import INBOUND
from contracts.export import stale_files

NOW = datetime(2026, 4, 2, 12, 0, tzinfo=UTC)
JOB = uuid.UUID("00000000-0000-0000-0000-000000000001")

# one valid example of every message in the catalog
EXAMPLES: dict[type[ev.Event], dict[str, Any]] = {
    ev.ModelSynced: dict(
        provider="openrouter",
        model_id="openai/gpt-4o",
        name="GPT-4o",
        change="changed",
        status="active",
        context_length=128000,
        prompt_price_per_1m=Decimal("2.5"),
        completion_price_per_1m=Decimal("10.000001"),
    ),
    ev.SyncCompleted: dict(
        run_id=JOB,
        status="succeeded",
        fetched=550,
        filtered=150,
        selected=100,
        added=3,
        changed=1,
        removed=2,
    ),
    ev.DeviceOffline: dict(
        device="gpu-box", base_url="http://10.0.0.5:11434", reason="timeout after 2s"
    ),
    ev.DeviceOnline: dict(
        device="gpu-box", base_url="http://10.0.0.5:11434", version="0.6.1", model_count=15
    ),
    ev.BenchmarkRequested: dict(
        job_id=JOB,
        provider="ollama",
        model="llama3.1:8b",
        task_type="generate",
        prompt="test",
        runs=3,
    ),
    ev.BenchmarkCompleted: dict(
        job_id=JOB,
        provider="ollama",
        model="llama3.1:8b",
        task_type="generate",
        summary=dict(
            runs_ok=3,
            runs_failed=0,
            output_tokens=300,
            ttft_ms=dict(mean=50, p50=48, p90=60, p99=70),
        ),
    ),
    ev.BenchmarkFailed: dict(
        job_id=JOB, provider="openai", model="m", task_type="chat", error="every run failed"
    ),
    ev.PlanCreated: dict(
        plan_id="p",
        task_id="t",
        user_id="u",
        session_id="s",
        original_task="write a report",
        subtasks=[
            dict(
                subtask_id="a",
                sequence_number=1,
                description="d",
                agent="openai/gpt-4o",
                depends_on=[],
            )
        ],
    ),
    ev.PlanCompleted: dict(
        plan_id="p",
        task_id="t",
        user_id="u",
        session_id="s",
        status="completed",
        metrics={"total_seconds": 12.5},
    ),
    ev.SubtaskReady: dict(
        plan_id="p",
        subtask_id="a",
        user_id="u",
        session_id="s",
        agent="openai/gpt-4o",
        description="d",
    ),
    ev.SubtaskStarted: dict(plan_id="p", subtask_id="a", agent="openai/gpt-4o", started_at=NOW),
    ev.SubtaskCompleted: dict(
        plan_id="p",
        subtask_id="a",
        model_id="openai/gpt-4o",
        user_id="u",
        session_id="s",
        prompt_tokens=10,
        completion_tokens=20,
        cost_usd=Decimal("0.000125"),
    ),
    ev.SubtaskFailed: dict(plan_id="p", subtask_id="a", agent="openai/gpt-4o", error="boom"),
    ev.ApprovalRequested: dict(
        approval_id=JOB,
        plan_id="p",
        user_id="u",
        type="tool",
        payload={"tool": "shell"},
        expires_at=NOW,
    ),
    ev.ApprovalResolved: dict(approval_id=JOB, plan_id="p", status="approved", decision="fine"),
    ev.ModelDismissed: dict(user_id="u", session_id="s", model_id="openai/gpt-4o"),
    ev.ModelRewarded: dict(user_id="u", session_id="s", model_id="openai/gpt-4o", brains=2),
    ev.ServiceDown: dict(service="stats", reason="no heartbeat for 3s"),
    ev.ServiceRecovered: dict(service="stats", down_since=NOW, downtime_seconds=4.2, restarts=1),
    ev.ServiceEscalated: dict(
        service="stats", restarts=3, reason="keeps crashing", report="# Incident\n"
    ),
    ev.ServiceHeartbeat: dict(service="stats", instance="host-1", started_at=NOW, ready=True),
}


def test_every_channel_has_an_example() -> None:
    assert {c.event for c in CHANNELS} == set(EXAMPLES)


@pytest.mark.parametrize("event_type", list(EXAMPLES), ids=lambda t: t.subject)
def test_round_trip_through_json_keeps_every_field(event_type: type[ev.Event]) -> None:
    event = event_type(**EXAMPLES[event_type])
    again = event_type.from_wire(event.model_dump_json())
    assert again == event


def test_prices_travel_as_exact_decimal_strings() -> None:
    event = ev.ModelSynced(**EXAMPLES[ev.ModelSynced])
    wire = json.loads(event.model_dump_json())
    assert wire["completion_price_per_1m"] == "10.000001"
    again = ev.ModelSynced.model_validate(wire)
    assert again.completion_price_per_1m == Decimal("10.000001")


def test_unknown_fields_are_ignored() -> None:
    wire = ev.ModelRewarded(**EXAMPLES[ev.ModelRewarded]).model_dump(mode="json")
    wire["added_in_a_later_version"] = {"x": 1}
    parsed = ev.ModelRewarded.model_validate(wire, context=INBOUND)
    assert parsed.brains == 2


def test_an_inbound_event_without_its_id_is_refused() -> None:
    wire = ev.ModelRewarded(**EXAMPLES[ev.ModelRewarded]).model_dump(mode="json")
    del wire["event_id"]
    with pytest.raises(ValidationError, match="missing event_id"):
        ev.ModelRewarded.model_validate(wire, context=INBOUND)


@pytest.mark.parametrize(
    ("field", "value"),
    [("prompt_tokens", "12"), ("prompt_tokens", 12.0), ("prompt_tokens", True), ("attempt", "2")],
)
def test_inbound_events_are_read_as_strictly_as_their_schema_says(
    field: str, value: object
) -> None:
    wire = ev.SubtaskCompleted(**EXAMPLES[ev.SubtaskCompleted]).model_dump(mode="json")
    assert ev.SubtaskCompleted.from_wire(json.dumps(wire)).event_id  # as sent: accepted
    wire[field] = value
    with pytest.raises(ValidationError, match=field):
        ev.SubtaskCompleted.from_wire(json.dumps(wire))


def test_an_inbound_event_read_from_json_needs_its_identity() -> None:
    wire = ev.ModelRewarded(**EXAMPLES[ev.ModelRewarded]).model_dump(mode="json")
    del wire["occurred_at"]
    with pytest.raises(ValidationError, match="missing occurred_at"):
        ev.ModelRewarded.from_wire(json.dumps(wire))


def test_bad_values_are_refused_with_the_field_named() -> None:
    fields = {**EXAMPLES[ev.SubtaskCompleted], "prompt_tokens": -1}
    with pytest.raises(ValidationError, match="prompt_tokens"):
        ev.SubtaskCompleted(**fields)


def test_streams_never_overlap_and_cover_every_stored_subject() -> None:
    owners: dict[str, str] = {}
    for stream in STREAMS:
        for subject in stream.subjects:
            assert subject not in owners, f"{subject} in {owners.get(subject)} and {stream.name}"
            owners[subject] = stream.name
    for c in CHANNELS:
        if c.stream is None:
            assert c.subject not in owners  # core NATS only: no stream may capture it
        else:
            assert owners[c.subject] == c.stream.name


def test_the_committed_schema_export_is_up_to_date() -> None:
    assert stale_files() == [], "run `make schema` and commit contracts/schema/"
