"""stats reads with a large history: the leaderboard (per user, each window; global) and the
model record (one model; all my models) through the HTTP API of a stats process, over a
history of USERS x MODELS x SESSIONS records written straight into its tables (as the
consumers would have left them: the per-session records, the per-user totals, DAYS days of
per-user aggregates and the global ones).

    python -m benchmarks.stats_reads [--users 10000] [--models 50] [--sessions 10]
                                     [--days 10] [--requests 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx

from benchmarks.harness import BENCH_JWT_SECRET, bench_headers, fresh_database, service_env
from services.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.runtime.auth import Verifier
from services.runtime.db import Login, acting_for, create_pool
from services.stack import spawn_service, wait_until_up

COUNTERS = (
    "response_count, total_brains, dismissal_count, sessions_appeared, sessions_dismissed,"
    " prompt_tokens, completion_tokens, cost_usd, unpriced_calls"
)


async def load_history(db: str, users: int, models: int, sessions: int, days: int) -> None:
    conn = await asyncpg.connect(db)
    try:
        await conn.execute("SET search_path = stats")
        t0 = time.perf_counter()
        await conn.execute(
            """
            INSERT INTO model_statistics (user_id, model_id, session_id, response_count,
                total_brains, dismissal_count, prompt_tokens, completion_tokens, cost_usd,
                first_used_at, last_used_at, appeared_at, dismissed_at)
            SELECT 'user-' || u, 'vendor/model-' || m, 'session-' || s, 10 + (u + m) % 7,
                   (u * m + s) % 9, (u + s) % 2, 1000, 500, 0.01,
                   now() - make_interval(days => s % $4), now() - make_interval(days => s % $4),
                   now() - make_interval(days => s % $4),
                   CASE WHEN (u + s) % 2 = 1 THEN now() - make_interval(days => s % $4) END
            FROM generate_series(1, $1) u, generate_series(1, $2) m, generate_series(1, $3) s
            """,
            users,
            models,
            sessions,
            days,
        )
        t1 = time.perf_counter()
        await conn.execute(
            f"""
            INSERT INTO user_model_daily (user_id, day, model_id, {COUNTERS})
            SELECT user_id, appeared_at::date, model_id, sum(response_count), sum(total_brains),
                   sum(dismissal_count), count(*), count(dismissed_at), sum(prompt_tokens),
                   sum(completion_tokens), sum(cost_usd), 0
            FROM model_statistics GROUP BY 1, 2, 3
            """
        )
        await conn.execute(
            f"""
            INSERT INTO user_model_totals (user_id, model_id, {COUNTERS}, first_used_at,
                last_used_at)
            SELECT user_id, model_id, sum(response_count), sum(total_brains),
                   sum(dismissal_count), count(*), count(dismissed_at), sum(prompt_tokens),
                   sum(completion_tokens), sum(cost_usd), 0, min(first_used_at),
                   max(last_used_at)
            FROM model_statistics GROUP BY 1, 2
            """
        )
        await conn.execute(
            f"""
            INSERT INTO model_daily (day, model_id, {COUNTERS})
            SELECT day, model_id, sum(response_count), sum(total_brains), sum(dismissal_count),
                   sum(sessions_appeared), sum(sessions_dismissed), sum(prompt_tokens),
                   sum(completion_tokens), sum(cost_usd), 0
            FROM user_model_daily GROUP BY 1, 2
            """
        )
        await conn.execute("VACUUM ANALYZE")
        sizes = await conn.fetch(
            "SELECT relname, n_live_tup FROM pg_stat_user_tables WHERE schemaname = 'stats'"
            " AND n_live_tup > 0 ORDER BY relname"
        )
        print(
            f"history written in {time.perf_counter() - t0:.0f} s (records {t1 - t0:.0f} s): "
            + ", ".join(f"{r['relname']} {r['n_live_tup']:,}" for r in sizes),
            flush=True,
        )
    finally:
        await conn.close()


async def timed(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = await client.get(url, headers=headers)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise AssertionError(f"{url}: {r.status_code} {r.text[:200]}")
    return elapsed * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(base: str, users: int, models: int, requests: int) -> dict[str, list[float]]:
    rng = random.Random(7)
    reads: dict[str, Callable[[str], str]] = {
        "leaderboard 7d": lambda u: "/v1/leaderboard?window=7d",
        "leaderboard 30d": lambda u: "/v1/leaderboard?window=30d",
        "leaderboard all": lambda u: "/v1/leaderboard?window=all",
        "record of one model": lambda u: f"/v1/models/vendor/model-{rng.randint(1, models)}/stats",
        "all my models": lambda u: "/v1/stats/models?sort=total_brains",
        "spend per day": lambda u: "/v1/spend?group_by=day&days=30",
    }
    results: dict[str, list[float]] = {name: [] for name in [*reads, "global leaderboard 30d"]}
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        operator = bench_headers("ops", "operator")
        for _ in range(requests):
            user = f"user-{rng.randint(1, users)}"
            headers = bench_headers(user, "user")
            for name, path in reads.items():
                results[name].append(await timed(client, path(user), headers))
        for _ in range(max(20, requests // 10)):
            results["global leaderboard 30d"].append(
                await timed(client, "/v1/leaderboard/global?window=30d", operator)
            )
    return results


async def row_level_security(db: str, on: bool) -> None:
    """Row-level security on (enabled and forced, as the migrations leave it) or off on
    every stats table that has policies, as the administrator."""
    conn = await asyncpg.connect(db)
    try:
        tables = await conn.fetch(
            "SELECT DISTINCT format('%I.%I', schemaname, tablename) FROM pg_policies"
            " WHERE schemaname = 'stats'"
        )
        for (table,) in tables:
            if on:
                await conn.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
                await conn.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
            else:
                await conn.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
                await conn.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    finally:
        await conn.close()


async def request_security_overhead(db: str, users: int, n: int = 2000) -> tuple[float, float]:
    """What a read pays for authentication and for acting as the user, apart from its
    query, in microseconds per request (median): verifying its bearer token (HS256, as
    the service does), and the statement that sets the role and claims of the request's
    transaction (Runtime.as_user), against a plain transaction on the same pool."""
    verifier = Verifier(secret=BENCH_JWT_SECRET)
    tokens = [bench_headers(f"user-{i % users + 1}", "user")["Authorization"][7:] for i in range(n)]
    verify_us = []
    for token in tokens:
        t0 = time.perf_counter()
        await verifier.verify(token)
        verify_us.append((time.perf_counter() - t0) * 1e6)
    pool = await create_pool(Login(db, "stats", "stats_app"), 2, "bench")
    plain_us, acting_us = [], []
    try:
        for i in range(n // 4):
            t0 = time.perf_counter()
            async with pool.acquire() as conn, conn.transaction():
                await conn.fetchval("SELECT 1")
            t1 = time.perf_counter()
            async with acting_for(pool, "stats", {"sub": f"user-{i}", "role": "user"}) as acting:
                await acting.fetchval("SELECT 1")
            t2 = time.perf_counter()
            plain_us.append((t1 - t0) * 1e6)
            acting_us.append((t2 - t1) * 1e6)
    finally:
        await pool.close()
    return statistics.median(verify_us), statistics.median(acting_us) - statistics.median(plain_us)


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    nats_server, pg = EmbeddedNats(tmp / "nats"), EmbeddedPostgres(tmp / "pg")
    nats_server.start()
    pg.start()
    proc = None
    try:
        db = await fresh_database(pg.url)
        port = free_port()
        proc = spawn_service("stats", service_env(nats_server.url, db, port), tmp / "stats.log")
        base = f"http://127.0.0.1:{port}"
        await wait_until_up(base, proc)  # migrated
        await load_history(db, args.users, args.models, args.sessions, args.days)
        rounds: list[dict[str, list[float]]] = []
        without: list[dict[str, list[float]]] = []  # row-level security off
        for r in range(1, args.rounds + 1):
            # alternate which goes first, so both see the same weather
            for rls in (True, False) if r % 2 or not args.security_cost else (False, True):
                if not rls and not args.security_cost:
                    continue
                await row_level_security(db, rls)
                results = await measure(base, args.users, args.models, args.requests)
                (rounds if rls else without).append(results)
                print(
                    f"round {r}{'' if rls else ' (row-level security off)'}: "
                    + ", ".join(f"{k} p99 {pct(v, 0.99):.1f}" for k, v in results.items())
                    + f"; load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            await row_level_security(db, True)
        overhead = await request_security_overhead(db, args.users)
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
        pg.stop()
        nats_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n{args.users} users x {args.models} models x {args.sessions} sessions over "
        f"{args.days} days, {args.rounds} rounds of {args.requests} requests per read, "
        f"one at a time, {os.cpu_count()} cores; milliseconds, median over rounds:"
    )
    print(f"{'read':24} {'p50':>7} {'p99':>7}" + ("  RLS off: p50 / p99" if without else ""))
    for name in rounds[0]:
        p50 = statistics.median(pct(r[name], 0.5) for r in rounds)
        p99 = statistics.median(pct(r[name], 0.99) for r in rounds)
        line = f"{name:24} {p50:7.1f} {p99:7.1f}"
        if without:
            off50 = statistics.median(pct(r[name], 0.5) for r in without)
            off99 = statistics.median(pct(r[name], 0.99) for r in without)
            line += f"  {off50:7.1f} / {off99:7.1f}"
        print(line)
    print(
        f"per request, medians: verifying the token {overhead[0]:.0f} us; acting as the user"
        f" (role and claims of the transaction) {overhead[1]:.0f} us more than a plain one"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--security-cost",
        action="store_true",
        help="each round also with row-level security off on the stats tables (issue 12)",
    )
    asyncio.run(main(parser.parse_args()))
