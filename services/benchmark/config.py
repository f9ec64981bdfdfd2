from __future__ import annotations

from decimal import Decimal

from pydantic import Field, SecretStr

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
