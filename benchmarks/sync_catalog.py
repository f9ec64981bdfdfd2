"""sync catalog: a 550-model OpenRouter response parsed, filtered, ranked, diffed against the
stored catalog, upserted, and its events written to the outbox — everything a run does
after the response has arrived (network excluded), timed around `apply_catalog`.

    python -m benchmarks.sync_catalog [--models 550] [--rounds 5]

Each round starts on a fresh database: a first sync (every model added: 550 rows, 550
`model.synced` + 1 `sync.completed`), then the same response again (unchanged: 0 model rows,
0 `model.synced`, the run's own `sync.completed` only), then one in which 10% of the prices
moved. The catalog is built from the real responses in ../shared/data/openrouter (models of
all three days, then copies of them under new ids up to the count), or from the project's
fixtures in tests/fixtures/openrouter when that folder is absent. Every output modality,
variable price and price is kept: the most rows and events a run can write. Target
(issue 3): a first sync within 0.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.harness import fresh_database
from services.embedded import EmbeddedPostgres
from services.runtime.db import RUNTIME_MIGRATIONS, Login, create_pool, load_migrations, migrate
from services.sync import db
from services.sync.catalog import apply_catalog
from services.sync.domain import SelectionRules, parse_catalog, select

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "openrouter"
FIXTURES = ROOT / "tests" / "fixtures" / "openrouter"
MIGRATIONS = ROOT / "services" / "sync" / "migrations"


def rules_keeping(entries: list[dict[str, Any]]) -> SelectionRules:
    """Every model kept: the most rows and events a run can write."""
    outputs = {m for e in entries for m in e["architecture"]["output_modalities"]}
    return SelectionRules(
        max_price_per_1m=Decimal(1_000_000),
        top_n=100_000,
        include_variable_price=True,
        output_modalities=frozenset(outputs),
    )


def listed_entries(paths: list[Path]) -> list[dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for path in paths:
        if path.exists():
            for e in json.loads(path.read_bytes())["data"]:
                entries.setdefault(e["id"], e)
    return list(entries.values())


def catalog(n: int) -> tuple[list[dict[str, Any]], str]:
    real = listed_entries(
        [DATA / f"{day}.json" for day in ("2026-04-02", "2026-03-13", "2025-07-29")]
    )
    base = real or listed_entries(sorted(FIXTURES.glob("catalog-*.json")))
    entries = list(base)
    copies = 0
    while len(entries) < n:
        e = copy.deepcopy(base[copies % len(base)])
        copies += 1
        e["id"] = f"{e['id']}-copy{copies}"
        entries.append(e)
    source = (
        f"{len(base)} {'real' if real else 'fixture'} entries from {DATA if real else FIXTURES}"
    )
    return entries[:n], source + (f" + {copies} copies under new ids" if copies else "")


def repriced(entries: list[dict[str, Any]], every: int) -> list[dict[str, Any]]:
    moved = copy.deepcopy(entries)
    for e in moved[::every]:
        if e["pricing"]["prompt"] != "-1":
            e["pricing"]["prompt"] = str(Decimal(e["pricing"]["prompt"]) + Decimal("0.0000001"))
    return moved


async def timed_run(
    pool: asyncpg.Pool, body: bytes, rules: SelectionRules
) -> tuple[float, int, int]:
    """Seconds for one run over `body`; model rows written; model.synced events written."""
    async with pool.acquire() as conn:
        run_id = uuid.uuid4()
        await db.insert_run(conn, run_id, "benchmark")
        versions = await conn.fetch("SELECT model_id, xmin::text FROM models")
        last_event = await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox")
        t0 = time.perf_counter()
        await apply_catalog(conn, run_id, body, rules)
        seconds = time.perf_counter() - t0
        after = await conn.fetch("SELECT model_id, xmin::text FROM models")
        written = len(set(map(tuple, after)) - set(map(tuple, versions)))
        synced = await conn.fetchval(
            "SELECT count(*) FROM outbox WHERE id > $1 AND subject = 'model.synced'", last_event
        )
    return seconds, written, synced


async def main(n: int, rounds: int) -> None:
    entries, source = catalog(n)
    rules = rules_keeping(entries)
    bodies = {
        "first sync": json.dumps({"data": entries}).encode(),
        "unchanged": json.dumps({"data": entries}).encode(),
        "10% repriced": json.dumps({"data": repriced(entries, 10)}).encode(),
    }
    print(f"{n} models ({source}), body {len(bodies['first sync']) / 1e6:.2f} MB", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-sync-"))
    pg = EmbeddedPostgres(tmp / "pg")
    pg.start()
    results: dict[str, list[float]] = {k: [] for k in bodies}
    pure: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        select(parse_catalog(bodies["first sync"]).models, rules)
        pure.append(time.perf_counter() - t0)
    try:
        for r in range(1, rounds + 1):
            url = await fresh_database(pg.url)
            await migrate(url, "sync", load_migrations(RUNTIME_MIGRATIONS, MIGRATIONS))
            pool = await create_pool(Login(url, "sync", "sync_app"), 2, application="bench")
            try:
                line = []
                for scenario, body in bodies.items():
                    seconds, written, synced = await timed_run(pool, body, rules)
                    results[scenario].append(seconds)
                    line.append(
                        f"{scenario} {seconds * 1000:6.1f} ms ({written} rows, {synced} events)"
                    )
                print(f"round {r}: " + " | ".join(line), flush=True)
            finally:
                await pool.close()
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{rounds} rounds, {os.cpu_count()} cores, {platform.processor() or '?'}, "
          "embedded PostgreSQL, network excluded")  # fmt: skip
    for scenario, values in results.items():
        print(f"{scenario:>13}: median {statistics.median(values) * 1000:6.1f} ms")
    pure_ms = statistics.median(pure) * 1000
    print(f"of which parse + filter + rank (no database): median {pure_ms:.1f} ms")
    first = statistics.median(results["first sync"])
    print(f"target: first sync <= 500 ms: {'met' if first <= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=550)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.models, args.rounds))
