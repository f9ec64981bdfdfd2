"""A benchmark worker killed with SIGKILL in the middle of a job: its lease runs out,
another worker takes the job over, and the job still ends in one final state, once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import uuid

import httpx
from nats.js import JetStreamContext

from services.benchmark.app import build
from services.embedded import free_port
from tests.conftest import Infra, bearer, eventually, running
from tests.fakes import FakeModelServer, Script
from tests.integration.test_benchmark_service import final_events, finished, request, settings

# ten chunks 80 ms apart: a run takes about 0.8 s, so the kill lands inside the job
SLOW = Script(ttft_s=0.05, gap_s=0.08, chunks=tuple((f" w{i}", 2) for i in range(10)))


async def test_a_job_whose_worker_is_killed_is_finished_once_by_another(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with FakeModelServer(SLOW) as fake:
        port = free_port()
        env = {
            **os.environ,
            "NATS_URL": infra.nats_url,
            "DATABASE_URL": database_url,
            "HTTP_PORT": str(port),
            "OLLAMA_BASE_URL": fake.url,
            "BENCHMARK_LEASE_S": "2",  # taken over two seconds after the heartbeats stop
            "BENCHMARK_HEARTBEAT_S": "0.5",
        }
        with tempfile.TemporaryFile() as log:
            doomed = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.cli",
                "run",
                "benchmark",
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", headers=bearer("tester", "user")
                ) as http:

                    async def ready() -> bool:
                        assert doomed.returncode is None, "the worker exited while starting"
                        try:
                            return (await http.get("/health/ready")).status_code == 200
                        except httpx.TransportError:
                            return False

                    await eventually(ready, timeout=30, what="the doomed worker ready")
                    r = await http.post("/v1/benchmarks/run", json=request(runs=3))
                    assert r.status_code == 202, r.text
                    job_id = r.json()["job_id"]

                    async def second_run_started() -> bool:
                        return len(fake.served) >= 2

                    await eventually(second_run_started, what="the job half done")
                    doomed_view = (await http.get(f"/v1/benchmarks/{job_id}")).json()
                doomed.send_signal(signal.SIGKILL)
            finally:
                if doomed.returncode is None:
                    doomed.kill()
                await doomed.wait()
                log.seek(0)
                doomed_log = log.read().decode(errors="replace")

        assert doomed_view["status"] == "running", doomed_log
        assert doomed_view["attempt"] == 1
        cut_off = [s for s in fake.served if s.finished_at is None]
        assert len(cut_off) == 1  # the kill landed mid-stream

        spec = build(
            settings(infra, database_url, fake, benchmark_lease_s=2.0, benchmark_heartbeat_s=0.5)
        )
        async with running(spec) as (runtime, client):
            job = await finished(client, job_id, timeout=30)
            async with runtime.pool.acquire() as conn:
                attempts = await conn.fetch(
                    "SELECT attempt, count(*) AS runs FROM job_runs WHERE job_id = $1"
                    " GROUP BY attempt ORDER BY attempt",
                    uuid.UUID(job_id),
                )
            events = await final_events(js, job_id)

    assert job["status"] == "completed"
    assert job["attempt"] == 2 and job["worker"] != doomed_view["worker"]
    assert job["started_at"] > doomed_view["started_at"]  # the second attempt's start
    assert job["started_at"] < job["finished_at"]
    assert (job["runs_done"], job["runs_failed"]) == (3, 0)
    assert job["summary"]["runs_ok"] == 3
    # the first attempt's progress stays behind it; the job shows only the second's runs
    assert [(a["attempt"], a["runs"]) for a in attempts] == [(1, 1), (2, 3)]
    assert len(events) == 1 and events[0]["subject"] == "benchmark.completed"
    assert events[0]["summary"] == job["summary"]
