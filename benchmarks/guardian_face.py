"""guardian's face: the smoke canary's time through each service, how long a broken pipeline
takes to show as an incident, and what the HTTP metrics middleware costs.

    python -m benchmarks.guardian_face [--rounds 10] [--requests 20000]

- canary: under a real `fleet up`, `--rounds` runs of POST /api/guardian/run-smoke; the
  median of each step (after the event: counted from its publishing) and of the whole run.
- broken pipeline: a second `fleet up` with GUARDIAN_MODE=observe (nobody restarts) and
  GUARDIAN_SMOKE_INTERVAL_S=5, GUARDIAN_SMOKE_TIMEOUT_S=5: stats SIGTERMed; the time to
  service.down of `stats` (its process) and of `smoke` (the canary's incident).
- middleware: GET /health/live on one service app with and without HttpMetrics, in this
  process over ASGI (no network, so the difference is the middleware's), interleaved blocks
  of 1000, p50 / p99 of each request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
from typing import Any

import httpx

from benchmarks.guardian_recovery import Events, Fleet, healthy, wait
from benchmarks.harness import bench_headers


def canary_rounds(rounds: int) -> None:
    os.environ["GUARDIAN_SMOKE_INTERVAL_S"] = "0"
    fleet = Fleet("bench-canary-")
    try:
        wait(lambda: healthy(fleet), 60, "a healthy fleet", 0.2)
        url = f"{fleet.urls['guardian']}/api/guardian/run-smoke"
        steps: dict[str, list[float]] = {}
        totals = []
        for _ in range(rounds + 1):
            run = httpx.post(url, headers=bench_headers(), timeout=60).json()
            assert run["ok"], run
            totals.append(run["seconds"])
            for s in run["steps"]:
                steps.setdefault(f"{s['step']} ({s['service']})", []).append(s["seconds"])
        del totals[0]  # the first run warms the connections up
        print(f"canary, {rounds} runs (after one warm-up), median (max):")
        for name, times in steps.items():
            times = times[1:]
            print(f"  {name:28} {statistics.median(times):.3f}s ({max(times):.3f}s)")
        print(f"  {'whole run':28} {statistics.median(totals):.3f}s ({max(totals):.3f}s)")
    finally:
        fleet.stop()


def broken_pipeline() -> None:
    os.environ.update(
        GUARDIAN_MODE="observe", GUARDIAN_SMOKE_INTERVAL_S="5", GUARDIAN_SMOKE_TIMEOUT_S="5"
    )
    fleet = Fleet("bench-broken-")
    try:
        events = Events(fleet.state["nats_url"])
        wait(lambda: healthy(fleet), 60, "a healthy fleet", 0.2)
        time.sleep(6)  # a passing scheduled run first
        t0 = time.monotonic()
        os.kill(fleet.pid_of("stats"), signal.SIGTERM)
        down = events.first("service.down", "stats", t0, 30)
        smoke = events.first("service.down", "smoke", t0, 60)
        print(
            f"stats stopped (observe mode, canary every 5 s, step timeout 5 s): "
            f"stats incident after {down[0] - t0:.2f}s, smoke incident after "
            f"{smoke[0] - t0:.2f}s ({smoke[2]['reason'][:80]})"
        )
    finally:
        fleet.stop()


async def middleware_cost(requests: int) -> None:
    from services.runtime.config import RuntimeSettings
    from services.runtime.http_metrics import HttpMetrics
    from services.runtime.service import ServiceSpec, create_app

    def app(with_metrics: bool) -> httpx.AsyncClient:
        made = create_app(ServiceSpec(name="bench", settings=RuntimeSettings()))
        if not with_metrics:
            metrics: Any = HttpMetrics
            made.user_middleware = [m for m in made.user_middleware if m.cls is not metrics]
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=made), base_url="http://b")

    clients = {"with": app(True), "without": app(False)}
    times: dict[str, list[float]] = {"with": [], "without": []}
    for client in clients.values():  # warm-up
        for _ in range(200):
            await client.get("/health/live")
    block = 1000
    for _ in range(requests // block):
        for name, client in clients.items():
            for _ in range(block):
                t0 = time.perf_counter()
                r = await client.get("/health/live")
                times[name].append(time.perf_counter() - t0)
                assert r.status_code == 200
    print(f"GET /health/live over ASGI, {requests} requests each, interleaved:")
    for name, got in times.items():
        got.sort()
        p50, p99 = got[len(got) // 2], got[int(len(got) * 0.99)]
        print(f"  {name:7} HttpMetrics: p50 {p50 * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--phases", default="canary,broken,middleware")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    print(f"{os.cpu_count()} cores")
    if "middleware" in phases:
        asyncio.run(middleware_cost(args.requests))
    if "canary" in phases:
        canary_rounds(args.rounds)
    if "broken" in phases:
        broken_pipeline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
