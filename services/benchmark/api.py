"""HTTP routes of benchmark."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from contracts.events import BenchmarkRequested, BenchmarkSummary
from services.benchmark import db, handlers
from services.benchmark.config import BenchmarkSettings
from services.benchmark.domain import summarize
from services.runtime import outbox
from services.runtime.service import Runtime, runtime_of


def explain(errors: list[dict[str, Any]]) -> str:
    """Validation errors as one sentence a person can act on."""
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        if e.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
        elif e.get("type") == "missing":
            parts.append(f"{where} is required")
        elif e.get("type") == "extra_forbidden":
            parts.append(f"{where} is not a known field")
        else:
            got = f" (got {e['input']!r})" if "input" in e and e.get("input") is not None else ""
            parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)


class PlainErrors(APIRoute):
    """422 answers that say in words what is wrong, besides FastAPI's `detail` list."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def plain(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                errors = list(exc.errors())
                return JSONResponse(
                    {
                        "error": "invalid_request",
                        "message": explain(errors),
                        "detail": _jsonable(errors),
                    },
                    status_code=422,
                )

        return plain


def _jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keep = ("type", "loc", "msg", "input")
    return [
        {k: e[k] for k in keep if k in e and isinstance(e[k], str | int | list)} for e in errors
    ]


class RunRequest(BaseModel):
    """A benchmark job: `runs` streamed requests of `prompt` to `model` through `provider`."""

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

    provider: Literal["ollama", "openrouter", "openai"] = Field(
        description="ollama (OLLAMA_BASE_URL), openrouter (OPENROUTER_BASE_URL) or openai "
        "(any OpenAI-compatible server at OPENAI_BASE_URL)."
    )
    model: str = Field(min_length=1, max_length=512, description="The model's id.")
    task_type: Literal["generate", "chat"] = Field(
        description="ollama: /api/generate or /api/chat; openrouter and openai: both send "
        "the prompt as one user message to /chat/completions."
    )
    prompt: str = Field(min_length=1, max_length=100_000)
    runs: int = Field(ge=1, le=1000, description="Measured runs.")
    max_tokens: int | None = Field(None, ge=1, le=32768, description="Output limit per run.")
    concurrency: int = Field(1, ge=1, le=256, description="Measured runs in flight at once.")
    warmup_runs: int = Field(0, ge=0, le=100, description="Runs before, not counted.")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="Limit of one run, in seconds.")


class RunAccepted(BaseModel):
    job_id: uuid.UUID
    status: Literal["queued"] = "queued"
    url: str = Field(description="Where to follow the job.")


class Blocked(BaseModel):
    error: Literal["benchmark_blocked"] = "benchmark_blocked"
    reason: str = Field(description="Why, naming the price and the cap.")


class InvalidRequest(BaseModel):
    error: Literal["invalid_request"] = "invalid_request"
    message: str = Field(description="What is wrong, in words.")
    detail: list[dict[str, Any]]


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
    status: Literal["queued", "running", "completed", "failed"]
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


router = APIRouter(
    prefix="/v1/benchmarks",
    tags=["benchmark"],
    route_class=PlainErrors,
    responses={422: {"model": InvalidRequest, "description": "The request is not valid"}},
)


def settings_of(runtime: Annotated[Runtime, Depends(runtime_of)]) -> BenchmarkSettings:
    settings = runtime.settings
    assert isinstance(settings, BenchmarkSettings)
    return settings


RuntimeDep = Annotated[Runtime, Depends(runtime_of)]


@router.post(
    "/run",
    status_code=202,
    response_model=RunAccepted,
    summary="Start a benchmark job",
    description="Checks the price guard, stores the job and publishes `benchmark.requested`; "
    "a worker runs it. The guard, by the model's catalog price whatever the provider: a "
    "prompt or completion price per 1M tokens above `BENCHMARK_MAX_PRICE_PER_1M` is refused; "
    "a variable price is refused unless `BENCHMARK_ALLOW_VARIABLE_PRICE`; a model the "
    "catalog does not know is allowed through `ollama` (local models are free) and refused "
    "through `openrouter`/`openai` unless `BENCHMARK_ALLOW_UNKNOWN_MODELS`.",
    responses={
        400: {"model": Blocked, "description": "Refused by the price guard"},
    },
)
async def run(
    body: RunRequest,
    runtime: RuntimeDep,
    settings: Annotated[BenchmarkSettings, Depends(settings_of)],
) -> Any:
    async with runtime.pool.acquire() as conn:
        verdict = await handlers.price_verdict(conn, settings, body.provider, body.model)
        if not verdict.allowed:
            return JSONResponse(Blocked(reason=verdict.reason).model_dump(), status_code=400)
        job = BenchmarkRequested(job_id=uuid.uuid4(), **body.model_dump())
        async with conn.transaction():
            await db.insert_job(conn, job)
            await outbox.add(conn, [job])
    return RunAccepted(job_id=job.job_id, url=f"{router.prefix}/{job.job_id}")


@router.get("", response_model=list[JobBrief], summary="Jobs, newest first")
async def list_jobs(
    runtime: RuntimeDep,
    model: Annotated[str | None, Query(description="Only this model")] = None,
    status: Annotated[
        Literal["queued", "running", "completed", "failed"] | None, Query(description="Only")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[JobBrief]:
    async with runtime.pool.acquire() as conn:
        rows = await db.list_jobs(conn, model, status, limit)
    return [JobBrief(**dict(r)) for r in rows]


@router.get(
    "/models/{model:path}/summary",
    response_model=ModelResults,
    summary="The latest results of a model",
    responses={404: {"description": "No completed job for this model"}},
)
async def model_results(model: str, runtime: RuntimeDep) -> ModelResults:
    async with runtime.pool.acquire() as conn:
        rows = await db.latest_results(conn, model)
    if not rows:
        raise HTTPException(404, f"no completed benchmark of model {model!r}")
    return ModelResults(model=model, results=[LatestResult(**dict(r)) for r in rows])


@router.get(
    "/{job_id}",
    response_model=JobView,
    summary="A job: status, per-run results and aggregates",
    description="While the job runs, `summary` covers the runs finished so far.",
    responses={404: {"description": "No such job (or deleted after the retention period)"}},
)
async def get_job(job_id: uuid.UUID, runtime: RuntimeDep) -> JobView:
    async with runtime.pool.acquire() as conn:
        row = await db.job(conn, job_id)
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
