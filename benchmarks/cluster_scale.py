"""Scale-out figures on a three-node JetStream cluster on this host (fsync always), with
PostgreSQL and service processes started here:

- failover: stats replicas consume a steady flow of subtask.completed (published with
  `publish_until_acknowledged`, as every publish path retries) while the node leading the
  stream is killed (SIGKILL) and later started again. Printed: the publish gap (longest time
  without a PubAck), how long the consumers counted nothing after the kill, and events lost
  and counted twice.
- ingest: stats with 1 and 3 replicas on R1 and R3 streams, a backlog-free run of N events
  published as fast as the PubAcks come, timed to the last one counted; the CPU the stats
  processes spent per event.
- dispatch: the planner with 1 and 3 replicas on the same DAG and agent pool
  (`benchmarks.planner_dag`), the p50/p99 of dispatch latency.

    python -m benchmarks.cluster_scale [failover|ingest|dispatch ...] [--rounds 2]

Every setup is measured in the same run, interleaved, on fresh databases and streams; the
temporary directories and every process are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import nats
from nats.js import JetStreamContext

from benchmarks.harness import bench_headers, cpu_seconds, fresh_database, service_env
from benchmarks.planner_dag import AgentPool, layered_dag, percentile
from contracts import STREAMS
from contracts.catalog import stream_for
from contracts.events import SubtaskCompleted
from services.embedded import EmbeddedNatsCluster, EmbeddedPostgres, free_port
from services.runtime.messaging import ensure_streams, publish_until_acknowledged
from services.stack import CLUSTER_SYNC_INTERVAL, spawn_service, wait_until_up

SUBJECT = SubtaskCompleted.subject
STREAM = stream_for(SUBJECT).name
STATS_CONSUMER = "stats-subtask-completed"  # stats' durable consumer of subtask.completed
COUNTED = "SELECT coalesce(sum(response_count), 0) FROM stats.model_statistics"


@dataclass
class Servers:
    home: Path
    nats: EmbeddedNatsCluster
    pg: EmbeddedPostgres


@contextmanager
def servers() -> Iterator[Servers]:
    home = Path(tempfile.mkdtemp(prefix="fleet-cluster-bench-"))
    cluster = EmbeddedNatsCluster(home / "nats", sync_interval=CLUSTER_SYNC_INTERVAL)
    pg = EmbeddedPostgres(home / "pg")
    try:
        cluster.start()
        pg.start()
        yield Servers(home, cluster, pg)
    finally:
        cluster.stop()
        pg.remove()
        shutil.rmtree(home, ignore_errors=True)


def event(i: int) -> SubtaskCompleted:
    return SubtaskCompleted(
        plan_id=f"plan-{i // 10}",
        subtask_id=f"st-{i}",
        model_id=f"vendor/model-{i % 20}",
        user_id=f"user-{i % 50}",
        session_id="bench",
        prompt_tokens=100,
        completion_tokens=50,
    )


async def fresh_streams(js: JetStreamContext, replicas: int) -> None:
    for spec in STREAMS:
        with suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(spec.name)
    await ensure_streams(js, replicas=replicas)


async def start_services(
    service: str, k: int, s: Servers, db: str, replicas: int, extra: dict[str, str] | None = None
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """k processes of `service`, ready; and their URLs."""
    procs, ports = [], []
    for i in range(k):
        port = free_port()
        env = {
            **service_env(s.nats.url, db, port),
            "NATS_STREAM_REPLICAS": str(replicas),
            "CONSUMER_ACK_WAIT_S": "5",
            **(extra or {}),
        }
        procs.append(spawn_service(service, env, s.home / f"{service}-{i}.log"))
        ports.append(port)
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, proc in zip(urls, procs, strict=True):
            await wait_until_up(url, proc, timeout=120)
    except BaseException:
        stop(procs)
        raise
    return procs, urls


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def counted_all(conn: asyncpg.Connection, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await conn.fetchval(COUNTED) >= n:
            return
        await asyncio.sleep(0.01)


async def exact(db: str, n: int) -> tuple[int, int]:
    """(lost, counted twice) once everything sent is counted or 60 s passed."""
    conn = await asyncpg.connect(db)
    try:
        await counted_all(conn, n, 60)
        await asyncio.sleep(1)  # a late duplicate would land here
        counted = int(await conn.fetchval(COUNTED))
        inbox = int(await conn.fetchval("SELECT count(*) FROM stats.inbox"))
    finally:
        await conn.close()
    return max(0, n - counted), max(0, counted - n) + max(0, inbox - n)


# --- failover ---------------------------------------------------------------------------


async def failover_round(s: Servers, rate: float = 200, seconds: float = 20) -> dict[str, float]:
    nodes = s.nats.url.split(",")
    nc = await nats.connect(nodes, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    js = nc.jetstream()
    db = await fresh_database(s.pg.url)
    await fresh_streams(js, 3)
    procs, _ = await start_services("stats", 2, s, db, 3)
    acks: list[float] = []
    counts: list[tuple[float, int]] = []
    killed_at = 0.0
    published = 0
    stop_watch = asyncio.Event()

    async def publisher() -> None:
        nonlocal published
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds:
            e = event(i)
            await publish_until_acknowledged(
                js, SUBJECT, e.model_dump_json().encode(), {"Nats-Msg-Id": str(e.event_id)}
            )
            acks.append(time.perf_counter())
            published = i = i + 1
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))

    async def watcher() -> None:
        conn = await asyncpg.connect(db)
        try:
            while not stop_watch.is_set():
                counts.append((time.perf_counter(), int(await conn.fetchval(COUNTED))))
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    async def fault() -> None:
        nonlocal killed_at
        await asyncio.sleep(seconds * 0.3)
        info = await js.stream_info(STREAM)
        assert info.cluster is not None and info.cluster.leader
        leader = s.nats.node_named(info.cluster.leader)
        killed_at = time.perf_counter()
        leader.kill()
        await asyncio.sleep(seconds * 0.4)
        leader.start()
        s.nats.wait_healthy()

    watching = asyncio.create_task(watcher())
    try:
        await asyncio.gather(publisher(), fault())
        lost, twice = await exact(db, published)
    finally:
        stop_watch.set()
        await watching
        stop(procs)
        await nc.close()
    gaps = [b - a for a, b in itertools.pairwise(acks) if b >= killed_at]
    after = [(t, c) for t, c in counts if t >= killed_at]
    stalled, since = 0.0, after[0]
    for t, c in after[1:]:
        if c > since[1]:
            stalled = max(stalled, t - since[0])
            since = (t, c)
    return {
        "publish gap s": max(gaps),
        "consumers counted nothing for s": stalled,
        "lost": lost,
        "counted twice": twice,
        "events": published,
    }


# --- ingest -----------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and its children, alive or exited (PostgreSQL's
    postmaster and its backends, each in a session of its own), from /proc (Linux)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if stat.parent.name == str(pid) or int(fields[1]) == pid:
            total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Ingest:
    per_s: float
    stats_us: float  # CPU per event of the stats processes, µs
    postgres_us: float
    nats_us: float  # the three nodes


async def ingest_round(s: Servers, k: int, replicas: int, n: int) -> Ingest:
    """Events/s and CPU per event consuming a backlog of n events: published
    while the durable consumer is paused (so neither the publishing nor the replicas'
    start-up is timed), timed from its resumption to the last event counted."""
    nc = await nats.connect(s.nats.url.split(","))
    js = nc.jetstream(publish_async_max_pending=2000)
    db = await fresh_database(s.pg.url)
    await fresh_streams(js, replicas)
    procs, _ = await start_services("stats", k, s, db, replicas)
    try:
        an_hour = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
        await js.pause_consumer(STREAM, STATS_CONSUMER, an_hour)
        for start in range(0, n, 1000):
            acks = [
                await js.publish_async(SUBJECT, event(i).model_dump_json().encode())
                for i in range(start, min(n, start + 1000))
            ]
            await asyncio.gather(*acks)
        assert s.pg.proc is not None
        nodes = [node.proc.pid for node in s.nats.nodes if node.proc is not None]
        cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        pg0, nats0 = tree_cpu_seconds(s.pg.proc.pid), sum(cpu_seconds(p) for p in nodes)
        t0 = time.perf_counter()
        await js.resume_consumer(STREAM, STATS_CONSUMER)
        conn = await asyncpg.connect(db)
        try:
            await counted_all(conn, n, 600)
        finally:
            await conn.close()
        t1 = time.perf_counter()
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
        pg_cpu = tree_cpu_seconds(s.pg.proc.pid) - pg0
        nats_cpu = sum(cpu_seconds(p) for p in nodes) - nats0
        lost, twice = await exact(db, n)
        assert (lost, twice) == (0, 0), (lost, twice)
        return Ingest(n / (t1 - t0), cpu / n * 1e6, pg_cpu / n * 1e6, nats_cpu / n * 1e6)
    finally:
        stop(procs)
        await nc.close()


# --- dispatch ---------------------------------------------------------------------------


async def dispatch_round(s: Servers, k: int, subtasks: int) -> tuple[float, float]:
    """(p50 ms, p99 ms) of dispatch latency with k planner replicas."""
    nc = await nats.connect(s.nats.url.split(","))
    js = nc.jetstream()
    db = await fresh_database(s.pg.url)
    await fresh_streams(js, 3)
    dag = layered_dag(subtasks, seed=42)
    extra = {"HTTP_MAX_BODY_BYTES": str(16 << 20)}
    procs, urls = await start_services("planner", k, s, db, 3, extra)
    pool = AgentPool(nc, {d["subtask_id"]: d["depends_on"] for d in dag})
    try:
        await pool.start()
        url = urls[-1]  # any replica: each answers for all
        body = {
            "task_id": f"bench-{uuid.uuid4()}",
            "user_id": "bench",
            "session_id": "bench",
            "original_task": "a random layered DAG",
            "subtasks": dag,
        }
        async with httpx.AsyncClient(timeout=300, headers=bench_headers()) as client:
            (await client.post(f"{url}/v1/plans", json=body)).raise_for_status()
        assert pool.plan_completed is not None
        await asyncio.wait_for(pool.plan_completed, timeout=600)
        await pool.stop()
        latencies = pool.latencies_ms()
        return percentile(latencies, 0.5), percentile(latencies, 0.99)
    finally:
        stop(procs)
        await nc.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", nargs="*", default=["failover", "ingest", "dispatch"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--subtasks", type=int, default=2000)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with servers() as s:
        if "failover" in args.what:
            results = [await failover_round(s) for _ in range(args.rounds)]
            print("\n## failover (stream leader SIGKILLed, 2 stats replicas, 200 events/s)")
            for key in results[0]:
                values = [r[key] for r in results]
                print(f"- {key}: median {statistics.median(values):.2f} (rounds: {values})")
        if "ingest" in args.what:
            setups = [(1, 1), (3, 1), (1, 3), (3, 3)]
            found: dict[tuple[int, int], list[Ingest]] = {x: [] for x in setups}
            for _ in range(args.rounds):
                for k, r in setups:
                    found[(k, r)].append(await ingest_round(s, k, r, args.events))
                    print(f"  ingest {k} replicas R{r}: {found[(k, r)][-1]}", flush=True)
            print(f"\n## stats ingest ({args.events} events, medians of {args.rounds})")
            print(
                "| stats replicas | stream | events/s | vs 1 replica R1 |"
                " CPU µs/event: stats | PostgreSQL | NATS (3 nodes) |"
            )
            print("|---|---|---|---|---|---|---|")
            base = statistics.median(x.per_s for x in found[(1, 1)])
            for k, r in setups:
                rounds = found[(k, r)]
                rate = statistics.median(x.per_s for x in rounds)
                cpu = [
                    statistics.median(getattr(x, a) for x in rounds)
                    for a in ("stats_us", "postgres_us", "nats_us")
                ]
                print(
                    f"| {k} | R{r} | {rate:,.0f} | {rate / base:.2f}x | {cpu[0]:,.0f} |"
                    f" {cpu[1]:,.0f} | {cpu[2]:,.0f} |"
                )
        if "dispatch" in args.what:
            got: dict[int, list[tuple[float, float]]] = {1: [], 3: []}
            for _ in range(args.rounds):
                for k in (1, 3):
                    got[k].append(await dispatch_round(s, k, args.subtasks))
                    print(f"  dispatch {k} replicas: {got[k][-1]}", flush=True)
            print(f"\n## planner dispatch ({args.subtasks} subtasks, R3, medians of {args.rounds})")
            print("| planner replicas | p50 ms | p99 ms |")
            print("|---|---|---|")
            for k in (1, 3):
                p50 = statistics.median(a for a, _ in got[k])
                p99 = statistics.median(b for _, b in got[k])
                print(f"| {k} | {p50:.1f} | {p99:.1f} |")
    print(f"load average at end: {os.getloadavg()}", flush=True)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # a SIGTERM cleans up as Ctrl-C does


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    asyncio.run(main())
