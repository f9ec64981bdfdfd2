"""Every message of LLM Fleet as a pydantic v2 model.

Each event carries `event_id` (a UUID, the deduplication key end to end) and
`occurred_at` (UTC). Consumers ignore fields they do not know, so producers may
add fields without breaking anyone. Prices are `Decimal` in USD per 1M tokens and
travel as JSON strings, so no float ever rounds them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    field_validator,
    model_validator,
)

Id = str  # user, session, plan and subtask ids are opaque strings (often UUIDs)
NonEmpty = Field(min_length=1, max_length=512)

CANARY_USER_PREFIX = "canary:"
"""User ids starting with this belong to guardian's smoke canary (`canary:guardian`): their
events run through the real pipeline, and no one's stats or leaderboard shows them."""


def is_canary(user_id: str) -> bool:
    return user_id.startswith(CANARY_USER_PREFIX)


def utcnow() -> datetime:
    return datetime.now(UTC)


INBOUND = {"inbound": True}
"""Validation context for messages read off the wire: there `event_id` and `occurred_at`
must be sent, because a default made up on each delivery would defeat deduplication."""


def _require_identity(schema: dict[str, Any]) -> None:
    schema["required"] = sorted({*schema.get("required", []), "event_id", "occurred_at"})


class Event(BaseModel):
    """Base of every message: identity, time, and tolerance of unknown fields."""

    model_config = ConfigDict(extra="ignore", frozen=True, json_schema_extra=_require_identity)

    subject: ClassVar[str]

    event_id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        description="Unique id of this event; redeliveries and retries keep it.",
    )
    occurred_at: datetime = Field(default_factory=utcnow, description="When it happened (UTC).")

    @model_validator(mode="after")
    def _identity_sent(self, info: ValidationInfo) -> Self:
        # an "after" check: a "before" one would turn JSON validation into Python validation,
        # under which strict mode refuses the JSON forms of dates, UUIDs and decimals
        if info.context == INBOUND:
            missing = [k for k in ("event_id", "occurred_at") if k not in self.model_fields_set]
            if missing:
                raise ValueError(f"missing {' and '.join(missing)}: every event must carry them")
        return self

    @classmethod
    def from_wire(cls, data: bytes | str) -> Self:
        """Read a message as its JSON Schema says it is: strictly (`"12"` or `12.0` is not an
        integer, `"true"` not a boolean), identity required, unknown fields ignored."""
        return cls.model_validate_json(data, strict=True, context=INBOUND)


# --- sync: the model catalog -------------------------------------------------------------


def plain_decimal(value: Decimal) -> str:
    """A decimal in plain digits, exactly, without trailing zeros: "360000", never "3.6E+5";
    "0.0000001", never "1E-7" (what `str(Decimal)` gives and JSON readers may not take)."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


Price = Annotated[
    Decimal,
    Field(ge=0, allow_inf_nan=False),
    PlainSerializer(plain_decimal, return_type=str, when_used="json"),
]
"""A USD price: exact, never negative, written in JSON as a plain decimal string."""


class PriceTier(BaseModel):
    """Prices that replace the base ones when a request meets the tier's condition
    (OpenRouter's `pricing.overrides`: typically from `min_prompt_tokens` prompt tokens up)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    min_prompt_tokens: int | None = Field(
        None,
        ge=0,
        description="The tier applies from this many prompt tokens; null: it has another "
        "condition (a time window, say), kept in the catalog's raw entry.",
    )
    prompt_price_per_1m: Price = Field(description="USD per 1M prompt tokens in this tier.")
    completion_price_per_1m: Price = Field(description="USD per 1M completion tokens in this tier.")


def highest_prices(
    prompt: Decimal | None,
    completion: Decimal | None,
    tiers: Iterable[tuple[Decimal, Decimal]] = (),
) -> tuple[Decimal, Decimal] | None:
    """(prompt, completion) USD per 1M at their highest over the base prices and every
    tier's (prompt, completion); None when a base price is null (it varies per request, or
    the model is not priced per token): the price is unknown."""
    if prompt is None or completion is None:
        return None
    for tier_prompt, tier_completion in tiers:
        prompt, completion = max(prompt, tier_prompt), max(completion, tier_completion)
    return prompt, completion


def within_price_cap(prices: tuple[Decimal, Decimal] | None, cap: Decimal) -> bool:
    """The price cap's one rule, for every cap of the fleet (sync's selection and its API's
    filter, benchmark's price guard): the prompt and the completion price, at their highest
    tier (`highest_prices`), are both at most `cap`; an unknown price never is."""
    return prices is not None and prices[0] <= cap and prices[1] <= cap


ModelStatus = Literal["active", "removed", "unavailable"]
ModelChange = Literal["added", "changed", "removed"]


class ModelSynced(Event):
    """A catalog entry was added, changed (price, context length, name, or availability: its
    Ollama device went offline or came back) or removed (no longer in the kept set)."""

    subject: ClassVar[str] = "model.synced"

    provider: str = NonEmpty
    model_id: str = NonEmpty
    device: str | None = Field(
        None, description="The Ollama device serving the model; null for hosted providers."
    )
    name: str
    change: ModelChange
    status: ModelStatus
    context_length: int | None = None
    prompt_price_per_1m: Price | None = Field(
        None,
        description="USD per 1M prompt tokens (the base tier); null when the price varies per "
        "request or the model is not priced per token (its output is not text: see "
        "`unit_prices`). Null is never free.",
    )
    completion_price_per_1m: Price | None = Field(
        None,
        description="USD per 1M completion tokens (the base tier); null as for the prompt price.",
    )
    variable_price: bool = Field(
        False, description="True for router models whose price is only known per request."
    )
    price_tiers: list[PriceTier] = Field(
        default_factory=list,
        description="Higher tiers that replace the base prices (long prompts, say); a price "
        "cap holds for the highest of them.",
    )
    output_modalities: list[str] = Field(
        default_factory=lambda: ["text"],
        description="What the model outputs (OpenRouter's `architecture.output_modalities`).",
    )
    unit_prices: dict[str, Price] = Field(
        default_factory=dict,
        description="For a model not priced per token (output other than text): its prices "
        "as the source lists them, USD per unit of each key (per image, per request, per "
        "token of a kind, ...). Empty for models priced per token.",
    )


class SyncCounts(BaseModel):
    """What one catalog sync run counted (sync stores the same counts with its run)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    fetched: int = Field(0, ge=0, description="Entries in the source's answer.")
    filtered: int = Field(
        0, ge=0, description="Entries eligible: their output and price within the rules."
    )
    selected: int = Field(0, ge=0, description="Entries kept: the top N of the eligible.")
    added: int = Field(0, ge=0, description="Kept entries new to the catalog.")
    changed: int = Field(0, ge=0, description="Kept entries whose tracked fields changed.")
    removed: int = Field(0, ge=0, description="Catalog entries no longer kept.")
    skipped: int = Field(0, ge=0, description="Entries that could not be read.")


class SyncCompleted(Event, SyncCounts):
    """One catalog sync run ended."""

    subject: ClassVar[str] = "sync.completed"

    run_id: uuid.UUID
    source: str = "openrouter"
    status: Literal["succeeded", "not_modified", "failed"]
    error: str | None = None


class DeviceOffline(Event):
    """A local model device stopped answering; its models are unavailable."""

    subject: ClassVar[str] = "device.offline"

    device: str = NonEmpty
    base_url: str
    reason: str


class DeviceOnline(Event):
    """A local model device answers again."""

    subject: ClassVar[str] = "device.online"

    device: str = NonEmpty
    base_url: str
    version: str | None = None
    model_count: int = 0


# --- benchmark ---------------------------------------------------------------------------


class BenchmarkSpec(BaseModel):
    """What a benchmark job does: `runs` streamed requests of `prompt` to `model` through
    `provider`. The API's request body and `benchmark.requested` share these fields and
    limits."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    provider: Literal["ollama", "openrouter", "openai"] = Field(
        description="ollama (OLLAMA_BASE_URL), openrouter (OPENROUTER_BASE_URL) or openai "
        "(any OpenAI-compatible server at OPENAI_BASE_URL)."
    )
    model: str = Field(min_length=1, max_length=512, description="The model's id.")
    task_type: Literal["generate", "chat"] = Field(
        description="ollama: /api/generate or /api/chat; openrouter and openai: both send the "
        "prompt as one user message to /chat/completions."
    )
    prompt: str = Field(min_length=1, max_length=100_000)
    runs: int = Field(ge=1, le=1000, description="Measured runs.")
    warmup_runs: int = Field(
        0, ge=0, le=100, description="Runs before the measured ones, not counted."
    )
    concurrency: int = Field(1, ge=1, le=256, description="Measured runs in flight at once.")
    max_tokens: int | None = Field(None, ge=1, le=32768, description="Output limit per run.")
    timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Limit of one run, request start to done, seconds."
    )

    @field_validator("model", "prompt")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class BenchmarkRequested(Event, BenchmarkSpec):
    """A benchmark job was accepted and waits for a worker. Published by the benchmark API
    (after its price guard) or by any client; a worker applies the price guard again."""

    subject: ClassVar[str] = "benchmark.requested"

    job_id: uuid.UUID
    user_id: str | None = Field(
        None, max_length=512, description="Who submitted it (their quota and their job)."
    )


class LatencySummary(BaseModel):
    """Distribution of one measurement (mean and percentiles, linear interpolation); the
    unit is in the field's name: `*_ms` milliseconds, `tokens_per_s` tokens per second."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    mean: float
    p50: float
    p90: float
    p99: float


class BenchmarkSummary(BaseModel):
    """The measured runs of one job (warm-up runs are not in it)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    runs_ok: int
    runs_failed: int
    ttft_ms: LatencySummary | None = Field(None, description="Time to first token, per run.")
    inter_token_ms: LatencySummary | None = Field(
        None, description="Gaps between content chunks (ITL per chunk), pooled over the runs."
    )
    itl_per_token_ms: LatencySummary | None = Field(
        None,
        description="ITL per token: each gap over the tokens its chunk held, once per token, "
        "pooled; only from servers that say how many tokens each chunk held.",
    )
    tpot_ms: LatencySummary | None = Field(
        None, description="Time per output token after the first, per run."
    )
    e2e_ms: LatencySummary | None = Field(
        None, description="Request start to the server's done, per run."
    )
    tokens_per_s: LatencySummary | None = Field(
        None, description="Output tokens (server's count) over end-to-end time, per run."
    )
    output_tokens: int = Field(0, description="Sum of the server's output token counts.")
    prompt_tokens: int = Field(0, description="Sum of the server's prompt token counts.")
    cost_usd: Decimal | None = Field(
        None, description="Server-reported cost, else catalog price times tokens; null if unknown."
    )
    errors: dict[str, int] = Field(
        default_factory=dict, description="Failed runs by kind (timeout, http_status, ...)."
    )


class BenchmarkCompleted(Event):
    """A job ended with at least one successful run."""

    subject: ClassVar[str] = "benchmark.completed"

    job_id: uuid.UUID
    provider: str
    model: str
    task_type: str
    summary: BenchmarkSummary


class BenchmarkFailed(Event):
    """A job ended without a successful run, or was stopped: every run failed, the price
    guard refused it when it was about to start, its workers kept dying, it was cancelled
    (`error` starts with "cancelled") or ran out of time (`error` starts with "time
    limit"); `summary` covers the runs it finished."""

    subject: ClassVar[str] = "benchmark.failed"

    job_id: uuid.UUID
    provider: str
    model: str
    task_type: str
    error: str
    summary: BenchmarkSummary | None = Field(None, description="Present when runs were made.")


# --- planner and agents ------------------------------------------------------------------


class PlannedSubtask(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    subtask_id: Id = NonEmpty
    sequence_number: int
    description: str
    agent: str
    estimated_time: str | None = None
    depends_on: list[Id] = []
    requires_approval: bool = False
    max_attempts: int | None = Field(None, ge=1, description="Attempts before it fails.")
    timeout_s: float | None = Field(
        None, gt=0, description="Seconds an attempt may take before it counts as failed."
    )


class PlanCreated(Event):
    subject: ClassVar[str] = "plan.created"

    plan_id: Id = NonEmpty
    task_id: Id = NonEmpty
    user_id: Id = NonEmpty
    session_id: Id = NonEmpty
    original_task: str
    subtasks: list[PlannedSubtask]
    requires_approval: bool = Field(
        False, description="The plan as a whole waits for an approval of type `plan`."
    )
    subtask_count: int | None = Field(None, ge=0, description="Subtasks in the plan.")
    subtasks_truncated: bool = Field(
        False,
        description="True when `subtasks` lists only the first ones, to keep the message under "
        "the broker's size limit; GET /v1/plans/{plan_id} has them all.",
    )


class PlanCompleted(Event):
    subject: ClassVar[str] = "plan.completed"

    plan_id: Id = NonEmpty
    task_id: Id = NonEmpty
    user_id: Id = NonEmpty
    session_id: Id = NonEmpty
    status: Literal["completed", "failed", "cancelled"]
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Durations, counts by status, critical path."
    )


class SubtaskReady(Event):
    """A subtask's dependencies are done: the agent named here may start it."""

    subject: ClassVar[str] = "subtask.ready"

    plan_id: Id = NonEmpty
    subtask_id: Id = NonEmpty
    user_id: Id = NonEmpty
    session_id: Id = NonEmpty
    agent: str = NonEmpty
    attempt: int = Field(1, ge=1)
    description: str
    timeout_s: float | None = None
    deadline_at: datetime | None = Field(
        None, description="After this the planner counts the attempt as failed (timed out)."
    )


class SubtaskStarted(Event):
    subject: ClassVar[str] = "subtask.started"

    plan_id: Id = NonEmpty
    subtask_id: Id = NonEmpty
    agent: str = NonEmpty
    attempt: int = Field(1, ge=1)
    started_at: datetime = Field(default_factory=utcnow)


class SubtaskCompleted(Event):
    """An agent finished a subtask; stats counts it as one response of the model."""

    subject: ClassVar[str] = "subtask.completed"

    plan_id: Id = NonEmpty
    subtask_id: Id = NonEmpty
    model_id: str = Field(min_length=1, max_length=512, description="The model that did the work.")
    user_id: Id = NonEmpty
    session_id: Id = NonEmpty
    agent: str | None = Field(None, description="The agent name the subtask was dispatched to.")
    attempt: int = Field(1, ge=1)
    status: Literal["completed"] = "completed"
    started_at: datetime | None = None
    completed_at: datetime = Field(default_factory=utcnow)
    duration_seconds: float | None = Field(None, ge=0)
    result: str | None = None
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    cost_usd: Decimal | None = Field(None, ge=0)


class SubtaskFailed(Event):
    subject: ClassVar[str] = "subtask.failed"

    plan_id: Id = NonEmpty
    subtask_id: Id = NonEmpty
    agent: str = NonEmpty
    model_id: str | None = None
    attempt: int = Field(1, ge=1)
    error: str
    retryable: bool = True


class ApprovalRequested(Event):
    subject: ClassVar[str] = "approval.requested"

    approval_id: uuid.UUID
    plan_id: Id = NonEmpty
    subtask_id: Id | None = None
    user_id: Id = NonEmpty
    type: Literal["tool", "plan"]
    payload: dict[str, Any] = {}
    expires_at: datetime
    session_id: Id | None = None


class ApprovalResolved(Event):
    subject: ClassVar[str] = "approval.resolved"

    approval_id: uuid.UUID
    plan_id: Id = NonEmpty
    subtask_id: Id | None = None
    status: Literal["approved", "rejected", "timeout"]
    decision: str | None = Field(None, description="The approver's comment.")
    user_id: Id | None = None
    session_id: Id | None = None


# --- feedback from the UI ----------------------------------------------------------------


class ModelDismissed(Event):
    """A user removed a model from a session's panel."""

    subject: ClassVar[str] = "model.dismissed"

    user_id: Id = NonEmpty
    session_id: Id = NonEmpty
    model_id: str = NonEmpty
    reason: str | None = None


class ModelRewarded(Event):
    """A user gave a model brains for an answer."""

    subject: ClassVar[str] = "model.rewarded"

    user_id: Id = NonEmpty
    session_id: Id = NonEmpty
    model_id: str = NonEmpty
    brains: int = Field(1, ge=1)


# --- guardian ----------------------------------------------------------------------------


class ServiceDown(Event):
    """A service stopped answering: once per incident (a flapping service stays in one)."""

    subject: ClassVar[str] = "service.down"

    service: str = NonEmpty
    reason: str = Field(
        description="e.g. `process exited with code -9`, `no heartbeat for 2.6s`, "
        "`3 failed readiness checks: ...`."
    )
    last_seen_at: datetime | None = Field(None, description="Its last heartbeat, if any.")
    incident_id: uuid.UUID | None = Field(
        None, description="guardian's incident; service.recovered and .escalated carry it too."
    )


class ServiceRecovered(Event):
    """The service has been up for guardian's stable window: its incident is closed."""

    subject: ClassVar[str] = "service.recovered"

    service: str = NonEmpty
    down_since: datetime
    downtime_seconds: float = Field(description="From down to ready again.")
    restarts: int = Field(0, description="Restarts during the incident.")
    incident_id: uuid.UUID | None = None


class ServiceEscalated(Event):
    """Restarts failed too often in a row: guardian stopped restarting the service until an
    operator resets it, and wrote an incident report."""

    subject: ClassVar[str] = "service.escalated"

    service: str = NonEmpty
    restarts: int
    reason: str
    report: str = Field(description="The incident report in markdown.")
    report_name: str | None = Field(
        None, description="Its file under FLEET_HOME/reports/, BUG-YYYYMMDD-HHMM.md."
    )
    incident_id: uuid.UUID | None = None


class ServiceHeartbeat(Event):
    """Sent every second on core NATS (not stored) by every service instance."""

    subject: ClassVar[str] = "service.heartbeat"

    service: str = NonEmpty
    instance: str = NonEmpty
    started_at: datetime
    ready: bool
    http_url: str | None = None
