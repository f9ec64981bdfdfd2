from __future__ import annotations

from decimal import Decimal

from pydantic import Field, SecretStr, model_validator

from services.runtime.config import RuntimeSettings


class BenchmarkSettings(RuntimeSettings):
    http_port: int = 8102

    benchmark_max_price_per_1m: Decimal = Field(
        Decimal("10.0"),
        ge=0,
        description="A model whose catalog price (prompt or completion, USD per 1M tokens) is "
        "above this is refused.",
    )
    benchmark_allow_variable_price: bool = Field(
        False, description="Allow models whose catalog price varies per request."
    )
    benchmark_allow_unknown_models: bool = Field(
        False,
        description="Allow openrouter/openai models the catalog does not know (ollama ones "
        "are always allowed: local models are free).",
    )
    benchmark_max_attempts: int = Field(
        3,
        ge=1,
        description="Workers that may start a job; when each stopped mid-job, the job fails.",
    )

    benchmark_worker_concurrency: int = Field(
        4, ge=1, le=256, description="Jobs one worker runs at once."
    )
    benchmark_lease_s: float = Field(
        30.0,
        gt=0,
        description="A worker holds a running job this long after its last heartbeat; when a "
        "worker dies, another takes its jobs over once their leases ran out.",
    )
    benchmark_heartbeat_s: float = Field(
        2.0,
        gt=0,
        description="Seconds between a worker's renewals of each job's lease; also how soon a "
        "running job notices that it was cancelled.",
    )
    benchmark_scan_interval_s: float = Field(
        1.0,
        gt=0,
        description="Seconds between a worker's looks for jobs it may take: queued ones no "
        "worker had room for, and ones whose worker's lease ran out.",
    )
    benchmark_max_job_s: float = Field(
        3600.0,
        gt=0,
        description="A job's total time from its first start; past it the job is stopped and "
        "fails, keeping the runs it finished.",
    )
    benchmark_max_active_jobs_per_user: int = Field(
        10, ge=1, description="Queued and running jobs one user may have; more are answered 429."
    )
    benchmark_quota_retry_after_s: int = Field(
        30, ge=1, description="The Retry-After of a 429 for the quota."
    )

    job_cleanup_interval: float = Field(6.0, gt=0, description="Hours between job cleanups.")
    job_cleanup_retention_days: float = Field(
        7.0, gt=0, description="Jobs created longer ago than this are deleted."
    )

    ollama_base_url: str = "http://127.0.0.1:11434"
    # the host, as sync reads it too (one variable for both in a shared environment)
    openrouter_base_url: str = "https://openrouter.ai"
    openrouter_api_key: SecretStr | None = None
    # as OpenAI's clients take it: the path up to `/chat/completions`
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr | None = None

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> BenchmarkSettings:
        if self.benchmark_heartbeat_s * 2 > self.benchmark_lease_s:
            raise ValueError(
                "BENCHMARK_HEARTBEAT_S must be at most half of BENCHMARK_LEASE_S, or a living "
                "worker's jobs would be taken over"
            )
        return self
