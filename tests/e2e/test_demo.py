"""`fleet demo` against the whole system started the way `make up` starts it (with the
demo's servers in its environment): after `seed` and a short `run`, every service's own API
shows what the demo says it did — plans ended as reported, stats counted each response,
brain and dismissal once, the benchmark jobs completed, the catalog's price changed and the
device went offline and came back."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from services.demo.servers import DEVICE, stack_env
from services.demo.story import AGENTS, REPRICED, USER
from tests.conftest import bearer, eventually
from tests.e2e.test_stack import Fleet


def free_ports(count: int) -> int:
    """The first of `count` consecutive free local ports."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base: int = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free consecutive ports")


@pytest.fixture
def demo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The demo's ports (free ones) and the stack's environment pointing at them."""
    env = {"FLEET_HOME": str(tmp_path / "fleet"), "FLEET_DEMO_PORT": str(free_ports(3))}
    env |= stack_env(env)
    # the demo checks the device itself when it wants to; a periodic check after it stopped
    # its servers would find the device offline before the test reads it
    env["OLLAMA_DISCOVERY_INTERVAL"] = "3600"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield {**os.environ, **env}


@pytest.fixture
def fleet(demo_env: dict[str, str]) -> Iterator[Fleet]:
    f = Fleet(Path(demo_env["FLEET_HOME"]))
    yield f
    if f.proc is not None and f.proc.poll() is None:
        f.stop()


def demo(env: dict[str, str], *args: str) -> tuple[str, dict[str, Any]]:
    """Run `fleet demo <args>`; its output and what it says it did (`--json`)."""
    tally = Path(env["FLEET_HOME"]) / f"tally-{args[0]}.json"
    done = subprocess.run(
        [sys.executable, "-m", "services.demo", *args, "--json", str(tally)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    said: dict[str, Any] = json.loads(tally.read_text())
    return done.stdout, said


async def last_event(nats_url: str, subject: str) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.jetstream().get_last_msg("CATALOG", subject)
    finally:
        await nc.close()
    event: dict[str, Any] = json.loads(msg.data or b"{}")
    return event


async def test_the_demo_moves_every_services_numbers_as_it_says(
    fleet: Fleet, demo_env: dict[str, str]
) -> None:
    state = fleet.up()
    urls: dict[str, str] = state["services"]
    seeded_output, seeded = await asyncio.to_thread(demo, demo_env, "seed")
    output, ran = await asyncio.to_thread(demo, demo_env, "run", "--minutes", "0.7")

    # the story happened: plans completed and failed, with retries and both decisions
    assert ran["configured"] and seeded["configured"]
    assert Counter(ran["plans"].values())["completed"] >= 2
    assert Counter(ran["plans"].values())["failed"] >= 2
    assert ran["failed_attempts"] >= 4
    assert ran["approvals"] == {"approved": 1, "rejected": 1}
    assert set(ran["responses"]) == set(AGENTS.values())

    async with httpx.AsyncClient(timeout=5, headers=bearer(USER, "user")) as http:

        async def get(service: str, path: str, **headers: str) -> Any:
            answer = await http.get(urls[service] + path, headers=headers)
            assert answer.status_code == 200, (path, answer.text)
            return answer.json()

        # seed printed a working token of the demo user
        token = next(line.split()[-1] for line in seeded_output.splitlines() if " user " in line)
        mine = await get("planner", "/v1/plans?limit=1000", Authorization=f"Bearer {token}")
        assert {p["plan_id"] for p in mine} >= set(seeded["plans"]) | set(ran["plans"])

        # planner: every plan ended as the demo says; the approvals were decided so
        for said in (seeded, ran):
            for plan_id, status in said["plans"].items():
                assert (await get("planner", f"/v1/plans/{plan_id}"))["status"] == status
        decided: Counter[str] = Counter()
        for plan_id in ran["plans"]:
            decided.update(
                a["status"] for a in await get("planner", f"/v1/approvals?plan_id={plan_id}")
            )
        assert decided == Counter(ran["approvals"])

        # stats: each response, brain and dismissal counted once
        def expected(key: str) -> Counter[str]:
            return Counter(seeded[key]) + Counter(ran[key])

        async def counted() -> bool:
            records = {m["model_id"]: m for m in await get("stats", "/v1/stats/models")}
            return all(
                records.get(model, {}).get(field, 0) == expected(key)[model]
                for key, field in (
                    ("responses", "response_count"),
                    ("brains", "total_brains"),
                    ("dismissals", "dismissal_count"),
                )
                for model in AGENTS.values()
            )

        await eventually(counted, timeout=30, what="stats to count what the demo sent")
        await asyncio.sleep(1)  # a late duplicate would show here
        assert await counted()

        # benchmark: the jobs completed with every run; the dear model was refused
        assert {j["model"] for j in ran["benchmarks"].values()} == {"gpt-4o-mini", "llama3.1:8b"}
        for job_id, said_job in ran["benchmarks"].items():
            job = await get("benchmark", f"/v1/benchmarks/{job_id}")
            assert job["status"] == "completed"
            assert job["summary"]["runs_ok"] == job["runs"] == said_job["runs_ok"]
            assert job["summary"]["ttft_ms"]["p50"] > 0
            assert job["summary"]["output_tokens"] > 0
        assert "BENCHMARK_MAX_PRICE_PER_1M" in ran["blocked"]

        # sync: the re-sync changed the price, which the catalog's history shows
        resync = ran["catalog"]["runs"][-1]
        assert (await get("sync", f"/v1/sync/runs/{resync}"))["changed"] == 1
        model = await get("sync", f"/v1/models/{REPRICED}")
        assert (ran["catalog"]["before"], ran["catalog"]["after"]) == ("1.1", "1.4")
        assert model["completion_price_per_1m"] == "1.4"
        history = [p["completion_price_per_1m"] for p in model["price_history"]]
        assert "1.1" in history and "1.4" in history

        # the device went offline and came back: sync's events say so, in that order
        assert ran["device"] == ["online", "offline", "online"]
        device = next(d for d in await get("sync", "/v1/devices") if d["name"] == DEVICE)
        assert device["status"] == "online"
    offline = await last_event(state["nats_url"], "device.offline")
    online = await last_event(state["nats_url"], "device.online")
    assert offline["device"] == online["device"] == DEVICE
    assert offline["occurred_at"] < online["occurred_at"]

    # what the demo printed at the end is what the services hold
    assert f"{USER} (every run so far): {sum(expected('responses').values())} responses" in output
    assert f"status page  {urls['guardian']}/" in output
