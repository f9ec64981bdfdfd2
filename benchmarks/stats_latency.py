"""stats end to end: publish -> visible, at a steady rate of mixed events
(`subtask.completed`, `model.rewarded`, `model.dismissed`), for the stats service (visible
in its HTTP API: the session's roster, read as the event's user) and, in the same run on
the same messages, for a bare consumer (nats-py fetch + a plain INSERT, no inbox, no
aggregates, a push consumer inserting whatever has arrived; visible: its row can be
selected).

    python -m benchmarks.stats_latency [--rate 1000] [--seconds 30] [--probe-every 50] [--rounds 3]

Every `probe-every`-th event is a probe: its own user and session, so it is visible exactly
when it is applied. Every 2 ms one query per side looks for every outstanding probe (stats:
in the table its API reads; bare: its row); a probe stats has applied is then read through
the API (the session's roster, as the probe's user), and the time that answer arrives counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from benchmarks.harness import bench_headers, cpu_seconds, fresh_database, service_env
from benchmarks.stats_ingest import spawn
from contracts.catalog import FEEDBACK_STREAM, PLANS_STREAM
from contracts.events import ModelDismissed, ModelRewarded, SubtaskCompleted
from services.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.runtime.messaging import ensure_streams
from services.stack import spawn_service, wait_until_up

SUBJECTS = (
    ("subtask.completed", PLANS_STREAM.name),
    ("model.rewarded", FEEDBACK_STREAM.name),
    ("model.dismissed", FEEDBACK_STREAM.name),
)


Mixed = SubtaskCompleted | ModelRewarded | ModelDismissed


def event(i: int, probe: bool) -> Mixed:
    user = f"probe-{i}" if probe else f"user-{i % 500}"
    session, model = f"session-{i}" if probe else f"session-{i % 37}", f"vendor/model-{i % 20}"
    kind = i % 3
    if kind == 0:
        return SubtaskCompleted(
            plan_id="p",
            subtask_id=str(i),
            model_id=model,
            user_id=user,
            session_id=session,
            prompt_tokens=100,
            completion_tokens=50,
        )
    if kind == 1:
        return ModelRewarded(user_id=user, session_id=session, model_id=model)
    return ModelDismissed(user_id=user, session_id=session, model_id=model, reason="bench")


# --- the bare consumer: its own process, as in production --------------------------------


async def bare_consumer(nats_url: str, db_url: str) -> None:
    pool = await asyncpg.create_pool(db_url, min_size=3, max_size=3)
    await pool.execute("CREATE TABLE bare_events (event_id uuid PRIMARY KEY, body bytea)")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def consume(subject: str, stream: str) -> None:
        # a push consumer: each message is handed over as it arrives (nats-py's fetch() would
        # hold a message back until its batch is full or its timeout passes), and whatever
        # arrived while the last INSERT ran is the next batch
        arrived: list[Msg] = []
        wake = asyncio.Event()

        async def on_message(msg: Msg) -> None:
            arrived.append(msg)
            wake.set()

        await js.subscribe(
            subject,
            durable=f"bare-{subject.replace('.', '-')}",
            stream=stream,
            cb=on_message,
            manual_ack=True,
            config=ConsumerConfig(max_ack_pending=10_000),
        )
        while True:
            await wake.wait()
            wake.clear()
            msgs = arrived[:]
            del arrived[:]
            await pool.execute(
                "INSERT INTO bare_events"
                " SELECT (convert_from(b, 'UTF8')::jsonb ->> 'event_id')::uuid, b"
                " FROM unnest($1::bytea[]) b ON CONFLICT DO NOTHING",
                [m.data for m in msgs],
            )
            for m in msgs:
                await m.ack()

    tasks = [asyncio.create_task(consume(s, st)) for s, st in SUBJECTS]
    print("ready", flush=True)
    await asyncio.gather(*tasks)


# --- the run -----------------------------------------------------------------------------


async def run_round(
    nats_url: str, admin_url: str, js: JetStreamContext, args: argparse.Namespace, tmp: Path
) -> tuple[list[float], list[float]]:
    for stream in (PLANS_STREAM.name, FEEDBACK_STREAM.name):
        await js.delete_stream(stream)
    await ensure_streams(js)
    db = await fresh_database(admin_url)
    port = free_port()
    stats = spawn_service("stats", service_env(nats_url, db, port), tmp / "stats.log")
    bare = spawn(["-m", "benchmarks.stats_latency", "--bare", nats_url, db], {})
    stats_ms: list[float] = []
    bare_ms: list[float] = []
    try:
        assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
        await wait_until_up(f"http://127.0.0.1:{port}", stats)
        cpu_before = cpu_seconds(stats.pid), cpu_seconds(bare.pid)
        db_pool = await asyncpg.create_pool(db, min_size=4, max_size=8)
        api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
        # outstanding probes: event -> publish time; one poller for each side looks for all
        # of them at once every 2 ms, so watching adds little load of its own
        waiting_stats: dict[uuid.UUID, tuple[Mixed, float]] = {}
        waiting_bare: dict[uuid.UUID, float] = {}
        publishing = True

        async def poll_stats() -> None:
            while publishing or waiting_stats:
                if waiting_stats:
                    seen = await db_pool.fetch(
                        "SELECT user_id FROM stats.model_statistics WHERE user_id = ANY($1)",
                        [e.user_id for e, _ in waiting_stats.values()],
                    )
                    users = {r["user_id"] for r in seen}
                    # and the API shows it: the time its answer arrives counts (all such
                    # probes read at once, so one probe's read does not delay another's)
                    await asyncio.gather(
                        *(
                            read_roster(key, e, sent)
                            for key, (e, sent) in list(waiting_stats.items())
                            if e.user_id in users
                        )
                    )
                await asyncio.sleep(0.002)

        async def read_roster(key: uuid.UUID, e: Mixed, sent: float) -> None:
            r = await api.get(
                f"/v1/sessions/{e.session_id}/roster", headers=bench_headers(e.user_id, "user")
            )
            if r.status_code == 200 and any(
                m["model_id"] == e.model_id for m in r.json()["models"]
            ):
                stats_ms.append((time.perf_counter() - sent) * 1000)
                del waiting_stats[key]

        async def poll_bare() -> None:
            while publishing or waiting_bare:
                if waiting_bare:
                    seen = await db_pool.fetch(
                        "SELECT event_id FROM bare_events WHERE event_id = ANY($1)",
                        list(waiting_bare),
                    )
                    now = time.perf_counter()
                    for r in seen:
                        bare_ms.append((now - waiting_bare.pop(r["event_id"])) * 1000)
                await asyncio.sleep(0.002)

        pollers = asyncio.gather(poll_stats(), poll_bare())
        total = args.rate * args.seconds
        tick = 0.01
        per_tick = max(1, round(args.rate * tick))
        t0 = time.perf_counter()
        acks = []
        for i in range(total):
            if i % per_tick == 0:  # a steady rate: wait for this tick's start
                delay = t0 + (i // per_tick) * tick - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            probe = i % args.probe_every == 0
            e = event(i, probe)
            sent = time.perf_counter()
            acks.append(
                await js.publish_async(
                    e.subject,
                    e.model_dump_json().encode(),
                    headers={"Nats-Msg-Id": str(uuid.uuid4())},
                )
            )
            if probe:
                waiting_stats[e.event_id] = (e, sent)
                waiting_bare[e.event_id] = sent
        await asyncio.gather(*acks)
        achieved = total / (time.perf_counter() - t0)
        publishing = False
        await asyncio.wait_for(pollers, 120)
        print(f"    published {total} at {achieved:.0f}/s, {len(stats_ms)} probes", flush=True)
        # CPU per event: what the machine's load does not change much, unlike the latency
        stats_us = (cpu_seconds(stats.pid) - cpu_before[0]) / total * 1e6
        bare_us = (cpu_seconds(bare.pid) - cpu_before[1]) / total * 1e6
        print(
            f"    stats: {await consumer_figures(api)}; CPU per event: stats {stats_us:.0f} us,"
            f" bare consumer {bare_us:.0f} us",
            flush=True,
        )
        await api.aclose()
        await db_pool.close()
    finally:
        stats.terminate()
        stats.wait(30)
        bare.terminate()
        bare.wait(30)
    return stats_ms, bare_ms


async def consumer_figures(api: httpx.AsyncClient) -> str:
    """Batches applied, events per batch and time per batch of each stats consumer, from
    its own metrics (what explains a latency; the latency itself is measured outside)."""
    metrics = (await api.get("/metrics")).text
    values: dict[tuple[str, str], float] = {}
    for line in metrics.splitlines():
        for name in (
            "fleet_consumer_batch_seconds_count",
            "fleet_consumer_batch_seconds_sum",
            "fleet_events_applied_total",
            "fleet_events_duplicate_total",
        ):
            if line.startswith(name + "{"):
                consumer = line.split('consumer="', 1)[1].split('"', 1)[0]
                values[(name, consumer)] = float(line.rsplit(" ", 1)[1])
    parts = []
    for consumer in sorted({c for _, c in values}):
        batches = values.get(("fleet_consumer_batch_seconds_count", consumer), 0)
        if not batches:
            continue
        seconds = values.get(("fleet_consumer_batch_seconds_sum", consumer), 0)
        applied = values.get(("fleet_events_applied_total", consumer), 0)
        dup = values.get(("fleet_events_duplicate_total", consumer), 0)
        parts.append(
            f"{consumer.removeprefix('stats-')} {batches:.0f} batches of {applied / batches:.1f}"
            f" in {seconds / batches * 1000:.1f} ms ({dup:.0f} duplicates)"
        )
    return ", ".join(parts)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    nats_server, pg = EmbeddedNats(tmp / "nats"), EmbeddedPostgres(tmp / "pg")
    nats_server.start()
    pg.start()
    rows: list[tuple[float, float, float, float]] = []
    try:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await ensure_streams(js)
        for r in range(1, args.rounds + 1):
            s, b = await run_round(nats_server.url, pg.url, js, args, tmp)
            rows.append((pct(s, 0.5), pct(s, 0.99), pct(b, 0.5), pct(b, 0.99)))
            print(
                f"round {r}: stats p50 {rows[-1][0]:.1f} p99 {rows[-1][1]:.1f} ms;"
                f" bare p50 {rows[-1][2]:.1f} p99 {rows[-1][3]:.1f} ms;"
                f" load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        await nc.close()
    finally:
        pg.stop()
        nats_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = [statistics.median(r[k] for r in rows) for k in range(4)]
    print(
        f"\n{args.rate} events/s for {args.seconds} s, every {args.probe_every}th a probe, "
        f"{args.rounds} rounds, {os.cpu_count()} cores; publish -> visible, median of rounds:"
    )
    print(f"stats (in its API):      p50 {med[0]:.1f} ms  p99 {med[1]:.1f} ms")
    print(f"bare consumer (its row): p50 {med[2]:.1f} ms  p99 {med[3]:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--probe-every", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare", nargs=2, metavar=("NATS_URL", "DB_URL"))
    parsed = parser.parse_args()
    if parsed.bare:
        asyncio.run(bare_consumer(*parsed.bare))
        sys.exit(0)
    asyncio.run(main(parsed))
