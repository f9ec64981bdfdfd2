"""Throughput of short benchmark jobs while one slow job is in flight.

    python -m benchmarks.benchmark_jobs [--jobs 20] [--rounds 3] [--source DIR]

One benchmark service runs as its own process (as in production) against embedded NATS
and PostgreSQL and a fake Ollama server in this process. A slow job (one run streaming for
`--slow-s` seconds) is submitted first; once its stream is under way, `--jobs` short jobs
(one run of about 70 ms each) are submitted at once, each by its own user. Figures: short
jobs per second from the first submission to the last one completed, and when the first
short job completed. `--source DIR` runs the service from another checkout of the
repository (for the figures before a change: `git archive <commit> | tar -x -C DIR`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from benchmarks.harness import bench_headers, fresh_database, service_env
from services.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.stack import spawn_service, wait_until_up
from tests.fakes import FakeModelServer, Script

SHORT = Script(ttft_s=0.02, gap_s=0.01, chunks=tuple((f" t{i}", 1) for i in range(5)))


def slow_script(seconds: float) -> Script:
    chunks = max(1, int(seconds / 0.2))
    return Script(ttft_s=0.02, gap_s=0.2, chunks=tuple((f" s{i}", 1) for i in range(chunks)))


async def one_round(
    nats_url: str, admin_url: str, source: Path | None, jobs: int, slow_s: float, logs: Path
) -> tuple[float, float]:
    slow = slow_script(slow_s)

    slow_started = asyncio.Event()

    def script(_: int, body: dict[str, Any]) -> Script:
        if body.get("model") == "slow":
            slow_started.set()
            return slow
        return SHORT

    db = await fresh_database(admin_url)
    port = free_port()
    env = {**service_env(nats_url, db, port), "JOB_CLEANUP_INTERVAL": "24"}
    if source is not None:
        env["PYTHONPATH"] = str(source)
    async with FakeModelServer(script) as fake:
        env["OLLAMA_BASE_URL"] = fake.url
        cwd = os.getcwd()
        if source is not None:
            os.chdir(source)  # `python -m services.cli` from that checkout
        try:
            proc = spawn_service("benchmark", env, logs / "benchmark.log")
        finally:
            os.chdir(cwd)
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_until_up(url, proc)
            async with httpx.AsyncClient(
                base_url=url, timeout=30, headers=bench_headers("slow-user", "user")
            ) as http:
                body = {"provider": "ollama", "task_type": "generate", "prompt": "p", "runs": 1}
                r = await http.post("/v1/benchmarks/run", json={**body, "model": "slow"})
                assert r.status_code == 202, r.text
                await asyncio.wait_for(slow_started.wait(), 30)
                t0 = time.perf_counter()
                for i in range(jobs):
                    r = await http.post(
                        "/v1/benchmarks/run",
                        json={**body, "model": "short"},
                        headers=bench_headers(f"user-{i}", "user"),
                    )
                    assert r.status_code == 202, r.text
            conn = await asyncpg.connect(db)
            try:
                first = None
                while True:
                    done = await conn.fetchval(
                        "SELECT count(*) FROM benchmark.jobs"
                        " WHERE model = 'short' AND status = 'completed'"
                    )
                    if done and first is None:
                        first = time.perf_counter() - t0
                    if done >= jobs:
                        break
                    await asyncio.sleep(0.005)
                elapsed = time.perf_counter() - t0
            finally:
                await conn.close()
        finally:
            proc.terminate()
            proc.wait(30)
    assert first is not None
    return jobs / elapsed, first


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-s", type=float, default=20.0)
    parser.add_argument("--source", type=Path, help="run the service from this checkout")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-jobs-"))
    nats_server, pg = EmbeddedNats(tmp / "nats"), EmbeddedPostgres(tmp / "pg")
    nats_server.start()
    pg.start()
    rates, firsts = [], []
    try:
        for r in range(1, args.rounds + 1):
            rate, first = await one_round(
                nats_server.url, pg.url, args.source, args.jobs, args.slow_s, tmp
            )
            rates.append(rate)
            firsts.append(first)
            print(f"round {r}: {rate:7.2f} short jobs/s, first done after {first:6.2f} s")
    finally:
        pg.stop()
        nats_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"{args.jobs} short jobs beside one {args.slow_s:g} s job, {args.rounds} rounds, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, service from "
        f"{args.source or 'this checkout'}: median {statistics.median(rates):.2f} jobs/s, "
        f"first done after {statistics.median(firsts):.2f} s"
    )


if __name__ == "__main__":
    asyncio.run(main())
