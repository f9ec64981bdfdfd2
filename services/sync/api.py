"""HTTP routes of sync."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel

from contracts.events import Price, PriceTier, highest_prices, within_price_cap
from services.runtime.auth import OperatorDep
from services.runtime.errors import ApiError
from services.runtime.service import Runtime, runtime_of
from services.sync import db
from services.sync.catalog import CatalogSync, SyncInProgress
from services.sync.config import SyncSettings
from services.sync.discovery import DeviceDiscovery
from services.sync.domain import DeviceStatus, RunStatus, Status

Provider = Literal["openrouter", "ollama"]
RuntimeDep = Annotated[Runtime[SyncSettings], Depends(runtime_of)]
# What a model id or device name may be: printable text of sane length. NUL and other control
# characters can name nothing in the catalog (PostgreSQL text cannot even hold NUL).
NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"
# A cap far above any real price per 1M tokens, of at most 30 digits and 18 decimals, so the
# number stays one PostgreSQL's numeric (and a person) can hold: 1e999999 is refused, not a
# 500.
MAX_PRICE_CAP = Decimal(1_000_000_000)


class CatalogModel(BaseModel):
    provider: str
    model_id: str
    device: str | None
    name: str
    context_length: int | None
    prompt_price_per_1m: Price | None
    completion_price_per_1m: Price | None
    variable_price: bool
    price_tiers: list[PriceTier]
    output_modalities: list[str]
    unit_prices: dict[str, Price]
    status: Status
    available: bool
    first_seen_at: datetime
    last_seen_at: datetime


class PricePoint(BaseModel):
    prompt_price_per_1m: Price | None
    completion_price_per_1m: Price | None
    variable_price: bool
    price_tiers: list[PriceTier]
    unit_prices: dict[str, Price]
    recorded_at: datetime


class CatalogModelDetail(CatalogModel):
    raw: dict[str, Any]
    price_history: list[PricePoint]


class ProviderCount(BaseModel):
    provider: str
    count: int
    by_status: dict[str, int]


class RunAccepted(BaseModel):
    run_id: uuid.UUID
    status: Literal["running"] = "running"


class SyncRun(BaseModel):
    run_id: uuid.UUID
    trigger: str
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    fetched: int
    filtered: int
    selected: int
    added: int
    changed: int
    removed: int
    skipped: int
    error: str | None


class Device(BaseModel):
    name: str
    base_url: str
    status: DeviceStatus
    version: str | None
    model_count: int | None
    last_error: str | None
    status_since: datetime
    last_checked_at: datetime
    last_seen_at: datetime | None


def _model(r: asyncpg.Record) -> CatalogModel:
    return CatalogModel(
        **{k: r[k] for k in CatalogModel.model_fields if k != "available"},
        available=r["status"] == "active",
    )


def highest_prices_of(m: CatalogModel) -> tuple[Decimal, Decimal] | None:
    tiers = [(t.prompt_price_per_1m, t.completion_price_per_1m) for t in m.price_tiers]
    return highest_prices(m.prompt_price_per_1m, m.completion_price_per_1m, tiers)


def _price_point(r: asyncpg.Record) -> PricePoint:
    return PricePoint(**{k: r[k] for k in PricePoint.model_fields})


def _run(r: asyncpg.Record) -> SyncRun:
    return SyncRun(run_id=r["id"], **{k: r[k] for k in SyncRun.model_fields if k != "run_id"})


def build_router(catalog: CatalogSync, discovery: DeviceDiscovery) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["sync"])

    @router.get("/models", response_model=list[CatalogModel], summary="The catalog")
    async def list_models(
        runtime: RuntimeDep,
        provider: Annotated[Provider | None, Query(description="Only this provider")] = None,
        max_price_per_1m: Annotated[
            Decimal | None,
            Query(
                ge=0,
                le=MAX_PRICE_CAP,
                allow_inf_nan=False,
                max_digits=30,
                decimal_places=18,
                description="USD per 1M tokens: prompt and completion price both at most "
                "this, in every price tier (models whose price varies per request or is not "
                "per token are left out)",
            ),
        ] = None,
        available: Annotated[
            bool | None,
            Query(description="true: usable now (active); false: removed or unavailable"),
        ] = None,
    ) -> list[CatalogModel]:
        async with runtime.pool.acquire() as conn:
            rows = await db.models(conn, provider, available)
        found = [_model(r) for r in rows]
        if max_price_per_1m is None:
            return found
        # the catalog is small (the top N and the devices' models): the fleet's one price
        # rule, in Python, rather than a second one in SQL
        return [m for m in found if within_price_cap(highest_prices_of(m), max_price_per_1m)]

    @router.get(
        "/models/{model_id:path}",
        response_model=CatalogModelDetail,
        summary="One model, with its raw entry and price history",
        responses={
            404: {"description": "No such model"},
            409: {"description": "Several devices serve it: name one with `device`"},
        },
    )
    async def get_model(
        model_id: Annotated[str, Path(max_length=512, pattern=NO_CONTROL)],
        runtime: RuntimeDep,
        device: Annotated[
            str | None,
            Query(max_length=256, pattern=NO_CONTROL, description="The Ollama device serving it"),
        ] = None,
    ) -> CatalogModelDetail:
        async with runtime.pool.acquire() as conn:
            rows = await db.model(conn, model_id, device)
            if len(rows) > 1:
                served_by = ", ".join(r["device"] or r["provider"] for r in rows)
                raise ApiError(
                    409,
                    "ambiguous_model",
                    f"{model_id!r} is served by several devices ({served_by}); add ?device=",
                )
            if not rows:
                where = f" on device {device!r}" if device else ""
                raise ApiError(404, "not_found", f"no model {model_id!r}{where} in the catalog")
            history = await db.price_history(conn, model_id)
        row = rows[0]
        return CatalogModelDetail(
            **_model(row).model_dump(),
            raw=row["raw"],
            price_history=[
                _price_point(h)
                for h in history
                if (h["provider"], h["device"]) == (row["provider"], row["device"])
            ],
        )

    @router.get(
        "/providers",
        response_model=list[ProviderCount],
        summary="Models per provider: `count` is the available ones",
    )
    async def providers(runtime: RuntimeDep) -> list[ProviderCount]:
        async with runtime.pool.acquire() as conn:
            rows = await db.provider_counts(conn)
        by_provider: dict[str, dict[str, int]] = {}
        for r in rows:
            by_provider.setdefault(r["provider"], {})[r["status"]] = r["count"]
        return [
            ProviderCount(provider=p, count=statuses.get("active", 0), by_status=statuses)
            for p, statuses in sorted(by_provider.items())
        ]

    @router.post(
        "/sync/run",
        status_code=202,
        response_model=RunAccepted,
        summary="Sync the OpenRouter catalog now, in the background (operators)",
        responses={409: {"description": "A run is in progress: `Location` names it"}},
    )
    async def run_sync(runtime: RuntimeDep, response: Response, _: OperatorDep) -> RunAccepted:
        try:
            run_id = await catalog.request_run(runtime.pool)
        except SyncInProgress as exc:
            running = f"/v1/sync/runs/{exc.run_id}" if exc.run_id else None
            raise ApiError(
                409,
                "sync_in_progress",
                f"an OpenRouter sync is already running: {running or 'starting'}",
                headers={"Location": running} if running else None,
            ) from None
        response.headers["Location"] = f"/v1/sync/runs/{run_id}"
        return RunAccepted(run_id=run_id)

    @router.get("/sync/runs", response_model=list[SyncRun], summary="The latest runs")
    async def list_runs(
        runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=500)] = 20
    ) -> list[SyncRun]:
        async with runtime.pool.acquire() as conn:
            return [_run(r) for r in await db.runs(conn, limit)]

    @router.get(
        "/sync/runs/{run_id}",
        response_model=SyncRun,
        summary="A run's status and counts",
        responses={404: {"description": "No such run"}},
    )
    async def get_run(run_id: uuid.UUID, runtime: RuntimeDep) -> SyncRun:
        async with runtime.pool.acquire() as conn:
            row = await db.run(conn, run_id)
        if row is None:
            raise ApiError(404, "not_found", f"no sync run {run_id}")
        return _run(row)

    @router.get("/devices", response_model=list[Device], summary="Ollama devices as last checked")
    async def devices(runtime: RuntimeDep) -> list[Device]:
        async with runtime.pool.acquire() as conn:
            return [Device(**dict(r)) for r in await db.devices(conn)]

    @router.post(
        "/discovery/run",
        response_model=list[Device],
        summary="Check every Ollama device now; answers when done (operators)",
    )
    async def run_discovery(runtime: RuntimeDep, _: OperatorDep) -> list[Device]:
        await discovery.run(runtime.pool)
        async with runtime.pool.acquire() as conn:
            return [Device(**dict(r)) for r in await db.devices(conn)]

    return router
