"""HTTP routes of benchmark."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from contracts.events import BenchmarkRequested, BenchmarkSpec, BenchmarkSummary
from services.benchmark import db, handlers
from services.benchmark.config import BenchmarkSettings
from services.benchmark.domain import (
    CANCELLED,
    PRICE_GUARD_RULE,
    cut_short,
    quota_refusal,
    summarize,
)
from services.runtime import outbox
from services.runtime.auth import Caller, CallerDep
from services.runtime.errors import ApiError
from services.runtime.service import Runtime, runtime_of

ModelId = Annotated[str, StringConstraints(min_length=1, max_length=512)]
# what the jobs table's status may be (its CHECK constraint: tests/integration/test_status_lists.py)
JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]


class RunRequest(BenchmarkSpec):
    """A benchmark job: `runs` streamed requests of `prompt` to `model` through `provider`
    (the fields and limits of `benchmark.requested`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "provider": "ollama",
                    "model": "llama3.1:8b",
                    "task_type": "generate",
                    "prompt": "Explain TCP slow start in two sentences.",
                    "runs": 5,
                    "max_tokens": 128,
                    "concurrency": 1,
                    "warmup_runs": 1,
                }
            ]
        },
    )


class RunAccepted(BaseModel):
    job_id: uuid.UUID
    status: Literal["queued"] = "queued"
    url: str = Field(description="Where to follow the job.")


class CancelAnswer(BaseModel):
    job_id: uuid.UUID
    status: Literal["cancelled", "running"] = Field(
        description="cancelled: it was queued and is cancelled; running: its worker stops it "
        "within BENCHMARK_HEARTBEAT_S (then `cancelled`)."
    )


class RunView(BaseModel):
    """One measured run. Latencies in milliseconds; token counts are the server's."""

    model_config = ConfigDict(from_attributes=True)

    run_index: int
    ok: bool
    error_kind: str | None
    error: str | None
    ttft_ms: float | None
    e2e_ms: float | None
    itl_mean_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    tpot_ms: float | None
    prompt_tokens: int | None
    output_tokens: int | None
    ttfb_ms: float | None = Field(description="Request start to the response's first byte.")
    tokens_per_s: float | None = Field(description="Output tokens over end-to-end time.")
    server_tokens_per_s: float | None = Field(
        description="Ollama's own eval_count / eval_duration, when it reports them."
    )
    cost_usd: Decimal | None
    cost_source: str | None = Field(description="server (reported) or catalog (price times tokens)")
    content_chunks: int = Field(description="Stream chunks that carried output.")


class JobBrief(BaseModel):
    job_id: uuid.UUID
    provider: str
    model: str
    task_type: str
    runs: int
    status: JobStatus
    attempt: int = Field(description="Workers that started the job so far.")
    error: str | None
    summary: BenchmarkSummary | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobView(JobBrief):
    prompt: str
    warmup_runs: int
    concurrency: int
    max_tokens: int | None
    timeout_s: float
    user_id: str | None = Field(description="Who submitted it.")
    worker: str | None = Field(description="The worker that took the current attempt.")
    runs_done: int = Field(description="Measured runs finished by the current attempt.")
    runs_failed: int
    results: list[RunView] = Field(description="Per run, of the current attempt.")


class LatestResult(BaseModel):
    provider: str
    task_type: str
    job_id: uuid.UUID
    runs: int
    finished_at: datetime
    summary: BenchmarkSummary


class ModelResults(BaseModel):
    model: str
    results: list[LatestResult] = Field(
        description="The latest completed job for each provider and task type."
    )


RuntimeDep = Annotated[Runtime[BenchmarkSettings], Depends(runtime_of)]


def owner_filter(who: Caller) -> str | None:
    """Whose jobs the caller may see and cancel: their own; an operator's, everyone's
    (None). Jobs published without a user (by a client over NATS) are the operators'."""
    return None if who.is_operator else who.user_id


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1/benchmarks", tags=["benchmark"])

    @router.post(
        "/run",
        status_code=202,
        response_model=RunAccepted,
        summary="Start a benchmark job",
        description="Checks the caller's quota (`BENCHMARK_MAX_ACTIVE_JOBS_PER_USER` queued and "
        "running jobs, else 429 with `Retry-After`) and the price guard, stores the job and "
        "publishes `benchmark.requested`; a worker runs it within `BENCHMARK_MAX_JOB_S`.\n\n"
        "The price guard:\n\n" + PRICE_GUARD_RULE,
        responses={
            400: {
                "description": "Refused by the price guard: `benchmark_blocked`, the message "
                "names the price and the cap"
            },
            429: {"description": "`quota_exceeded`: too many queued and running jobs"},
        },
    )
    async def run(
        body: RunRequest,
        runtime: RuntimeDep,
        who: CallerDep,
    ) -> Any:
        settings = runtime.settings
        async with runtime.pool.acquire() as conn:
            verdict = await handlers.price_verdict(conn, settings, body.provider, body.model)
            if not verdict.allowed:
                raise ApiError(400, "benchmark_blocked", verdict.reason)
            job = BenchmarkRequested(job_id=uuid.uuid4(), user_id=who.user_id, **body.model_dump())
            async with conn.transaction():
                active = await db.lock_user_quota(conn, who.user_id)
                over = quota_refusal(active, settings.benchmark_max_active_jobs_per_user)
                if over is None:
                    await db.insert_job(conn, job)
                    await outbox.add(conn, [job])
        if over is not None:
            retry_after = str(settings.benchmark_quota_retry_after_s)
            raise ApiError(429, "quota_exceeded", over, headers={"Retry-After": retry_after})
        return RunAccepted(job_id=job.job_id, url=f"{router.prefix}/{job.job_id}")

    @router.post(
        "/{job_id}/cancel",
        response_model=CancelAnswer,
        summary="Cancel a job",
        description="A queued job is cancelled at once (200, `cancelled`). A running one is "
        "stopped by its worker between runs or mid-run, its streams closed, within "
        "`BENCHMARK_HEARTBEAT_S` (202, `running`; then `cancelled`, keeping the runs it "
        "finished). Either way `benchmark.failed` goes out with an error starting `cancelled`.",
        responses={
            202: {"model": CancelAnswer, "description": "The worker was asked to stop it"},
            404: {"description": "No such job of the caller"},
            409: {"description": "`job_finished`: the job has ended already"},
        },
    )
    async def cancel(job_id: uuid.UUID, runtime: RuntimeDep, who: CallerDep) -> Any:
        owner = owner_filter(who)
        async with runtime.transaction() as conn:
            row = await db.request_cancel(conn, job_id, owner, CANCELLED)
            if row is not None and row["status"] == "cancelled":
                fields = {k: v for k, v in dict(row).items() if k != "status"}
                await outbox.add(conn, [cut_short(BenchmarkRequested(**fields), CANCELLED, [])])
            existing = await db.job(conn, job_id, owner) if row is None else None
        if row is not None:
            answer = CancelAnswer(job_id=job_id, status=row["status"])
            return JSONResponse(
                answer.model_dump(mode="json"),
                status_code=200 if row["status"] == "cancelled" else 202,
            )
        if existing is None:
            raise HTTPException(404, f"no benchmark job {job_id}")
        raise ApiError(409, "job_finished", f"job {job_id} has ended: {existing['status']}")

    @router.get(
        "",
        response_model=list[JobBrief],
        summary="The caller's jobs (an operator's: all), newest first",
    )
    async def list_jobs(
        runtime: RuntimeDep,
        who: CallerDep,
        model: Annotated[ModelId | None, Query(description="Only this model")] = None,
        status: Annotated[
            JobStatus | None,
            Query(description="Only"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[JobBrief]:
        async with runtime.pool.acquire() as conn:
            rows = await db.list_jobs(conn, owner_filter(who), model, status, limit)
        return [JobBrief(**dict(r)) for r in rows]

    @router.get(
        "/models/{model:path}/summary",
        response_model=ModelResults,
        summary="The latest results of a model",
        responses={404: {"description": "No completed job for this model"}},
    )
    async def model_results(model: Annotated[ModelId, Path()], runtime: RuntimeDep) -> ModelResults:
        async with runtime.pool.acquire() as conn:
            rows = await db.latest_results(conn, model)
        if not rows:
            raise HTTPException(404, f"no completed benchmark of model {model[:100]!r}")
        return ModelResults(model=model, results=[LatestResult(**dict(r)) for r in rows])

    @router.get(
        "/{job_id}",
        response_model=JobView,
        summary="A job: status, per-run results and aggregates",
        description="While the job runs, `summary` covers the runs finished so far.",
        responses={
            404: {
                "description": "No such job of the caller (or deleted after the retention period)"
            }
        },
    )
    async def get_job(job_id: uuid.UUID, runtime: RuntimeDep, who: CallerDep) -> JobView:
        async with runtime.pool.acquire() as conn:
            row = await db.job(conn, job_id, owner_filter(who))
            if row is None:
                raise HTTPException(404, f"no benchmark job {job_id}")
            results = await db.job_runs(conn, job_id, row["attempt"])
        fields = dict(row)
        if fields["summary"] is None and results:
            fields["summary"] = summarize(results)
        return JobView(
            **fields,
            runs_done=len(results),
            runs_failed=sum(not r.ok for r in results),
            results=[RunView.model_validate(r) for r in results],
        )

    return router
