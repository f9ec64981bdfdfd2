"""Subscribers of benchmark, and what they and the API share: the price table from
`model.synced`, the price guard's verdict on the current table, and where each provider's
server is. The workers that run the jobs of `benchmark.requested` are in `worker`."""

from __future__ import annotations

from pydantic import SecretStr

from contracts.events import ModelSynced
from services.benchmark import db
from services.benchmark.config import BenchmarkSettings
from services.benchmark.domain import Policy, Verdict, catalog_ids, check_price
from services.benchmark.providers import Endpoint
from services.runtime.db import Connection


async def on_model_synced(conn: Connection, events: list[ModelSynced]) -> None:
    await db.upsert_prices(conn, events)


def policy_of(settings: BenchmarkSettings) -> Policy:
    return Policy(
        max_price_per_1m=settings.benchmark_max_price_per_1m,
        allow_variable_price=settings.benchmark_allow_variable_price,
        allow_unknown_models=settings.benchmark_allow_unknown_models,
    )


async def price_verdict(
    conn: Connection, settings: BenchmarkSettings, provider: str, model: str
) -> Verdict:
    catalog = await db.catalog_prices(conn, catalog_ids(provider, model))
    return check_price(provider, model, catalog, policy_of(settings))


def endpoint_of(settings: BenchmarkSettings, provider: str) -> Endpoint:
    if provider == "ollama":
        return Endpoint("ollama", settings.ollama_base_url)
    if provider == "openrouter":
        key = settings.openrouter_api_key
        return Endpoint("openrouter", settings.openrouter_base_url, _secret(key))
    return Endpoint("openai", settings.openai_base_url, _secret(settings.openai_api_key))


def secrets_of(settings: BenchmarkSettings) -> list[str]:
    """Every configured key: never to be stored or logged, whatever text carries it."""
    return [
        k for k in (_secret(settings.openrouter_api_key), _secret(settings.openai_api_key)) if k
    ]


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
