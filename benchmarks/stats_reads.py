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
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx

from benchmarks.harness import bench_headers, fresh_database, service_env
from services.embedded import EmbeddedNats, EmbeddedPostgres, free_port
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
        for r in range(1, args.rounds + 1):
            rounds.append(await measure(base, args.users, args.models, args.requests))
            print(
                f"round {r}: "
                + ", ".join(f"{k} p99 {pct(v, 0.99):.1f}" for k, v in rounds[-1].items()),
                flush=True,
            )
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
        pg.stop()
        nats_server.stop()
    print(
        f"\n{args.users} users x {args.models} models x {args.sessions} sessions over "
        f"{args.days} days, {args.rounds} rounds of {args.requests} requests per read, "
        f"one at a time, {os.cpu_count()} cores; milliseconds, median over rounds:"
    )
    print(f"{'read':24} {'p50':>7} {'p99':>7}")
    for name in rounds[0]:
        p50 = statistics.median(pct(r[name], 0.5) for r in rounds)
        p99 = statistics.median(pct(r[name], 0.99) for r in rounds)
        print(f"{name:24} {p50:7.1f} {p99:7.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
