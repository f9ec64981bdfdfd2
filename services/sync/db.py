"""Every SQL statement of sync."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from contracts.events import SyncCounts, plain_decimal
from services.runtime.db import Connection
from services.sync.domain import DeviceCheck, Model, ModelChange, PriceTier, StoredModel

# one OpenRouter run at a time across every instance; held by the run's connection until
# it goes back to the pool
RUN_LOCK = "fleet-sync:openrouter-run"
DISCOVERY_LOCK = "fleet-sync:discovery"
GOOD_RUN = "status IN ('succeeded', 'not_modified')"


# --- runs ---------------------------------------------------------------------------------


async def try_lock_runs(conn: Connection) -> bool:
    locked: bool = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", RUN_LOCK)
    return locked


async def interrupt_running_runs(conn: Connection, error: str) -> list[uuid.UUID]:
    """Runs still marked running while the caller holds the run lock were cut off (their
    process died); they are failed so that nobody waits for them."""
    rows = await conn.fetch(
        "UPDATE sync_runs SET status = 'failed', finished_at = now(), error = $1"
        " WHERE status = 'running' RETURNING id",
        error,
    )
    return [r["id"] for r in rows]


async def insert_run(conn: Connection, run_id: uuid.UUID, trigger: str) -> None:
    await conn.execute("INSERT INTO sync_runs (id, trigger) VALUES ($1, $2)", run_id, trigger)


async def running_run(conn: Connection) -> uuid.UUID | None:
    run_id: uuid.UUID | None = await conn.fetchval(
        "SELECT id FROM sync_runs WHERE status = 'running' ORDER BY started_at DESC LIMIT 1"
    )
    return run_id


async def last_good_run(conn: Connection) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT etag, selection, finished_at FROM sync_runs WHERE {GOOD_RUN}"
        " ORDER BY started_at DESC LIMIT 1"
    )


async def finish_run(
    conn: Connection,
    run_id: uuid.UUID,
    status: str,
    counts: SyncCounts,
    *,
    etag: str | None = None,
    selection: str | None = None,
    error: str | None = None,
) -> None:
    await conn.execute(
        "UPDATE sync_runs SET status = $2, finished_at = now(), fetched = $3, filtered = $4,"
        " selected = $5, added = $6, changed = $7, removed = $8, skipped = $9, etag = $10,"
        " selection = $11, error = $12 WHERE id = $1",
        run_id,
        status,
        counts.fetched,
        counts.filtered,
        counts.selected,
        counts.added,
        counts.changed,
        counts.removed,
        counts.skipped,
        etag,
        selection,
        error,
    )


RUN_COLUMNS = (
    "id, trigger, status, started_at, finished_at, fetched, filtered, selected, added, changed,"
    " removed, skipped, error"
)


async def run(conn: Connection, run_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {RUN_COLUMNS} FROM sync_runs WHERE id = $1", run_id)


async def runs(conn: Connection, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {RUN_COLUMNS} FROM sync_runs ORDER BY started_at DESC LIMIT $1", limit
    )


async def last_success_at(conn: Connection) -> datetime | None:
    at: datetime | None = await conn.fetchval(
        f"SELECT max(finished_at) FROM sync_runs WHERE {GOOD_RUN}"
    )
    return at


# --- the catalog --------------------------------------------------------------------------

# Tiers and unit prices are jsonb with prices as decimal strings, so no float rounds them.


def tiers_json(tiers: Sequence[PriceTier]) -> list[dict[str, Any]]:
    return [
        {
            "min_prompt_tokens": t.min_prompt_tokens,
            "prompt_price_per_1m": plain_decimal(t.prompt_price_per_1m),
            "completion_price_per_1m": plain_decimal(t.completion_price_per_1m),
        }
        for t in tiers
    ]


def tiers_from_json(value: list[dict[str, Any]]) -> tuple[PriceTier, ...]:
    return tuple(
        PriceTier(
            t["min_prompt_tokens"],
            Decimal(t["prompt_price_per_1m"]),
            Decimal(t["completion_price_per_1m"]),
        )
        for t in value
    )


def unit_prices_json(prices: Sequence[tuple[str, Decimal]]) -> dict[str, str]:
    return {key: plain_decimal(price) for key, price in prices}


def unit_prices_from_json(value: dict[str, str]) -> tuple[tuple[str, Decimal], ...]:
    return tuple(sorted((key, Decimal(price)) for key, price in value.items()))


async def stored_models(
    conn: Connection, provider: str
) -> dict[str | None, dict[str, StoredModel]]:
    """A provider's rows, by device (None for a hosted provider), then by model id."""
    rows = await conn.fetch(
        "SELECT device, model_id, name, context_length, prompt_price_per_1m,"
        " completion_price_per_1m, variable_price, price_tiers, output_modalities, unit_prices,"
        " status, raw FROM models WHERE provider = $1",
        provider,
    )
    stored: dict[str | None, dict[str, StoredModel]] = {}
    for r in rows:
        model = Model(
            provider=provider,
            model_id=r["model_id"],
            name=r["name"],
            context_length=r["context_length"],
            prompt_price_per_1m=r["prompt_price_per_1m"],
            completion_price_per_1m=r["completion_price_per_1m"],
            variable_price=r["variable_price"],
            device=r["device"],
            price_tiers=tiers_from_json(r["price_tiers"]),
            output_modalities=tuple(r["output_modalities"]),
            unit_prices=unit_prices_from_json(r["unit_prices"]),
            raw=r["raw"],
        )
        stored.setdefault(r["device"], {})[r["model_id"]] = StoredModel(model, r["status"])
    return stored


async def write_models(conn: Connection, changes: Sequence[ModelChange]) -> None:
    """Every changed row in one statement; `last_seen_at` moves only for a model just seen."""
    if not changes:
        return
    models = [c.model for c in changes]
    await conn.execute(
        """
        INSERT INTO models AS m (provider, device, model_id, name, context_length,
            prompt_price_per_1m, completion_price_per_1m, variable_price, status, raw,
            price_tiers, unit_prices, output_modalities)
        -- tiers and modalities travel as JSON text, one per row: a list per row would be
        -- read as one more array dimension, and unnest flattens those
        SELECT p, d, i, n, c, pp, cp, v, s, r, t::jsonb, u,
               ARRAY(SELECT jsonb_array_elements_text(o::jsonb))
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[],
                    $6::numeric[], $7::numeric[], $8::boolean[], $9::text[], $10::jsonb[],
                    $11::text[], $12::jsonb[], $13::text[])
             AS x(p, d, i, n, c, pp, cp, v, s, r, t, u, o)
        ON CONFLICT (provider, device, model_id) DO UPDATE SET
            name                    = EXCLUDED.name,
            context_length          = EXCLUDED.context_length,
            prompt_price_per_1m     = EXCLUDED.prompt_price_per_1m,
            completion_price_per_1m = EXCLUDED.completion_price_per_1m,
            variable_price          = EXCLUDED.variable_price,
            price_tiers             = EXCLUDED.price_tiers,
            unit_prices             = EXCLUDED.unit_prices,
            output_modalities       = EXCLUDED.output_modalities,
            status                  = EXCLUDED.status,
            raw                     = EXCLUDED.raw,
            last_seen_at = CASE WHEN EXCLUDED.status = 'active' THEN now()
                                ELSE m.last_seen_at END,
            updated_at              = now()
        """,
        [m.provider for m in models],
        [m.device for m in models],
        [m.model_id for m in models],
        [m.name for m in models],
        [m.context_length for m in models],
        [m.prompt_price_per_1m for m in models],
        [m.completion_price_per_1m for m in models],
        [m.variable_price for m in models],
        [c.status for c in changes],
        [m.raw for m in models],
        [json.dumps(tiers_json(m.price_tiers)) for m in models],
        [unit_prices_json(m.unit_prices) for m in models],
        [json.dumps(m.output_modalities) for m in models],
    )


async def add_price_history(
    conn: Connection, changes: Sequence[ModelChange], run_id: uuid.UUID | None
) -> None:
    models = [c.model for c in changes if c.price_changed]
    if not models:
        return
    await conn.execute(
        """
        INSERT INTO price_history (provider, device, model_id, prompt_price_per_1m,
            completion_price_per_1m, variable_price, price_tiers, unit_prices, run_id)
        SELECT p, d, i, pp, cp, v, t::jsonb, u, $9::uuid
        FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[], $5::numeric[],
                    $6::boolean[], $7::text[], $8::jsonb[]) AS x(p, d, i, pp, cp, v, t, u)
        """,
        [m.provider for m in models],
        [m.device for m in models],
        [m.model_id for m in models],
        [m.prompt_price_per_1m for m in models],
        [m.completion_price_per_1m for m in models],
        [m.variable_price for m in models],
        [json.dumps(tiers_json(m.price_tiers)) for m in models],
        [unit_prices_json(m.unit_prices) for m in models],
        run_id,
    )


async def price_history(conn: Connection, model_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT provider, device, prompt_price_per_1m, completion_price_per_1m, variable_price,"
        " price_tiers, unit_prices, recorded_at FROM price_history WHERE model_id = $1"
        " ORDER BY recorded_at, id",
        model_id,
    )


# What the API shows. An active model was seen by its source's latest successful check even
# when that check rewrote nothing, so its last_seen_at is the later of the two.
MODEL_VIEW = f"""
    SELECT m.provider, m.device, m.model_id, m.name, m.context_length, m.prompt_price_per_1m,
           m.completion_price_per_1m, m.variable_price, m.price_tiers, m.output_modalities,
           m.unit_prices, m.status, m.first_seen_at, m.raw,
           CASE WHEN m.status <> 'active' THEN m.last_seen_at
                WHEN m.device IS NOT NULL THEN GREATEST(m.last_seen_at, d.last_seen_at)
                ELSE GREATEST(m.last_seen_at,
                              (SELECT max(finished_at) FROM sync_runs WHERE {GOOD_RUN}))
           END AS last_seen_at
    FROM models m LEFT JOIN devices d ON d.name = m.device
"""


async def models(
    conn: Connection,
    provider: str | None,
    available: bool | None,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        MODEL_VIEW
        + """
        WHERE ($1::text IS NULL OR m.provider = $1)
          AND ($2::boolean IS NULL OR (m.status = 'active') = $2)
        ORDER BY m.provider, m.model_id, m.device NULLS FIRST
        """,
        provider,
        available,
    )


async def model(conn: Connection, model_id: str, device: str | None) -> list[asyncpg.Record]:
    return await conn.fetch(
        MODEL_VIEW + " WHERE m.model_id = $1 AND ($2::text IS NULL OR m.device = $2)"
        " ORDER BY m.provider, m.device NULLS FIRST",
        model_id,
        device,
    )


async def provider_counts(conn: Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT provider, status, count(*) AS count FROM models"
        " GROUP BY provider, status ORDER BY provider, status"
    )


# --- devices ------------------------------------------------------------------------------


async def lock_discovery(conn: Connection) -> None:
    """Serializes discovery passes of every instance (until the transaction ends), so a
    transition is seen, and published, once."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", DISCOVERY_LOCK)


async def device_status(conn: Connection) -> dict[str, str]:
    return {r["name"]: r["status"] for r in await conn.fetch("SELECT name, status FROM devices")}


async def write_devices(conn: Connection, checks: Sequence[DeviceCheck]) -> None:
    await conn.executemany(
        """
        INSERT INTO devices AS d (name, base_url, status, version, model_count, last_error,
                                  last_seen_at)
        VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $3 = 'online' THEN now() END)
        ON CONFLICT (name) DO UPDATE SET
            base_url        = EXCLUDED.base_url,
            status          = EXCLUDED.status,
            version         = COALESCE(EXCLUDED.version, d.version),
            model_count     = COALESCE(EXCLUDED.model_count, d.model_count),
            last_error      = EXCLUDED.last_error,
            status_since    = CASE WHEN d.status = EXCLUDED.status THEN d.status_since
                                   ELSE now() END,
            last_checked_at = now(),
            last_seen_at    = COALESCE(EXCLUDED.last_seen_at, d.last_seen_at)
        """,
        [
            (
                c.device,
                c.base_url,
                c.status,
                c.version,
                None if c.error else len(c.models),
                c.error,
            )
            for c in checks
        ],
    )


async def forget_devices(conn: Connection, names: Sequence[str]) -> None:
    await conn.execute("DELETE FROM devices WHERE name = ANY($1::text[])", list(names))


async def devices(conn: Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT name, base_url, status, version, model_count, last_error, status_since,"
        " last_checked_at, last_seen_at FROM devices ORDER BY name"
    )
