"""benchmark jobs as users meet them: several at once per worker and across replicas, never
inside an open transaction, cancelled when asked, bounded per user and in time, and never
storing a key an upstream echoes back."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from services.benchmark.app import build
from services.runtime.service import Runtime
from tests.conftest import Infra, bearer, eventually, running
from tests.fakes import FakeModelServer, Script
from tests.integration.test_benchmark_service import (
    FAST,
    final_events,
    finished,
    request,
    settings,
)

# a run of 100 chunks 0.1 s apart: ten seconds, far longer than any test waits for it
SLOW = Script(ttft_s=0.01, gap_s=0.1, chunks=tuple((f" s{i}", 1) for i in range(100)))
QUICK_LEASE = {"benchmark_lease_s": 2.0, "benchmark_heartbeat_s": 0.2}


def by_model(n: int, body: dict[str, Any]) -> Script:
    return SLOW if str(body.get("model", "")).startswith("slow") else FAST


async def submit(client: httpx.AsyncClient, user: str = "alice", **fields: Any) -> str:
    r = await client.post(
        "/v1/benchmarks/run", json=request(**fields), headers=bearer(user, "user")
    )
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


async def view(client: httpx.AsyncClient, job_id: str, user: str = "alice") -> dict[str, Any]:
    r = await client.get(f"/v1/benchmarks/{job_id}", headers=bearer(user, "user"))
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()
    return job


async def streaming(fake: FakeModelServer, model: str, count: int = 1) -> None:
    async def started() -> bool:
        open_streams = [s for s in fake.served if s.finished_at is None and s.written_at]
        return sum(str(s.body["model"]) == model for s in open_streams) >= count

    await eventually(started, what=f"{count} stream(s) of {model} under way")


async def long_transactions(runtime: Runtime) -> int:
    """benchmark's connections idle inside a transaction opened over a second ago."""
    async with runtime.pool.acquire() as conn:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'benchmark'"
            " AND state LIKE 'idle in transaction%'"
            " AND xact_start < clock_timestamp() - interval '1 second'"
        )
    return count


async def test_a_quick_job_is_not_blocked_by_a_slow_one_nor_run_in_a_transaction(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with (
        FakeModelServer(by_model) as fake,
        running(build(settings(infra, database_url, fake, **QUICK_LEASE))) as (runtime, client),
    ):
        slow_id = await submit(client, model="slow-model", runs=1)
        await streaming(fake, "slow-model")
        quick_id = await submit(client, runs=2)
        quick = await finished(client, quick_id, user="alice")
        slow_meanwhile = await view(client, slow_id)
        open_transactions = [await long_transactions(runtime) for _ in range(3)]
        cancel = await client.post(
            f"/v1/benchmarks/{slow_id}/cancel", headers=bearer("alice", "user")
        )
        slow = await finished(client, slow_id, user="alice")
    assert quick["status"] == "completed" and quick["summary"]["runs_ok"] == 2
    assert slow_meanwhile["status"] == "running"
    assert open_transactions == [0, 0, 0]
    assert cancel.status_code == 202
    assert slow["status"] == "cancelled"
    for job in (quick, slow):
        assert job["started_at"] < job["finished_at"]


async def test_replicas_share_the_jobs(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    one_each = {**QUICK_LEASE, "benchmark_worker_concurrency": 1}
    async with (
        FakeModelServer(by_model) as fake,
        running(build(settings(infra, database_url, fake, **one_each))) as (_, first),
        running(build(settings(infra, database_url, fake, **one_each))) as (_, second),
    ):
        ids = [await submit(first, model="slow-model", runs=1) for _ in range(2)]
        await streaming(fake, "slow-model", count=2)  # one worker has room for one only
        jobs = [await view(second, job_id) for job_id in ids]
        for job_id in ids:
            await first.post(f"/v1/benchmarks/{job_id}/cancel", headers=bearer("alice", "user"))
        ended = [await finished(first, job_id, user="alice") for job_id in ids]
    assert [j["status"] for j in jobs] == ["running", "running"]
    assert jobs[0]["worker"] != jobs[1]["worker"]
    assert [j["status"] for j in ended] == ["cancelled", "cancelled"]


async def test_cancelling_stops_a_running_job_mid_run_and_a_queued_one_at_once(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    def first_run_quick(n: int, body: dict[str, Any]) -> Script:
        return FAST if n == 0 else SLOW

    one_slot = {**QUICK_LEASE, "benchmark_worker_concurrency": 1}
    async with (
        FakeModelServer(first_run_quick) as fake,
        running(build(settings(infra, database_url, fake, **one_slot))) as (_, client),
    ):
        running_id = await submit(client, runs=3)
        await streaming(fake, "llama3.1:8b")  # the second run, a slow one
        queued_id = await submit(client, runs=1)
        queued_before = await view(client, queued_id)
        not_theirs = await client.post(
            f"/v1/benchmarks/{running_id}/cancel", headers=bearer("mallory", "user")
        )
        queued_cancel = await client.post(
            f"/v1/benchmarks/{queued_id}/cancel", headers=bearer("alice", "user")
        )
        running_cancel = await client.post(
            f"/v1/benchmarks/{running_id}/cancel", headers=bearer("alice", "user")
        )
        stopped = await finished(client, running_id, user="alice")

        async def closed() -> bool:
            return fake.in_flight == 0

        await eventually(closed, what="the cancelled stream closed")
        again = await client.post(
            f"/v1/benchmarks/{running_id}/cancel", headers=bearer("alice", "user")
        )
        queued = await view(client, queued_id)
        events = await final_events(js, running_id) + await final_events(js, queued_id)
    assert queued_before["status"] == "queued"  # the only slot is busy
    assert not_theirs.status_code == 404
    assert (queued_cancel.status_code, queued_cancel.json()["status"]) == (200, "cancelled")
    assert (running_cancel.status_code, running_cancel.json()["status"]) == (202, "running")
    assert stopped["status"] == "cancelled" and stopped["error"] == "cancelled on request"
    assert (stopped["runs_done"], stopped["summary"]["runs_ok"]) == (1, 1)  # the quick run kept
    assert len(fake.served) == 2  # the third run never started
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert queued["status"] == "cancelled" and queued["attempt"] == 0
    assert sorted(e["job_id"] for e in events) == sorted([running_id, queued_id])
    assert all(e["subject"] == "benchmark.failed" for e in events)
    assert all(e["error"] == "cancelled on request" for e in events)


async def test_a_user_may_have_only_so_many_jobs_queued_or_running(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    quota = {**QUICK_LEASE, "benchmark_max_active_jobs_per_user": 2}
    async with (
        FakeModelServer(by_model) as fake,
        running(build(settings(infra, database_url, fake, **quota))) as (_, client),
    ):
        first = await submit(client, model="slow-model", runs=1)
        await submit(client, model="slow-model", runs=1)
        over = await client.post(
            "/v1/benchmarks/run", json=request(runs=1), headers=bearer("alice", "user")
        )
        bobs = await submit(client, user="bob", runs=1)
        await client.post(f"/v1/benchmarks/{first}/cancel", headers=bearer("alice", "user"))
        await finished(client, first, user="alice")
        after_cancel = await client.post(
            "/v1/benchmarks/run", json=request(runs=1), headers=bearer("alice", "user")
        )
        bob_sees_alices = await client.get(f"/v1/benchmarks/{first}", headers=bearer("bob", "user"))
        await finished(client, bobs, user="bob")
        alices_list = await client.get("/v1/benchmarks", headers=bearer("alice", "user"))
    assert over.status_code == 429 and over.headers["retry-after"] == "30"
    assert over.json()["error"]["code"] == "quota_exceeded"
    assert "BENCHMARK_MAX_ACTIVE_JOBS_PER_USER=2" in over.json()["error"]["message"]
    assert after_cancel.status_code == 202
    assert bob_sees_alices.status_code == 404
    assert bobs not in {j["job_id"] for j in alices_list.json()}


async def test_a_job_past_its_time_limit_fails_saying_so(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    limited = {**QUICK_LEASE, "benchmark_max_job_s": 1.0}
    async with (
        FakeModelServer(by_model) as fake,
        running(build(settings(infra, database_url, fake, **limited))) as (_, client),
    ):
        job_id = await submit(client, model="slow-model", runs=5, timeout_s=3600)
        job = await finished(client, job_id, user="alice")
        events = await final_events(js, job_id)

        async def closed() -> bool:
            return fake.in_flight == 0

        await eventually(closed, what="the stream closed")
    assert job["status"] == "failed"
    assert job["error"].startswith("time limit: the job ran longer than BENCHMARK_MAX_JOB_S=1s")
    assert [e["subject"] for e in events] == ["benchmark.failed"]


async def test_a_key_an_upstream_echoes_is_neither_stored_nor_logged(
    infra: Infra, database_url: str, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-or-v1-" + uuid.uuid4().hex * 2
    caplog.set_level(logging.DEBUG)
    echoing = Script(status=401, echo_authorization=True)
    async with FakeModelServer(echoing) as fake:
        config = settings(
            infra, database_url, fake, openrouter_api_key=key, benchmark_allow_unknown_models=True
        )
        async with running(build(config)) as (_, client):
            job_id = await submit(client, provider="openrouter", model="vendor/m", runs=2)
            job = await finished(client, job_id, user="alice")
            events = await final_events(js, job_id)
    assert fake.served[0].body["model"] == "vendor/m"  # the request went, with the key
    assert job["status"] == "failed" and "invalid credentials" in job["error"]
    text = str(job) + str(events) + caplog.text
    assert key[:16] not in text and "[redacted]" in job["error"]
