"""The benchmark service against real NATS and PostgreSQL, with a local fake model server:
the API, the price guard fed by `model.synced`, the workers, the events, the cleanup and the
CLI."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import uvicorn
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from contracts.catalog import BENCHMARK_STREAM
from contracts.events import BenchmarkRequested, ModelSynced, PriceTier
from services.benchmark import cli, db
from services.benchmark.app import build
from services.benchmark.config import BenchmarkSettings
from services.benchmark.domain import RunResult
from services.embedded import free_port
from services.runtime.service import ServiceSpec, create_app
from tests.conftest import Infra, bearer, eventually, running
from tests.fakes import FakeModelServer, Script

FAST = Script(ttft_s=0.03, gap_s=0.01)


def settings(
    infra: Infra, database_url: str, fake: FakeModelServer, **extra: Any
) -> BenchmarkSettings:
    return BenchmarkSettings(
        nats_url=infra.nats_url,
        database_url=database_url,
        http_port=0,
        ollama_base_url=fake.url,
        openai_base_url=fake.url + "/v1",
        openrouter_base_url=fake.url,
        **extra,
    )


def request(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "provider": "ollama",
        "model": "llama3.1:8b",
        "task_type": "generate",
        "prompt": "Why is the sky blue?",
        "runs": 2,
    }
    return {**body, **overrides}


async def submit(client: httpx.AsyncClient, **overrides: Any) -> str:
    r = await client.post("/v1/benchmarks/run", json=request(**overrides))
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


async def finished(
    client: httpx.AsyncClient, job_id: str, timeout: float = 15, user: str | None = None
) -> dict[str, Any]:
    """The job once it has ended, as `user` (the submitter; None: the client's own token,
    an operator's) sees it."""
    job: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal job
        headers = bearer(user, "user") if user else {}
        r = await client.get(f"/v1/benchmarks/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        job = r.json()
        return job["status"] in ("completed", "failed", "cancelled")

    await eventually(done, timeout=timeout, what=f"job {job_id} finished")
    return job


def synced(model_id: str, prompt: str | None, completion: str | None, **fields: Any) -> ModelSynced:
    values: dict[str, Any] = dict(
        provider="openrouter",
        model_id=model_id,
        name=model_id,
        change="changed",
        status="active",
        prompt_price_per_1m=None if prompt is None else Decimal(prompt),
        completion_price_per_1m=None if completion is None else Decimal(completion),
    )
    return ModelSynced(**{**values, **fields})


async def publish_applied(js: JetStreamContext, consumer: str, *events: Any) -> None:
    """Publish and wait until the service's durable consumer has acknowledged them."""
    seq = 0
    for e in events:
        seq = (await js.publish(e.subject, e.model_dump_json().encode())).seq
    stream = "CATALOG" if events[0].subject == "model.synced" else BENCHMARK_STREAM.name

    async def acked() -> bool:
        info = await js.consumer_info(stream, consumer)
        return bool(info.ack_floor.stream_seq >= seq)

    await eventually(acked, what=f"{consumer} applied the events")


async def final_events(js: JetStreamContext, job_id: str) -> list[dict[str, Any]]:
    """Every benchmark.completed / benchmark.failed stored for the job."""
    found: list[dict[str, Any]] = []
    for subject in ("benchmark.completed", "benchmark.failed"):
        sub = await js.subscribe(subject, ordered_consumer=True)
        try:
            while True:
                msg = await sub.next_msg(timeout=0.2)  # stored already: only the end is awaited
                data = json.loads(msg.data)
                if data["job_id"] == job_id:
                    found.append({"subject": subject, **data})
        except TimeoutError:
            pass
        finally:
            await sub.unsubscribe()
    return found


async def test_a_job_is_measured_stored_and_reported(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    script = Script(ttft_s=0.08, gap_s=0.04, chunks=(("a", 2), ("b c", 3), ("d", 1)))
    async with (
        FakeModelServer(script) as fake,
        running(build(settings(infra, database_url, fake))) as (_, client),
    ):
        job_id = await submit(client, runs=4, warmup_runs=1, concurrency=2, max_tokens=32)
        job = await finished(client, job_id)
        listed = (await client.get("/v1/benchmarks", params={"model": "llama3.1:8b"})).json()
        none_failed = (await client.get("/v1/benchmarks", params={"status": "failed"})).json()
        latest = (await client.get("/v1/benchmarks/models/llama3.1:8b/summary")).json()
        unknown = await client.get("/v1/benchmarks/models/nobody/summary")
        events = await final_events(js, job_id)

    assert job["status"] == "completed" and job["attempt"] == 1
    assert (job["runs_done"], job["runs_failed"]) == (4, 0)
    assert [r["run_index"] for r in job["results"]] == [0, 1, 2, 3]
    for run in job["results"]:
        assert run["ok"] and run["output_tokens"] == 6 and run["content_chunks"] == 3
        # the first chunk's time, not a later one's (two 40 ms gaps follow it), on a loaded
        # machine too (no upper bound on the server's own delay)
        assert 80 <= run["ttft_ms"] <= run["e2e_ms"] - 60
        assert run["cost_usd"] == "0" and run["cost_source"] == "catalog"  # local: free
    assert len(fake.served) == 5  # one warm-up, not counted
    assert fake.max_in_flight == 2
    assert all(s.body["options"] == {"num_predict": 32} for s in fake.served)
    summary = job["summary"]
    assert summary["runs_ok"] == 4 and summary["output_tokens"] == 24
    assert 80 <= summary["ttft_ms"]["p50"] <= summary["ttft_ms"]["p99"]
    assert abs(summary["inter_token_ms"]["p50"] - 40) <= 50

    assert [j["job_id"] for j in listed] == [job_id]
    assert none_failed == []
    assert latest["results"][0]["job_id"] == job_id
    assert unknown.status_code == 404
    assert len(events) == 1 and events[0]["subject"] == "benchmark.completed"
    assert events[0]["summary"] == summary


async def test_bad_requests_are_explained(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with (
        FakeModelServer(FAST) as fake,
        running(build(settings(infra, database_url, fake))) as (_, client),
    ):
        bad_provider = await client.post("/v1/benchmarks/run", json=request(provider="bard"))
        zero_runs = await client.post("/v1/benchmarks/run", json=request(runs=0))
        body = request()
        del body["prompt"]
        no_prompt = await client.post("/v1/benchmarks/run", json=body)
        not_json = await client.post(
            "/v1/benchmarks/run", content=b"{runs: 3", headers={"content-type": "application/json"}
        )
        no_job = await client.get(f"/v1/benchmarks/{uuid.uuid4()}")
        jobs = (await client.get("/v1/benchmarks")).json()
    for r in (bad_provider, zero_runs, no_prompt, not_json):
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "invalid_request"
    assert "provider" in bad_provider.json()["error"]["message"]
    assert "'ollama', 'openrouter' or 'openai'" in bad_provider.json()["error"]["message"]
    assert "greater than or equal to 1" in zero_runs.json()["error"]["message"]
    assert zero_runs.json()["error"]["fields"][0]["loc"] == ["body", "runs"]
    assert no_prompt.json()["error"]["fields"][0]["loc"] == ["body", "prompt"]
    assert "not valid JSON" in not_json.json()["error"]["message"]
    assert no_job.status_code == 404
    assert jobs == []  # nothing was stored


def raw(body: str) -> dict[str, Any]:
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


async def test_hostile_input_is_a_short_4xx_never_a_500(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    valid = json.dumps(request())
    huge_prompt = "x" * (10 * 1024 * 1024)
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/benchmarks/run", {"json": request(prompt="a\x00b")}),
        ("POST", "/v1/benchmarks/run", {"json": request(model="m\x00")}),
        (
            "POST",
            "/v1/benchmarks/run",
            raw(valid.replace('"runs": 2', '"runs": 2, "timeout_s": NaN')),
        ),
        ("POST", "/v1/benchmarks/run", raw(valid.replace('"runs": 2', '"runs": 1e999999'))),
        ("POST", "/v1/benchmarks/run", raw(valid.replace('"runs": 2', '"runs": ' + "9" * 5000))),
        ("POST", "/v1/benchmarks/run", {"json": request(runs=2**63)}),
        ("POST", "/v1/benchmarks/run", {"json": request(max_tokens=2**31)}),
        ("POST", "/v1/benchmarks/run", {"json": request(prompt="p" * 100_001)}),
        ("POST", "/v1/benchmarks/run", {"json": request(prompt=huge_prompt)}),
        ("POST", "/v1/benchmarks/run", {"json": request(runs=[[[[1]]]] * 1000)}),
        ("GET", "/v1/benchmarks?model=a%00b", {}),
        ("GET", "/v1/benchmarks?limit=99999999999999999999999", {}),
        ("GET", "/v1/benchmarks/models/a%00b/summary", {}),
        ("GET", "/v1/benchmarks/not-a-uuid", {}),
        ("POST", "/v1/benchmarks/not-a-uuid/cancel", {}),
        ("GET", "/v1/benchmarks", {"headers": {"authorization": "Bearer " + "x" * 600}}),
    ]
    async with (
        FakeModelServer(FAST) as fake,
        running(build(settings(infra, database_url, fake))) as (_, client),
    ):
        answers = [await client.request(method, url, **kw) for method, url, kw in cases]
        jobs = (await client.get("/v1/benchmarks")).json()
    for (method, url, _), r in zip(cases, answers, strict=True):
        assert 400 <= r.status_code < 500, (method, url, r.status_code, r.text[:300])
        assert len(r.content) < 4000, (url, len(r.content))  # never the input echoed back
        assert r.json()["error"]["code"] in ("invalid_request", "too_large", "unauthorized")
    assert answers[8].status_code == 413
    assert jobs == []


async def test_the_price_guard_follows_the_catalog(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    t0 = datetime(2026, 4, 2, 12, 0, tzinfo=UTC)
    async with (
        FakeModelServer(FAST) as fake,
        running(build(settings(infra, database_url, fake))) as (_, client),
    ):
        consumer = "benchmark-model-synced"
        await publish_applied(
            js,
            consumer,
            synced("openai/gpt-4", "30", "60", occurred_at=t0),
            synced("meta/llama-3-8b", "0.05", "0.1", occurred_at=t0),
            synced("openrouter/auto", None, None, variable_price=True, occurred_at=t0),
            synced(
                "google/long-context",
                "2",
                "8",
                price_tiers=[
                    PriceTier(
                        min_prompt_tokens=200_000,
                        prompt_price_per_1m=Decimal("4"),
                        completion_price_per_1m=Decimal("16"),
                    )
                ],
                occurred_at=t0,
            ),
            synced(
                "vendor/image-model",
                None,
                None,
                output_modalities=["image"],
                unit_prices={"image": Decimal("0.04")},
                occurred_at=t0,
            ),
        )

        async def post(**overrides: Any) -> httpx.Response:
            return await client.post("/v1/benchmarks/run", json=request(**overrides))

        # the seed's example: an expensive catalog model asked through ollama
        seed = await post(model="openai/gpt-4", runs=1, prompt="test")
        cheap = await post(provider="openrouter", model="meta/llama-3-8b", runs=1)
        variable = await post(provider="openrouter", model="openrouter/auto")
        unknown_local = await post(provider="ollama", model="qwen2.5:7b", runs=1)
        tiered = await post(provider="openrouter", model="google/long-context")
        image = await post(provider="openrouter", model="vendor/image-model")
        unknown_remote = await post(provider="openai", model="gpt-5-preview")

        await publish_applied(
            js, consumer, synced("openai/gpt-4", "5", "8", occurred_at=t0 + timedelta(hours=1))
        )
        cheaper = await post(model="openai/gpt-4", runs=1)
        await finished(client, cheaper.json()["job_id"])  # before the price moves again
        await publish_applied(js, consumer, synced("openai/gpt-4", "30", "60", occurred_at=t0))
        stale_ignored = await post(model="openai/gpt-4", runs=1)
        await finished(client, stale_ignored.json()["job_id"])
        removed = synced("openai/gpt-4", None, None, change="removed", status="removed")
        await publish_applied(
            js,
            consumer,
            synced("openai/gpt-4", "12", "12", occurred_at=t0 + timedelta(hours=2)),
            removed,
        )
        dearer_then_removed = await post(model="openai/gpt-4", runs=1)

        for r in (cheap, unknown_local, cheaper, stale_ignored):
            assert r.status_code == 202, r.text
            assert (await finished(client, r.json()["job_id"]))["status"] == "completed"

    assert seed.status_code == 400
    assert seed.json()["error"]["code"] == "benchmark_blocked"
    reason = seed.json()["error"]["message"]
    assert reason.startswith("model too expensive for benchmark")
    assert "$30 per 1M prompt tokens" in reason and "$60 per 1M completion" in reason
    assert "BENCHMARK_MAX_PRICE_PER_1M=$10" in reason
    assert variable.status_code == 400 and "variable" in variable.json()["error"]["message"]
    assert tiered.status_code == 400
    assert "up to $4 per 1M prompt tokens and $16" in tiered.json()["error"]["message"]
    assert image.status_code == 400
    assert "not priced per token" in image.json()["error"]["message"]
    assert unknown_remote.status_code == 400
    assert "not in the catalog" in unknown_remote.json()["error"]["message"]
    assert dearer_then_removed.status_code == 400
    assert "$12 per 1M prompt tokens" in dearer_then_removed.json()["error"]["message"]
    # the cheap OpenRouter model's runs are priced from the catalog
    assert {s.body["model"] for s in fake.served} == {
        "meta/llama-3-8b",
        "qwen2.5:7b",
        "openai/gpt-4",
    }


async def test_a_run_is_priced_by_the_catalog_tier_its_prompt_reaches(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    def by_prompt(_: int, body: dict[str, Any]) -> Script:
        # the prompt says how many prompt tokens the server reports for it
        tokens = int(body["messages"][0]["content"])
        return Script(ttft_s=0.01, gap_s=0.005, prompt_tokens=tokens)  # 7 output tokens

    async with (
        FakeModelServer(by_prompt) as fake,
        running(build(settings(infra, database_url, fake))) as (_, client),
    ):
        tier = PriceTier(
            min_prompt_tokens=200_000,
            prompt_price_per_1m=Decimal("2.5"),
            completion_price_per_1m=Decimal("10"),
        )
        await publish_applied(
            js, "benchmark-model-synced", synced("g/long", "1.25", "5", price_tiers=[tier])
        )
        jobs = {
            tokens: await submit(client, provider="openrouter", model="g/long", prompt=str(tokens))
            for tokens in (199_999, 200_000, 250_000)
        }
        costs = {
            tokens: {r["cost_usd"] for r in (await finished(client, job_id))["results"]}
            for tokens, job_id in jobs.items()
        }

    # tokens x USD per 1M / 1,000,000, worked out by hand (7 output tokens)
    assert costs == {
        199_999: {"0.25003375"},  # base: 249,998.75 + 35
        200_000: {"0.50007"},  # the tier from its threshold: 500,000 + 70
        250_000: {"0.62507"},  # 625,000 + 70
    }


async def test_a_request_published_by_any_client_meets_the_guard_in_the_worker(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with (
        FakeModelServer(FAST) as fake,
        running(build(settings(infra, database_url, fake))) as (_, client),
    ):
        await publish_applied(js, "benchmark-model-synced", synced("openai/gpt-4", "30", "60"))
        blocked = BenchmarkRequested(
            job_id=uuid.uuid4(),
            provider="ollama",
            model="openai/gpt-4",
            task_type="chat",
            prompt="p",
            runs=1,
        )
        allowed = blocked.model_copy(
            update={"event_id": uuid.uuid4(), "job_id": uuid.uuid4(), "model": "phi3:mini"}
        )
        await publish_applied(js, "benchmark-benchmark-requested", blocked, allowed)
        refused = await finished(client, str(blocked.job_id))
        ran = await finished(client, str(allowed.job_id))
        events = await final_events(js, str(blocked.job_id))
    assert refused["status"] == "failed"
    assert refused["error"].startswith("benchmark_blocked: model too expensive for benchmark")
    assert ran.get("status") == "completed" and ran["task_type"] == "chat", ran
    assert [s.body["model"] for s in fake.served] == ["phi3:mini"]  # never the blocked one
    assert [e["subject"] for e in events] == ["benchmark.failed"]
    assert events[0]["error"] == refused["error"]


async def test_a_job_fails_only_when_every_run_fails(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    def every_other(n: int, body: dict[str, Any]) -> Script:
        if body["model"] == "broken":
            return Script(status=404)
        return FAST if n % 2 == 0 else Script(status=500)

    async with (
        FakeModelServer(every_other) as fake,
        running(build(settings(infra, database_url, fake))) as (_, client),
    ):
        partly = await finished(client, await submit(client, runs=4))
        broken_id = await submit(client, model="broken", runs=2)
        broken = await finished(client, broken_id)
        events = await final_events(js, broken_id)
    assert partly["status"] == "completed"
    assert (partly["summary"]["runs_ok"], partly["summary"]["runs_failed"]) == (2, 2)
    assert partly["summary"]["errors"] == {"http_status": 2}
    assert {r["error_kind"] for r in partly["results"] if not r["ok"]} == {"http_status"}
    assert broken["status"] == "failed"
    assert "every run failed" in broken["error"] and "HTTP 404" in broken["error"]
    assert [e["subject"] for e in events] == ["benchmark.failed"]
    assert events[0]["summary"]["errors"] == {"http_status": 2}


async def test_the_job_state_decides_who_may_finish_it(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with (
        FakeModelServer(FAST) as fake,
        running(build(settings(infra, database_url, fake))) as (runtime, client),
    ):
        done_id = await submit(client, runs=1)
        await finished(client, done_id)
        served_before = len(fake.served)
        # the same job requested again (another event id): a finished job is not run again
        again = BenchmarkRequested(
            job_id=uuid.UUID(done_id),
            provider="ollama",
            model="llama3.1:8b",
            task_type="generate",
            prompt="p",
            runs=1,
        )
        await publish_applied(js, "benchmark-benchmark-requested", again)
        after = (await client.get(f"/v1/benchmarks/{done_id}")).json()

        job = again.model_copy(update={"job_id": uuid.uuid4()})
        run = RunResult(0, False, "timeout", "late")
        async with runtime.pool.acquire() as conn:
            await db.insert_job(conn, job)
            # worker-a's lease runs out at once (as if it died); b takes over with a long one
            first = await db.claim_job(conn, job.job_id, "worker-a", 0.0, 3600)
            second = await db.claim_job(conn, job.job_id, "worker-b", 60.0, 3600)
            held_by_b = await db.claim_job(conn, job.job_id, "worker-c", 60.0, 3600)
            stale_renewal = await db.renew_lease(conn, job.job_id, 1, 60.0)
            renewal = await db.renew_lease(conn, job.job_id, 2, 60.0)
            stale_progress = await db.add_run(conn, job.job_id, 1, run)
            stale_finish = await db.finish_job(conn, job.job_id, 1, "failed", None, "x")
            current_finish = await db.finish_job(conn, job.job_id, 2, "failed", None, "y", [run])
            third = await db.claim_job(conn, job.job_id, "worker-c", 60.0, 3600)
            stored = await db.job(conn, job.job_id, None)
    assert after["status"] == "completed" and after["attempt"] == 1
    assert len(fake.served) == served_before
    assert first is not None and second is not None
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert held_by_b is None  # a living worker's job is not taken
    assert stale_renewal is None and renewal is False  # held, not cancelled
    assert not stale_progress and not stale_finish and current_finish
    assert third is None
    assert stored is not None and (stored["status"], stored["error"]) == ("failed", "y")
    assert stored["started_at"] <= stored["finished_at"] and stored["lease_expires_at"] is None


async def test_old_jobs_are_cleaned_up(
    infra: Infra, database_url: str, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    deleted_before = REGISTRY.get_sample_value("fleet_benchmark_jobs_deleted_total") or 0.0
    caplog.set_level(logging.INFO, logger="services.benchmark.worker")
    async with (
        FakeModelServer(FAST) as fake,
        running(build(settings(infra, database_url, fake, job_cleanup_interval=0.0003))) as (
            runtime,
            client,
        ),
    ):
        old_id, new_id = await submit(client, runs=1), await submit(client, runs=1)
        await finished(client, old_id)
        await finished(client, new_id)
        async with runtime.pool.acquire() as conn:
            await conn.execute(
                "UPDATE jobs SET created_at = now() - interval '8 days' WHERE job_id = $1",
                uuid.UUID(old_id),
            )

        async def gone() -> bool:
            return (await client.get(f"/v1/benchmarks/{old_id}")).status_code == 404

        await eventually(gone, what="the old job deleted")
        kept = await client.get(f"/v1/benchmarks/{new_id}")
    assert kept.status_code == 200
    deleted = REGISTRY.get_sample_value("fleet_benchmark_jobs_deleted_total") or 0.0
    assert deleted - deleted_before == 1
    assert any("deleted 1 jobs older than 7 days" in r.getMessage() for r in caplog.records)


@asynccontextmanager
async def served(spec: ServiceSpec) -> AsyncIterator[str]:
    """The service behind a real HTTP port, as the CLI meets it."""
    port = free_port()
    config = uvicorn.Config(create_app(spec), host="127.0.0.1", port=port, log_config=None)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the server stopped while starting"
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_the_cli_runs_a_benchmark_and_prints_the_results(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with (
        FakeModelServer(FAST) as fake,
        served(build(settings(infra, database_url, fake))) as url,
    ):
        out = io.StringIO()
        argv = [
            "run",
            "--provider",
            "ollama",
            "--model",
            "llama3.1:8b",
            "--runs",
            "3",
            "--url",
            url,
        ]
        code = await asyncio.to_thread(cli.main, argv, out)
        refused_out = io.StringIO()
        argv = ["run", "--provider", "openai", "--model", "gpt-unknown", "--url", url]
        refused = await asyncio.to_thread(cli.main, argv, refused_out)
    text = out.getvalue()
    assert code == 0, text
    assert "3/3 runs done" in text
    assert "ttft ms" in text and "itl/chunk ms" in text and "tokens/s" in text
    assert "runs: 3 ok, 0 failed; output tokens: 21" in text
    assert refused == 1 and "refused: model not in the catalog" in refused_out.getvalue()
