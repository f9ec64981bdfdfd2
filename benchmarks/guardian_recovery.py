"""guardian's detection and healing under a real `fleet up`.

    python -m benchmarks.guardian_recovery [--rounds 10] [--cpu-seconds 30]

Prints: MTTD (SIGKILL of stats → service.down received) and MTTR (SIGKILL → stats ready
again, a new process), median of `--rounds`; a hung service (SIGSTOP) → service.down and →
ready again; a crash loop (an applied migration of stats altered, so every new process
exits at start) → the restarts done and the one escalation; leader failover (a second
guardian beside fleet up's, the leader SIGKILLed right after it restarted a killed stats) →
the standby leading, and how many times stats was restarted; guardian's CPU while all is
well beside an idle service's.

Settings: guardian's defaults except GUARDIAN_RESTART_COOLDOWN_S=1 (the seed's 30 s would
make the crash loop last 90 s) and GUARDIAN_HEALTHY_WINDOW_S=5 (so that each round starts
without backoff, as after 10 quiet minutes by default). NATS_URL / DATABASE_URL are used
when set (a fresh database in that server), else fleet up's embedded servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats

from benchmarks.harness import (
    BENCH_JWT_SECRET,
    bench_headers,
    cpu_seconds,
    fresh_database,
    service_env,
)
from services.embedded import free_port

Event = tuple[float, str, dict[str, Any]]  # (monotonic time received, subject, body)


class Fleet:
    """`fleet up` in a temporary folder of its own, which `stop` removes."""

    def __init__(self, prefix: str) -> None:
        self.home = home = Path(tempfile.mkdtemp(prefix=prefix)) / "fleet"
        env = {
            **os.environ,
            "FLEET_HOME": str(home),
            "AUTH_JWT_SECRET": BENCH_JWT_SECRET,
            "GUARDIAN_RESTART_COOLDOWN_S": "1",
            "GUARDIAN_HEALTHY_WINDOW_S": "5",
        }
        if "DATABASE_URL" in env:  # a database of its own: guardian's history starts empty
            env["DATABASE_URL"] = asyncio.run(fresh_database(env["DATABASE_URL"]))
        self.out = (home.parent / "fleet-up.out").open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up"],
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )
        while not (home / "stack.json").exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"fleet up exited; see {home.parent / 'fleet-up.out'}")
            time.sleep(0.05)
        self.state: dict[str, Any] = json.loads((home / "stack.json").read_text())
        self.urls: dict[str, str] = self.state["services"]

    def pid_of(self, service: str) -> int:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid), "-f", f"services.cli run {service}$"],
            capture_output=True,
            text=True,
        ).stdout.split()
        return int(out[0]) if len(out) == 1 else 0

    def restarts_of(self, service: str) -> int:
        text = (self.home.parent / "fleet-up.out").read_text()
        return text.count(f"{service} restarted at guardian's request")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        self.out.close()
        shutil.rmtree(self.home.parent, ignore_errors=True)


class Events:
    """service.* events as they arrive (core NATS sees what JetStream stores)."""

    def __init__(self, nats_url: str) -> None:
        self.got: list[Event] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def listen() -> None:
            nc = await nats.connect(nats_url)

            async def on(msg: Any) -> None:
                self.got.append((time.monotonic(), msg.subject, json.loads(msg.data)))

            for subject in ("service.down", "service.recovered", "service.escalated"):
                await nc.subscribe(subject, cb=on)
            await nc.flush()
            ready.set()
            await asyncio.Event().wait()

        threading.Thread(target=lambda: self.loop.run_until_complete(listen()), daemon=True).start()
        ready.wait(10)

    def first(self, subject: str, service: str, after: float, timeout: float) -> Event:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self.got):
                if e[0] >= after and e[1] == subject and e[2].get("service") == service:
                    return e
            time.sleep(0.005)
        raise TimeoutError(f"no {subject} of {service} within {timeout}s")


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def wait(check: Any, timeout: float, what: str, step: float = 0.01) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic()
        time.sleep(step)
    raise TimeoutError(f"{what} not within {timeout}s")


def healthy(fleet: Fleet) -> bool:
    try:
        r = httpx.get(f"{fleet.urls['guardian']}/api/health", timeout=2)
    except httpx.HTTPError:
        return False
    return bool(r.json().get("status") == "healthy")


def kill_rounds(fleet: Fleet, events: Events, rounds: int) -> tuple[list[float], list[float]]:
    mttd, mttr = [], []
    for _ in range(rounds):
        wait(lambda: healthy(fleet), 60, "a healthy fleet", 0.2)
        time.sleep(5.5)  # the healthy window: no backoff left from the previous round
        pid = fleet.pid_of("stats")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        down = events.first("service.down", "stats", t0, 10)
        up = wait(
            lambda pid=pid: fleet.pid_of("stats") not in (0, pid) and ready(fleet.urls["stats"]),
            60,
            "stats ready",
        )
        mttd.append(down[0] - t0)
        mttr.append(up - t0)
        events.first("service.recovered", "stats", t0, 30)
    return mttd, mttr


def hung_rounds(fleet: Fleet, events: Events, rounds: int) -> tuple[list[float], list[float]]:
    detect, heal = [], []
    for _ in range(rounds):
        wait(lambda: healthy(fleet), 60, "a healthy fleet", 0.2)
        time.sleep(5.5)
        pid = fleet.pid_of("stats")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        down = events.first("service.down", "stats", t0, 10)
        up = wait(
            lambda pid=pid: fleet.pid_of("stats") not in (0, pid) and ready(fleet.urls["stats"]),
            60,
            "stats ready",
        )
        detect.append(down[0] - t0)
        heal.append(up - t0)
        events.first("service.recovered", "stats", t0, 30)
    return detect, heal


async def _break_migrations(database_url: str, broken: bool) -> None:
    """A changed checksum of an applied migration: stats refuses to start (exit code 1)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE stats.schema_migrations SET checksum = CASE WHEN $1"
            " THEN 'x' || checksum ELSE ltrim(checksum, 'x') END",
            broken,
        )
    finally:
        await conn.close()


def crash_loop(fleet: Fleet, events: Events) -> dict[str, Any]:
    wait(lambda: healthy(fleet), 60, "a healthy fleet", 0.2)
    time.sleep(5.5)
    before = fleet.restarts_of("stats")
    database_url = fleet.state["database_url"]
    asyncio.run(_break_migrations(database_url, True))  # every new stats exits at start
    t0 = time.monotonic()
    try:
        os.kill(fleet.pid_of("stats"), signal.SIGKILL)
        escalated = events.first("service.escalated", "stats", t0, 120)
        restarts = fleet.restarts_of("stats") - before
        time.sleep(10)  # a fourth restart would come within 10 s (the backoff is at 4 s)
        after_more = fleet.restarts_of("stats") - before
    finally:
        asyncio.run(_break_migrations(database_url, False))
    report = escalated[2]["report"]
    r = httpx.post(
        f"{fleet.urls['guardian']}/api/guardian/control",
        json={"action": "reset", "service": "stats"},
        headers=bench_headers(),
        timeout=5,
    )
    r.raise_for_status()
    reset_at = time.monotonic()
    back = wait(lambda: ready(fleet.urls["stats"]), 60, "stats after the reset")
    return {
        "restarts_before_escalation": restarts,
        "restarts_10s_later": after_more,
        "escalated_after_s": escalated[0] - t0,
        "report_log_lines": int(re.findall(r"## Last (\d+) log lines", report)[0]),
        "report_file": escalated[2].get("report_name"),
        "ready_after_reset_s": back - reset_at,
    }


def failover(fleet: Fleet, events: Events) -> dict[str, Any]:
    wait(lambda: healthy(fleet), 60, "a healthy fleet", 0.2)
    time.sleep(5.5)
    port = free_port()
    env = {
        **service_env(fleet.state["nats_url"], fleet.state["database_url"], port),
        "FLEET_HOME": str(fleet.home),
        "GUARDIAN_SUPERVISOR_SOCKET": fleet.state["supervisor_socket"],
        "GUARDIAN_SUPERVISOR_TOKEN_FILE": str(fleet.home / "supervisor.token"),
        "GUARDIAN_RESTART_COOLDOWN_S": "1",
        "GUARDIAN_HEALTHY_WINDOW_S": "5",
    }
    log = (fleet.home.parent / "standby.log").open("ab")
    standby = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "run", "guardian"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: ready(url), 60, "the standby guardian", 0.1)
        wait(lambda: _watching(url), 30, "the standby seeing the services", 0.1)
        before = fleet.restarts_of("stats")
        pid = fleet.pid_of("stats")
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait(lambda: fleet.restarts_of("stats") > before, 10, "the leader's restart", 0.002)
        t0 = time.monotonic()
        os.kill(fleet.pid_of("guardian"), signal.SIGKILL)
        took = wait(lambda: _leads(url), 30, "the standby leading", 0.01) - t0
        events.first("service.recovered", "stats", t_kill, 60)
        time.sleep(3)
        return {"takeover_s": took, "stats_restarts": fleet.restarts_of("stats") - before}
    finally:
        standby.terminate()
        standby.wait(30)
        log.close()


def _leads(url: str) -> bool:
    try:
        status = httpx.get(f"{url}/api/guardian/status", headers=bench_headers(), timeout=0.5)
        return bool(status.json()["leader"])
    except (httpx.HTTPError, ValueError):
        return False


def _watching(url: str) -> bool:
    try:
        status = httpx.get(f"{url}/api/guardian/status", headers=bench_headers(), timeout=1).json()
    except (httpx.HTTPError, ValueError):
        return False
    return all(s["status"] == "up" for s in status["services"].values())


def idle_cpu(fleet: Fleet, seconds: float) -> tuple[float, float]:
    wait(lambda: healthy(fleet), 60, "a healthy fleet", 0.2)
    g, s = fleet.pid_of("guardian"), fleet.pid_of("sync")
    g0, s0 = cpu_seconds(g), cpu_seconds(s)
    time.sleep(seconds)
    per_minute = 60 / seconds
    return (cpu_seconds(g) - g0) * per_minute, (cpu_seconds(s) - s0) * per_minute


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--hung-rounds", type=int, default=3)
    parser.add_argument("--cpu-seconds", type=float, default=30)
    parser.add_argument("--phases", default="cpu,kill,hung,crash,failover")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    fleet = Fleet("bench-guardian-")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    try:
        events = Events(fleet.state["nats_url"])
        if "cpu" in phases:
            cpu_g, cpu_idle = idle_cpu(fleet, args.cpu_seconds)
            print(f"CPU per minute, all well: guardian {cpu_g:.2f}s, idle sync {cpu_idle:.2f}s")
        if "kill" in phases:
            mttd, mttr = kill_rounds(fleet, events, args.rounds)
            print(
                f"SIGKILL stats, {args.rounds} rounds: MTTD median {statistics.median(mttd):.3f}s"
                f" (max {max(mttd):.3f}s); MTTR median {statistics.median(mttr):.2f}s"
                f" (max {max(mttr):.2f}s)"
            )
        if "hung" in phases:
            detect, heal = hung_rounds(fleet, events, args.hung_rounds)
            print(
                f"SIGSTOP stats, {args.hung_rounds} rounds: down after median"
                f" {statistics.median(detect):.2f}s (max {max(detect):.2f}s); ready again after"
                f" median {statistics.median(heal):.2f}s"
            )
        if "crash" in phases:
            loop = crash_loop(fleet, events)
            print(
                f"crash loop: {loop['restarts_before_escalation']} restarts, escalated after"
                f" {loop['escalated_after_s']:.1f}s ({loop['report_file']},"
                f" {loop['report_log_lines']} log lines),"
                f" {loop['restarts_10s_later']} restarts 10 s later;"
                f" ready {loop['ready_after_reset_s']:.1f}s after the operator's reset"
            )
        if "failover" in phases:
            over = failover(fleet, events)
            print(
                f"leader failover: the standby leads {over['takeover_s']:.2f}s after the leader's"
                f" SIGKILL; stats restarted {over['stats_restarts']} time(s)"
            )
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
