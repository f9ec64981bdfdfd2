"""stats ingest: 50,000 `subtask.completed` published as fast as possible, timed from the
first publish to the last row committed, next to the raw ceiling of this machine measured
in the same run (nats-py JetStream fetch in batches of 100 + a plain batched INSERT, no inbox).

    python -m benchmarks.stats_ingest [--events 50000] [--rounds 3]

Both consumers run as their own process, as in production; the publisher is this process.
Every round starts on a fresh database and a fresh stream, and checks exactly-once at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import nats
from nats.js import JetStreamContext

from benchmarks.harness import cpu_seconds, fresh_database, service_env
from contracts import Event
from contracts.catalog import FEEDBACK_STREAM, PLANS_STREAM
from contracts.events import ModelDismissed, ModelRewarded, SubtaskCompleted
from services.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.runtime.messaging import ensure_streams
from services.stack import spawn_service, wait_until_up

USERS, MODELS, SESSIONS = 50, 20, 5  # 5,000 distinct (user, model, session) records


MIXED = False  # --mixed: completions, rewards and dismissals in turn (all three consumers)
SUBJECTS = (("subtask.completed", PLANS_STREAM.name),)
ALL_SUBJECTS = (
    ("subtask.completed", PLANS_STREAM.name),
    ("model.rewarded", FEEDBACK_STREAM.name),
    ("model.dismissed", FEEDBACK_STREAM.name),
)
# each event adds exactly one of these: what "every event counted" is checked against
COUNTED = "SELECT sum(response_count + total_brains + dismissal_count) FROM stats.model_statistics"


def event(i: int) -> Event:
    user, model = f"user-{i % USERS}", f"vendor/model-{(i // USERS) % MODELS}"
    session = f"session-{(i // (USERS * MODELS)) % SESSIONS}"
    if MIXED and i % 3 == 1:
        return ModelRewarded(user_id=user, session_id=session, model_id=model, brains=1)
    if MIXED and i % 3 == 2:
        return ModelDismissed(user_id=user, session_id=session, model_id=model)
    return SubtaskCompleted(
        plan_id=f"plan-{i // 10}",
        subtask_id=f"st-{i}",
        model_id=model,
        user_id=user,
        session_id=session,
        prompt_tokens=100,
        completion_tokens=50,
    )


def payloads(n: int) -> list[tuple[str, bytes]]:
    return [(e.subject, e.model_dump_json().encode()) for e in map(event, range(n))]


async def fresh_stream(js: JetStreamContext) -> None:
    for stream in {stream for _, stream in ALL_SUBJECTS}:
        await js.delete_stream(stream)
    await ensure_streams(js)


async def publish_all(js: JetStreamContext, bodies: list[tuple[str, bytes]]) -> float:
    t0 = time.perf_counter()
    acks = [await js.publish_async(subject, b) for subject, b in bodies]
    await asyncio.gather(*acks)
    return t0


async def wait_rows(db_url: str, query: str, expected: int, timeout: float = 300) -> float:
    conn = await asyncpg.connect(db_url)
    try:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if (await conn.fetchval(query) or 0) >= expected:
                return time.perf_counter()
            await asyncio.sleep(0.005)
        raise TimeoutError(f"{query} did not reach {expected}")
    finally:
        await conn.close()


# --- the ceiling: raw nats-py fetch(100) + plain INSERT, no inbox, no validation ----------


async def ceiling_consumer(nats_url: str, db_url: str, total: int) -> None:
    conn = await asyncpg.connect(db_url)
    await conn.execute("CREATE TABLE raw_events (id bigserial PRIMARY KEY, body bytea NOT NULL)")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    subjects = ALL_SUBJECTS if MIXED else SUBJECTS
    subs = [
        await js.pull_subscribe(subject, durable=f"ceiling-{i}", stream=stream)
        for i, (subject, stream) in enumerate(subjects)
    ]
    print("ready", flush=True)
    done = 0

    async def consume(sub: JetStreamContext.PullSubscription) -> None:
        nonlocal done
        while done < total:
            try:
                msgs = await sub.fetch(100, timeout=1)
            except TimeoutError:
                continue
            await pool.execute(
                "INSERT INTO raw_events (body) SELECT unnest($1::bytea[])", [m.data for m in msgs]
            )
            for m in msgs:
                await m.ack()
            done += len(msgs)

    pool = await asyncpg.create_pool(db_url, min_size=len(subs), max_size=len(subs))
    await asyncio.gather(*(consume(sub) for sub in subs))
    await pool.close()
    await nc.close()  # not drain(): it can wait out its timeout on the pull subscription
    await conn.close()


def spawn(args: list[str], env: dict[str, str], log: Path | None = None) -> subprocess.Popen[str]:
    out = log.open("a") if log else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, *args], env={**os.environ, **env}, stdout=out, stderr=out, text=True
    )


async def round_ceiling(nats_url: str, admin_url: str, js: JetStreamContext, n: int) -> float:
    await fresh_stream(js)
    db = await fresh_database(admin_url)
    mixed = ["--mixed"] if MIXED else []
    proc = spawn(["-m", "benchmarks.stats_ingest", *mixed, "--ceiling", nats_url, db, str(n)], {})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    t0 = await publish_all(js, payloads(n))
    t1 = await wait_rows(db, "SELECT count(*) FROM raw_events", n)
    proc.wait(30)
    return n / (t1 - t0)


STATS_TABLES_WITH_RLS = """
    SELECT c.oid::regclass FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'stats' AND c.relkind = 'r' AND c.relrowsecurity
"""


async def without_row_level_security(db: str) -> None:
    """Turn row-level security off on every stats table (as the administrator): what the
    same service costs without it."""
    conn = await asyncpg.connect(db)
    try:
        for r in await conn.fetch(STATS_TABLES_WITH_RLS):
            await conn.execute(f"ALTER TABLE {r[0]} NO FORCE ROW LEVEL SECURITY")
            await conn.execute(f"ALTER TABLE {r[0]} DISABLE ROW LEVEL SECURITY")
        assert not await conn.fetch(STATS_TABLES_WITH_RLS)
    finally:
        await conn.close()


async def stats_cpu(db: str, pid: int) -> tuple[float, dict[int, float]]:
    """CPU seconds so far of the stats process and of each of its PostgreSQL sessions: the
    work an event costs, which the machine's load changes far less than the throughput."""
    conn = await asyncpg.connect(db)
    try:
        backends = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'stats'"
        )
    finally:
        await conn.close()
    return cpu_seconds(pid), {r["pid"]: cpu_seconds(r["pid"]) for r in backends}


async def round_fleet(
    nats_url: str, admin_url: str, js: JetStreamContext, n: int, db_dir: Path, rls: bool = True
) -> float:
    await fresh_stream(js)
    db = await fresh_database(admin_url)
    port = free_port()
    proc = spawn_service("stats", service_env(nats_url, db, port), db_dir / "stats.log")
    try:
        await wait_until_up(f"http://127.0.0.1:{port}", proc)
        if not rls:
            await without_row_level_security(db)
        cpu_before = await stats_cpu(db, proc.pid)
        t0 = await publish_all(js, payloads(n))
        t1 = await wait_rows(db, COUNTED, n)
        after = await stats_cpu(db, proc.pid)
        python_us = (after[0] - cpu_before[0]) / n * 1e6
        sessions_us = sum(c - cpu_before[1].get(p, 0) for p, c in after[1].items()) / n * 1e6
        print(
            f"    CPU per event: stats {python_us:.0f} us, its PostgreSQL sessions"
            f" {sessions_us:.0f} us",
            flush=True,
        )
        print(f"    service log: {db_dir / 'stats.log'}", flush=True)
        await asyncio.sleep(1)  # a late duplicate would land here
        conn = await asyncpg.connect(db)
        total = await conn.fetchval(COUNTED)
        inbox = await conn.fetchval("SELECT count(*) FROM stats.inbox")
        records = await conn.fetchval("SELECT count(*) FROM stats.model_statistics")
        await conn.close()
        if (total, inbox) != (n, n):
            raise AssertionError(f"not exactly once: counted {total}, inbox {inbox}, sent {n}")
        print(f"    exactly once: {total} counted, {records} records", flush=True)
        return n / (t1 - t0)
    finally:
        proc.terminate()
        proc.wait(30)


async def main(n: int, rounds: int, rls_off: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    nats_server, pg = EmbeddedNats(tmp / "nats"), EmbeddedPostgres(tmp / "pg")
    nats_server.start()
    pg.start()
    ceiling: list[float] = []
    fleet: list[float] = []
    bare: list[float] = []  # stats without row-level security
    loads: list[float] = []
    try:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await ensure_streams(js)
        for r in range(1, rounds + 1):
            ceiling.append(await round_ceiling(nats_server.url, pg.url, js, n))
            print(f"round {r}: ceiling {ceiling[-1]:8.0f} events/s", flush=True)
            fleet.append(await round_fleet(nats_server.url, pg.url, js, n, tmp))
            print(f"round {r}: stats   {fleet[-1]:8.0f} events/s", flush=True)
            if rls_off:
                bare.append(await round_fleet(nats_server.url, pg.url, js, n, tmp, rls=False))
                print(f"round {r}: stats without row-level security {bare[-1]:8.0f} events/s")
            loads.append(os.getloadavg()[0])
            print(
                f"round {r}: ratio {fleet[-1] / ceiling[-1]:.2f}, load {loads[-1]:.1f}", flush=True
            )
        await nc.drain()
    finally:
        pg.stop()
        nats_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    c, f = statistics.median(ceiling), statistics.median(fleet)
    print(f"\n{n} events, {rounds} rounds, {os.cpu_count()} cores, {platform.processor() or '?'}")
    print(f"load average (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"ceiling (fetch 100 + plain INSERT): median {c:.0f} events/s")
    print(f"stats service (exactly once):       median {f:.0f} events/s  = {f / c:.2f}x ceiling")
    print(
        "median of the rounds' ratios:       "
        f"{statistics.median(x / y for x, y in zip(fleet, ceiling, strict=True)):.2f}x"
    )
    if bare:
        b = statistics.median(bare)
        print(
            f"stats without row-level security:   median {b:.0f} events/s  = {b / c:.2f}x"
            f" ceiling (with it: {f / b:.2f}x of without)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rls-off",
        action="store_true",
        help="also a round of stats with row-level security off on its tables, each round",
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="completions, rewards and dismissals in turn (all three consumers; the ceiling"
        " pulls the three subjects too)",
    )
    parser.add_argument("--ceiling", nargs=3, metavar=("NATS_URL", "DB_URL", "N"))
    args = parser.parse_args()
    MIXED = args.mixed
    if args.ceiling:
        asyncio.run(ceiling_consumer(args.ceiling[0], args.ceiling[1], int(args.ceiling[2])))
    else:
        asyncio.run(main(args.events, args.rounds, args.rls_off))
